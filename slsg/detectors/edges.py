"""Normal distance levels near image edges, to put edge patches on the same footing as the rest.

Why: on held-out normal images, patches at an image's edge lie further from the memory bank than
interior ones. Edges carry what the interior does not: the CNN's padding, and in crops such as
Magnetic Tile Defects' the tile's own rim, cut at a different place in every image. So the
maximum of a normal image's anomaly map lies at its edge far more often than area explains (MTD
validation, seed 0: in 97% of held-out normal images, where the 8 px border holds 12% of the
area), and a defect in the interior must outscore the noisiest edge of every normal image.

What: each cell of the patch grid is classed by its offset from the nearer top/bottom edge and
from the nearer left/right edge, each counted up to ``band`` cells (cells further in share the
"interior" offset), which gives ``(2 * band + 1) ** 2`` classes for images of any size. The level
of a class is the mean nearest-normal distance of its cells over held-out normal images, floored at
the interior's level; dividing each distance by its class's level discounts edges that are noisier
than the interior and leaves the rest of the map as it was, up to one common factor.
"""
from __future__ import annotations

import math

import torch


def edge_classes(height: int, width: int, band: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Class index [height, width] (int64) of each cell of a patch grid; see the module docstring."""
    def offsets(length: int) -> torch.Tensor:
        i = torch.arange(length, device=device)
        from_end = length - 1 - i
        interior = torch.full_like(i, band)
        # In a grid shorter than 2 * band a cell lies within the band of both edges: the nearer
        # one counts (the first, in the middle of an odd grid).
        near_start = (i < band) & (i <= from_end)
        return torch.where(near_start, i, torch.where(from_end < band, 2 * band - from_end, interior))

    return offsets(height)[:, None] * (2 * band + 1) + offsets(width)[None, :]


def edge_class_sums(dist: torch.Tensor, band: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of the distances of one map [h, w] per edge class, each [(2 * band + 1) ** 2]
    (float64): levels of several maps, or of all maps but one, are sums of these."""
    if band < 1:
        raise ValueError(f"band must be at least 1, got {band}")
    if dist.ndim != 2:
        raise ValueError(f"distance maps must be [h, w], got {tuple(dist.shape)}")
    n_classes = (2 * band + 1) ** 2
    classes = edge_classes(*dist.shape, band).reshape(-1)
    values = dist.detach().reshape(-1).to("cpu", torch.float64)
    sums = torch.zeros(n_classes, dtype=torch.float64).index_add_(0, classes, values)
    counts = torch.zeros(n_classes, dtype=torch.float64).index_add_(0, classes, torch.ones_like(values))
    return sums, counts


def total_class_sums(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums and counts of several maps' ``edge_class_sums`` added up."""
    return torch.stack([s for s, _ in parts]).sum(0), torch.stack([c for _, c in parts]).sum(0)


def levels_from_sums(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
    """Level per edge class (float32): the mean distance of its cells, but never below the
    interior's (the mean over all cells where no cell is interior). Classes without cells take the
    interior's level. None when that level is not positive.

    The floor makes the division one-sided: noisy edges are discounted, calm ones (an object's
    plain background, which lies close to the bank) are not amplified; a small level measured on
    a few held-out images would turn their noise into anomalies."""
    total = counts.sum()
    if total == 0:
        return None
    band = band_of_levels(sums)
    interior = band * (2 * band + 1) + band
    floor = sums[interior] / counts[interior] if counts[interior] > 0 else sums.sum() / total
    if not torch.isfinite(floor) or floor <= 0:
        return None
    levels = torch.where(counts > 0, sums / counts.clamp_min(1), floor)
    return torch.maximum(levels, floor).float()


def estimate_edge_levels(distance_maps: list[torch.Tensor], band: int) -> torch.Tensor | None:
    """Levels per edge class [(2 * band + 1) ** 2] (float32, see ``levels_from_sums``) from the
    distance maps [h, w] of held-out normal images; None when there is no positive floor."""
    if band < 1:
        raise ValueError(f"band must be at least 1, got {band}")
    if not distance_maps:
        return None
    return levels_from_sums(*total_class_sums([edge_class_sums(dist, band) for dist in distance_maps]))


def band_of_levels(levels: torch.Tensor) -> int:
    """The band that ``(2 * band + 1) ** 2`` levels (or per-class sums) were made for."""
    band = (math.isqrt(levels.numel()) - 1) // 2
    if band < 1 or (2 * band + 1) ** 2 != levels.numel():
        raise ValueError(f"edge levels must number (2 * band + 1) ** 2 for a band >= 1, got {levels.numel()}")
    return band


def divide_by_edge_levels(dist: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Distances [B, h, w] divided by the level of each cell's edge class (the band is the one
    the levels were made for)."""
    classes = edge_classes(dist.shape[-2], dist.shape[-1], band_of_levels(levels), device=dist.device)
    return dist / levels.to(dist.device, dist.dtype)[classes]
