"""Blending an anomaly source into an image inside a mask."""
from __future__ import annotations

import torch

from .validation import check_image, check_mask, check_same_size

__all__ = ["blend"]


def blend(image: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """``aug = I (1 - M) + (1 - b) S M + b I M`` for one image.

    image, source: float ``[3, H, W]`` in [0, 1]; mask: ``[H, W]`` or ``[1, H, W]``
    (bool or {0, 1}); beta: the share of the original kept inside the mask, in [0, 1].
    The result stays in [0, 1] because it is a convex combination of inputs in [0, 1].
    """
    size = check_image(image, "image")
    check_image(source, "source")
    check_same_size(image, source, "image", "source")
    m = check_mask(mask, size).to(image.dtype)
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    source = source.to(dtype=image.dtype, device=image.device)
    # I (1-M) + (1-b) S M + b I M  ==  I + M (1-b) (S - I)
    return image + m * (1.0 - float(beta)) * (source - image)
