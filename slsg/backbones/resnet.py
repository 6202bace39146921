"""torchvision ResNet18 / WideResNet50-2 as frozen multi-scale backbones."""
from __future__ import annotations

import contextlib
import os
import socket
import urllib.error
import urllib.parse

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from slsg.backbones.base import Backbone, WeightsError, load_into, load_state_dict_file, state_shapes

# torchvision's ImageNet input statistics (these weights expect them, unlike the TF-converted lite ones)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (torchvision constructor, its ImageNet weights enum). V1 weights for WRN50-2: the ones
# PatchCore used. Names, not objects: importing torchvision.models costs seconds, so it happens
# only when a ResNet is actually built.
RESNETS = {
    "resnet18": ("resnet18", "ResNet18_Weights"),
    "wide_resnet50_2": ("wide_resnet50_2", "Wide_ResNet50_2_Weights"),
}


def _torchvision_parts(name: str):
    import torchvision.models

    constructor, weights_enum = RESNETS[name]
    return getattr(torchvision.models, constructor), getattr(torchvision.models, weights_enum).IMAGENET1K_V1

# output stride -> the torchvision module whose output it is
_STAGES = {2: "relu", 4: "layer1", 8: "layer2", 16: "layer3", 32: "layer4"}


def hub_cache_path(url: str) -> str:
    """Where ``torch.hub.load_state_dict_from_url`` caches ``url``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlparse(url).path))


# Seconds to wait for a connection or for data: torch.hub opens its URL without a timeout, so a
# network that drops packets silently would hang the download.
DOWNLOAD_TIMEOUT = 30.0


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def download_imagenet_state(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights (from the torch hub cache, else downloaded)."""
    url = _torchvision_parts(name)[1].url
    try:
        # check_hash: torchvision file names carry a SHA-256 prefix; a damaged download never reaches the cache
        with _socket_timeout(DOWNLOAD_TIMEOUT):
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=True,
                                                      weights_only=True)
    except Exception as exc:
        cached = hub_cache_path(url)
        if os.path.isfile(cached):
            # Only the type: torch's unpickling message suggests weights_only=False, unsafe for a
            # downloaded file; the original error stays chained.
            raise WeightsError(
                f"cannot read the cached ImageNet weights for {name} at {cached} ({type(exc).__name__}: damaged "
                f"or incomplete file?); delete that file to download it again, or pass weights=PATH"
            ) from exc
        if isinstance(exc, urllib.error.URLError):
            raise WeightsError(
                f"cannot download ImageNet weights for {name} from {url} (offline? {exc.reason}); "
                f"download the file elsewhere and pass weights=PATH"
            ) from exc
        if isinstance(exc, (OSError, RuntimeError)):  # timeout, connection reset, hash mismatch, disk full
            raise WeightsError(
                f"downloading ImageNet weights for {name} from {url} failed ({type(exc).__name__}: {exc}); "
                f"try again, or download the file elsewhere and pass weights=PATH"
            ) from exc
        raise


class ResNetBackbone(Backbone):
    def __init__(self, name: str, with_classifier: bool = False, max_stride: int = 32) -> None:
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown ResNet backbone {name!r}; known: {sorted(RESNETS)}")
        self.name = name
        net = _torchvision_parts(name)[0](weights=None)
        # Drop what is never used so extraction is cheaper and checkpoints smaller.
        for stride, stage in _STAGES.items():
            if stride > max_stride and stage.startswith("layer"):
                delattr(net, stage)
        if not with_classifier:
            del net.fc, net.avgpool
        self.net = net
        self.with_classifier = with_classifier
        self.strides = tuple(s for s in _STAGES if s <= max_stride)
        self.channels = {2: 64}
        for s in self.strides[1:]:
            block = getattr(net, _STAGES[s])[-1]
            last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
            self.channels[s] = last_bn.num_features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()  # frozen however it is built, not only through create()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extract(self, x: torch.Tensor, strides: tuple[int, ...]) -> dict[int, torch.Tensor]:
        net = self.net
        out: dict[int, torch.Tensor] = {}
        deepest = max(strides)
        x = net.relu(net.bn1(net.conv1(x)))
        if 2 in strides:
            out[2] = x
        x = net.maxpool(x)
        for stride in (4, 8, 16, 32):
            if stride > deepest:
                break
            x = getattr(net, _STAGES[stride])(x)
            if stride in strides:
                out[stride] = x
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if not self.with_classifier:
            raise RuntimeError(f"{self.name} was built without its classifier (with_classifier=False)")
        return self.net(x)

    def load_weights(self, state: dict[str, torch.Tensor], source: str) -> None:
        # The unpruned torchvision network, shapes only (meta device): its deeper layers and its
        # classifier (of any class count) may be in the file; any other key means another architecture.
        with torch.device("meta"):
            full = _torchvision_parts(self.name)[0](weights=None)
        load_into(self.net, state, source, full=state_shapes(full, any_shape=("fc.",)))

    def _fuse_conv_bn(self) -> None:
        net = self.net
        net.conv1, net.bn1 = fuse_conv_bn_eval(net.conv1, net.bn1), nn.Identity()
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for block in getattr(net, stage, ()):
                for i in (1, 2, 3):
                    conv, bn = getattr(block, f"conv{i}", None), getattr(block, f"bn{i}", None)
                    if conv is not None and isinstance(bn, nn.BatchNorm2d):
                        setattr(block, f"conv{i}", fuse_conv_bn_eval(conv, bn))
                        setattr(block, f"bn{i}", nn.Identity())
                if block.downsample is not None:
                    conv, bn = block.downsample
                    block.downsample = nn.Sequential(fuse_conv_bn_eval(conv, bn))


def create_resnet(name: str, weights, with_classifier: bool, max_stride: int) -> ResNetBackbone:
    model = ResNetBackbone(name, with_classifier=with_classifier, max_stride=max_stride)
    if weights is None:
        return model
    if weights == "imagenet":
        model.load_weights(download_imagenet_state(name), f"torchvision ImageNet weights for {name}")
    else:
        model.load_weights(load_state_dict_file(weights), str(weights))
    return model

