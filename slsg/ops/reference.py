"""Pure-PyTorch references of the compiled ops.

They define the semantics the kernels must match, serve as the fallback when the extension
is missing, and export cleanly (plain tensor ops). Clarity over speed, but memory stays
bounded by chunking so the fallback remains usable on real sizes.
"""
from __future__ import annotations

import math

import torch

# Rows of the [rows, K] distance block the reference materialises at a time.
_CHUNK_ELEMS = 1 << 24


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sphere_distance(
    x: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor | None = None, k: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """k smallest ||x_i - c_j||^2 - r_j^2 per row, ascending; ties go to the lowest j."""
    acc = accumulation_dtype(x.dtype)
    x, centers = x.to(acc), centers.to(acc)
    offset = centers.square().sum(1)
    radius_sq = radii.to(acc).square() if radii is not None else None
    rows = max(1, _CHUNK_ELEMS // centers.shape[0])
    dists, indices = [], []
    for x_chunk in x.split(rows):
        sq = (x_chunk.square().sum(1, keepdim=True) + offset - 2 * x_chunk @ centers.T).clamp_min(0)
        values = sq - radius_sq if radius_sq is not None else sq
        if k == 1:
            dist, index = values.min(1, keepdim=True)  # first minimum on ties
        elif k <= _FEW:
            dist, index = _smallest_few(values, k)
        else:
            dist, index = values.sort(dim=1, stable=True)  # stable: ties keep index order
            dist, index = dist[:, :k], index[:, :k]
        dists.append(dist)
        indices.append(index)
    if not dists:
        return x.new_empty((0, k)), torch.empty((0, k), dtype=torch.long, device=x.device)
    return torch.cat(dists), torch.cat(indices)


_FEW = 8  # up to this k, k passes of min beat a sort of every row (MemoryBank asks k + 1)


def _smallest_few(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest of each row, ascending, lowest index first on ties: k passes of min
    (the first minimum), each taking its pick out. Overwrites ``values``."""
    dists, indices = [], []
    for _ in range(k):
        d, i = values.min(1, keepdim=True)
        dists.append(d)
        indices.append(i)
        values.scatter_(1, i, math.inf)
    dist, index = torch.cat(dists, 1), torch.cat(indices, 1)
    if not bool(torch.isfinite(dist).all()):  # a row of +inf values: a pick could repeat
        raise ValueError("sphere_distance: values overflow (or are NaN); rescale the inputs")
    return dist, index


def topk_mean(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k largest values of each row of a [B, L] tensor."""
    acc = accumulation_dtype(scores.dtype)
    # The sum of k values near float32's maximum overflows; the mean does not.
    return scores.to(acc).topk(k, dim=1).values.double().mean(1).to(scores.dtype)


def greedy_coreset(x: torch.Tensor, n: int, start: int) -> torch.Tensor:
    """k-center greedy: start at row `start`, then repeatedly take the row farthest from
    all rows taken so far. Distances in float64; ties go to the lowest index."""
    xd = x.double()
    min_dist = torch.full((x.shape[0],), float("inf"), dtype=torch.float64, device=x.device)
    selected = torch.empty(n, dtype=torch.long, device=x.device)
    selected[0] = start
    min_dist[start] = -1.0  # taken rows never win again
    last = start
    for step in range(1, n):
        dist = (xd - xd[last]).square_().sum(1)
        min_dist = torch.minimum(min_dist, dist)
        last = int(min_dist.argmax())  # first maximum on ties
        selected[step] = last
        min_dist[last] = -1.0
    return selected
