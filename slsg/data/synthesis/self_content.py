"""Anomaly sources for the self-content (logical) branch.

The source is the image itself or another normal image of the same product, so its
colours and textures are perfectly normal; only where things are is wrong. It is
flipped, colour-jittered and rearranged (grid cells shuffled, a band of rows copied
over another), then blended in through a Perlin mask. Inside the mask the result
shows parts in the wrong place (misplaced), parts twice (duplicated) and parts
replaced by something else (missing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from .rng import chance, randint, uniform
from .validation import check_image

__all__ = ["SelfContentParams", "grid_shuffle", "copy_rows", "self_content_source"]


@dataclass(frozen=True)
class SelfContentParams:
    """The self-content knobs of SynthesisConfig, gathered for this module."""

    other_prob: float = 0.5
    flip_prob: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.03
    grid: tuple[int, int] = (4, 8)
    shuffle_prob: float = 0.6
    row_copy_prob: float = 0.6


def grid_shuffle(image: torch.Tensor, grid: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Cut ``[C, H, W]`` into ``rows x cols`` equal cells and permute them randomly.

    When H or W is not divisible, the remainder strip at the bottom/right stays put.
    The permutation moves every cell (a random cyclic shift of a random order), so no
    cell can land on its own place by chance.
    """
    rows, cols = grid
    c, h, w = image.shape
    if not (1 <= rows <= h and 1 <= cols <= w) or rows * cols < 2:
        raise ValueError(f"grid {grid} does not fit an image of size {h}x{w} (need 2+ cells, each >= 1 px)")
    ch, cw = h // rows, w // cols
    core = image[:, : rows * ch, : cols * cw]
    cells = core.reshape(c, rows, ch, cols, cw).permute(1, 3, 0, 2, 4).reshape(rows * cols, c, ch, cw)
    order = torch.randperm(rows * cols, generator=generator, device=generator.device)
    perm = torch.empty_like(order)
    perm[order] = order.roll(1)  # a single cycle through all cells: no fixed points
    shuffled = cells[perm].reshape(rows, cols, c, ch, cw).permute(2, 0, 3, 1, 4).reshape(c, rows * ch, cols * cw)
    out = image.clone()
    out[:, : rows * ch, : cols * cw] = shuffled
    return out


def copy_rows(image: torch.Tensor, band: int, generator: torch.Generator) -> torch.Tensor:
    """Copy a random horizontal band of ``band`` rows over another, at least half a band away.

    The copied content appears twice (duplicated) and what it covered is gone (missing).
    """
    c, h, w = image.shape
    if not 1 <= band <= h // 2:
        raise ValueError(f"band height {band} must be in [1, {h // 2}] for an image of height {h}")
    src = randint(generator, 0, h - band)
    # Destinations at least band/2 away from the source, so the change is visible.
    gap = max(1, band // 2)
    allowed = [d for d in range(0, h - band + 1) if abs(d - src) >= gap]
    dst = allowed[randint(generator, 0, len(allowed) - 1)]
    out = image.clone()
    out[:, dst:dst + band] = image[:, src:src + band]
    return out


def _jitter(x: torch.Tensor, p: SelfContentParams, g: torch.Generator) -> torch.Tensor:
    if p.brightness:
        x = TF.adjust_brightness(x, uniform(g, 1 - p.brightness, 1 + p.brightness))
    if p.contrast:
        x = TF.adjust_contrast(x, uniform(g, 1 - p.contrast, 1 + p.contrast))
    if p.saturation:
        x = TF.adjust_saturation(x, uniform(g, 1 - p.saturation, 1 + p.saturation))
    if p.hue:
        x = TF.adjust_hue(x, uniform(g, -p.hue, p.hue))
    return x.clamp_(0.0, 1.0)


def self_content_source(
    image: torch.Tensor,
    generator: torch.Generator,
    params: SelfContentParams = SelfContentParams(),
    other: torch.Tensor | Callable[[], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """Build a self-content source for ``image`` (float ``[3, H, W]`` in [0, 1]).

    other: another normal image (resized to the image's size when it differs), or a
    zero-argument callable returning one (called only when the draw picks it), used with
    probability ``params.other_prob``. A grid larger than the image is cut down to it.
    Returns the source and the list of operations applied. At least one layout operation (shuffle or row copy) is always applied, otherwise
    the source would be the image itself and the "anomaly" invisible.
    """
    h, w = check_image(image)
    ops: list[str] = []
    x = image
    if other is not None and chance(generator, params.other_prob):
        other = other() if callable(other) else other
        check_image(other, "other_normal")
        other = other.to(image.device, image.dtype)
        if other.shape != image.shape:  # normal images of varied size (a folder read at its own sizes)
            other = F.interpolate(other[None].float(), size=(h, w), mode="bilinear", align_corners=False,
                                  antialias=True)[0].clamp_(0.0, 1.0).to(image.dtype)
        x, ops = other, ["other"]
    if chance(generator, params.flip_prob):
        kind = randint(generator, 0, 2)
        x = x.flip(-1) if kind == 0 else x.flip(-2) if kind == 1 else x.flip(-1, -2)
        ops.append(("hflip", "vflip", "hvflip")[kind])
    x = _jitter(x.clone(), params, generator)
    shuffle = chance(generator, params.shuffle_prob)
    rows = chance(generator, params.row_copy_prob)
    if not (shuffle or rows):
        shuffle = True
    grid = (min(params.grid[0], h), min(params.grid[1], w))  # tiny images: cells of one pixel
    if shuffle:
        x = grid_shuffle(x, grid, generator)
        ops.append(f"shuffle{grid[0]}x{grid[1]}")
    if rows:
        band = max(1, min(h // 2, h // grid[0]))
        x = copy_rows(x, band, generator)
        ops.append("rowcopy")
    return x, ops
