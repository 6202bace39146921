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

    The module is frozen on creation (eval mode, no gradients) and stays in eval mode even when a
    parent module calls ``.train()``: batch-norm statistics of a pre-trained encoder must not drift.
    ``set_trainable(True)`` lifts this for fine-tuning (stage-1 pre-training).
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
        check_images(x)
        wanted = tuple(self.strides) if strides is None else tuple(strides)
        unknown = [s for s in wanted if s not in self.strides]
        if unknown:
            raise ValueError(f"{self.name}: strides {unknown} not available; available: {list(self.strides)}")
        return self.extract(self.normalize(x), wanted)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [B, 1000] for [0, 1] RGB images (needs ``with_classifier=True``)."""
        check_images(x)
        return self.logits(self.normalize(x))

    def set_trainable(self, trainable: bool) -> "Backbone":
        self._frozen = not trainable
        self.requires_grad_(trainable)
        super().train(trainable)
        return self

    def train(self, mode: bool = True) -> "Backbone":
        return super().train(mode and not self._frozen)

    def freeze(self) -> "Backbone":
        return self.set_trainable(False)

    def fused(self) -> "Backbone":
        """A copy for fast frozen inference: batch norms folded into the preceding convolutions and
        channels-last memory layout (about 2x faster on CPU). Its state dict differs from the
        original's: never save or fine-tune it."""
        model = copy.deepcopy(self).freeze()
        model._fuse_conv_bn()
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
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return state


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load the keys ``module`` has from ``state``; keys it lacks (pruned deeper layers) are ignored.

    Every parameter and buffer of ``module`` must be present with the right shape.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise WeightsError(f"{source}: {len(missing)} weights missing for this architecture ({shown})")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
             if state[k].shape != v.shape]
    if wrong:
        raise WeightsError(f"{source}: shape mismatch for this architecture: {'; '.join(wrong[:3])}")
    module.load_state_dict({k: state[k] for k in own}, strict=True)
