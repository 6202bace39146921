"""A simple foreground estimate, for restricting anomalies to the object.

Industrial product photos are usually taken on a plain background that fills the
image border. The background colour is taken as the median of a thin border; the
foreground is everything clearly different from it, closed morphologically so thin
gaps and dark details inside the object stay in. It is a heuristic: where it finds
almost nothing (a texture that fills the frame, an object on a busy background) it
returns None and the caller uses the whole image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .validation import check_image

__all__ = ["estimate_foreground"]


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    k = 2 * radius + 1
    return F.max_pool2d(mask[None, None].float(), k, stride=1, padding=radius)[0, 0] > 0.5


def _erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    return ~_dilate(~mask, radius)


def estimate_foreground(
    image: torch.Tensor,
    threshold: float = 0.12,
    border: float = 0.03,
    close_radius: int = 5,
    min_fraction: float = 0.02,
    max_fraction: float = 0.98,
) -> torch.Tensor | None:
    """bool ``[H, W]`` foreground of ``image`` (float ``[3, H, W]`` in [0, 1]), or None.

    threshold: max-over-channels distance from the border colour that counts as
    foreground. border: border width as a fraction of the shorter side.
    None is returned when the estimate covers less than ``min_fraction`` or more
    than ``max_fraction`` of the image (no usable object/background split).
    """
    h, w = check_image(image)
    width = max(1, round(border * min(h, w)))
    ring = torch.cat([
        image[:, :width].reshape(3, -1), image[:, -width:].reshape(3, -1),
        image[:, :, :width].reshape(3, -1), image[:, :, -width:].reshape(3, -1),
    ], dim=1)
    background = ring.median(dim=1).values.view(3, 1, 1)
    fg = (image - background).abs().amax(dim=0) > threshold
    if close_radius > 0:
        fg = _erode(_dilate(fg, close_radius), close_radius)
    fraction = float(fg.float().mean())
    if not min_fraction <= fraction <= max_fraction:
        return None
    return fg
