"""The frozen feature-extractor interface shared by all backbones."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn


class WeightsError(ValueError):
    """Backbone weights that cannot be found, downloaded or loaded."""


class Backbone(nn.Module):
    """A frozen multi-scale CNN encoder.

    ``forward(x)`` takes float RGB images [B, 3, H, W] in [0, 1], applies the backbone's own input
    normalisation and returns ``{stride: feature map [B, channels[stride], H/stride, W/stride]}``.
    ``strides`` lists the available output strides, ``channels`` their channel counts.

    The module is frozen on creation (eval mode, no gradients; subclasses call ``self.freeze()`` at
    the end of ``__init__``) and stays frozen when a parent module calls ``.train()`` or
    ``.requires_grad_(True)``: batch-norm statistics and weights of a pre-trained encoder must not
    drift. ``set_trainable(True)`` lifts this for fine-tuning (stage-1 pre-training).

    Images must have the dtype and device of the backbone's weights (``backbone.to(...)`` or
    ``images.to(...)``), except under ``torch.autocast``.
    """

    name: str
    strides: tuple[int, ...]
    channels: dict[int, int]

    def __init__(self) -> None:
        super().__init__()
        self._frozen = True

    # --- subclass hooks -------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extract(self, x: torch.Tensor, strides: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Features of already normalised input at ``strides``."""
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits of already normalised input."""
        raise NotImplementedError

    # --- public interface -----------------------------------------------------------------
    def forward(self, x: torch.Tensor, strides: tuple[int, ...] | None = None) -> dict[int, torch.Tensor]:
        self._check_input(x)
        wanted = tuple(self.strides) if strides is None else tuple(strides)
        if not wanted:
            raise ValueError(f"{self.name}: strides is empty; pass strides=None for all of {list(self.strides)}")
        unknown = [s for s in wanted if s not in self.strides]
        if unknown:
            raise ValueError(f"{self.name}: strides {unknown} not available; available: {list(self.strides)}")
        return self.extract(self.normalize(x), wanted)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [B, 1000] for [0, 1] RGB images (needs ``with_classifier=True``)."""
        self._check_input(x)
        return self.logits(self.normalize(x))

    def _check_input(self, x: torch.Tensor) -> None:
        check_images(x)
        weight = next(self.parameters())
        # Mixed dtypes fail deep inside with a bare torch error (or silently upcast); under autocast
        # they are legitimate.
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"{self.name}: images are {x.dtype} but the backbone's weights are {weight.dtype}; "
                f"convert the images (images.to({weight.dtype})) or the backbone (backbone.to({x.dtype}))")
        if x.device != weight.device:
            raise ValueError(f"{self.name}: images are on {x.device} but the backbone is on {weight.device}; "
                             f"move one of them (images.to(device) or backbone.to(device))")
        self._keep_frozen()

    def _keep_frozen(self) -> None:
        # parent.requires_grad_(True) sets our parameters directly without calling our
        # requires_grad_, so the frozen state is re-applied before use.
        if self._frozen and not torch.compiler.is_compiling():
            for p in self.parameters():
                if p.requires_grad and p.is_leaf:
                    p.requires_grad_(False)

    def set_trainable(self, trainable: bool) -> "Backbone":
        self._frozen = not trainable
        self.requires_grad_(trainable)
        super().train(trainable)
        return self

    def train(self, mode: bool = True) -> "Backbone":
        self._keep_frozen()
        return super().train(mode and not self._frozen)

    def requires_grad_(self, requires_grad: bool = True) -> "Backbone":
        # like train(): ignored while frozen; set_trainable(True) unfreezes
        return super().requires_grad_(requires_grad and not self._frozen)

    def freeze(self) -> "Backbone":
        return self.set_trainable(False)

    def fused(self) -> "Backbone":
        """A copy for fast frozen inference: batch norms folded into the preceding convolutions and
        channels-last memory layout (about 2x faster on CPU). Its state dict differs from the
        original's: never save or fine-tune it."""
        model = copy.deepcopy(self).freeze()
        model._fuse_conv_bn()
        model.eval()  # the modules that replaced the batch norms start in training mode
        return model.to(memory_format=torch.channels_last)

    def _fuse_conv_bn(self) -> None:
        """Fold eval-mode batch norms into convolutions, in place (subclasses know the pairs)."""


def check_images(x: torch.Tensor) -> None:
    """Raise a clear error unless ``x`` is a float image batch [B, 3, H, W]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images [B, 3, H, W], got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {x.dtype}")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.pth``/``.pt`` file (also unwraps {"state_dict": ...} / {"model": ...})."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code, not a torch file ...
        # Only the type: torch's unpickling message suggests weights_only=False, unsafe for a file
        # of unknown origin; the original error stays chained.
        raise WeightsError(f"cannot read weights file {path} ({type(exc).__name__}): not a state dict saved "
                           "by torch.save, or a damaged file") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    if state and all(k.startswith("net.") for k in state):  # a Backbone's own state dict (a saved detector's)
        state = {k[len("net."):]: v for k, v in state.items()}
    return state


def state_shapes(module: nn.Module, any_shape: tuple[str, ...] = ()) -> dict[str, torch.Size | None]:
    """Key -> shape of ``module``'s state dict; None (any shape) for keys starting with ``any_shape``."""
    return {k: None if k.startswith(any_shape) else v.shape for k, v in module.state_dict().items()}


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str,
              full: dict[str, torch.Size | None] | None = None) -> None:
    """Load ``state`` into ``module`` (a possibly pruned network), checking it is for this architecture.

    Every parameter and buffer of ``module`` must be present with the right shape (except batch-norm
    ``num_batches_tracked``, absent from old torchvision files; torch fills it in). Keys ``module``
    lacks are allowed only where ``full`` (key -> shape of the unpruned network, see
    :func:`state_shapes`) has them with that shape: layers cut off by ``max_stride``, the classifier.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(".num_batches_tracked")]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise WeightsError(f"{source}: {len(missing)} weights missing for this architecture ({shown})")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if wrong:
        raise WeightsError(f"{source}: shape mismatch for this architecture: {'; '.join(wrong[:3])}")
    # Leftover keys mean another architecture (e.g. resnet34 into resnet18, lite1 into lite0), unless
    # they are the pruned part of this one with its shapes.
    full = full or {}
    unexpected = []
    for k, v in state.items():
        if k in own:
            continue
        if k not in full:
            unexpected.append(k)
        elif full[k] is not None and v.shape != full[k]:
            unexpected.append(f"{k} {tuple(v.shape)} != {tuple(full[k])}")
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise WeightsError(f"{source}: {len(unexpected)} weights this architecture does not have ({shown}); "
                           f"is the file for another backbone?")
    module.load_state_dict({k: state[k] for k in own if k in state}, strict=True)
