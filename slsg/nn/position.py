"""2-D sin-cos positional embeddings and the relative-position term built from them."""
from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor, temperature: float = 10000.0) -> torch.Tensor:
    """[len(positions), dim] embedding: sin then cos of positions at dim/2 frequencies."""
    if dim % 2:
        raise ValueError(f"sincos_1d: dim must be even, got {dim}")
    omega = 1.0 / temperature ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, height: int, width: int, temperature: float = 10000.0) -> torch.Tensor:
    """[height * width, dim] float64 embedding of a grid in raster order (MAE / ViG layout):
    the first dim/2 channels encode the column, the last dim/2 the row."""
    if dim % 4 or dim <= 0:
        raise ValueError(f"sincos_2d: dim must be a positive multiple of 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.cat(
        [sincos_1d(dim // 2, cols.flatten(), temperature), sincos_1d(dim // 2, rows.flatten(), temperature)], dim=1
    )


def relative_position_similarity(dim: int, height: int, width: int, temperature: float = 10000.0) -> torch.Tensor:
    """[N, N] similarity of grid positions, 2 e_i . e_j / dim for the sin-cos embeddings e
    (Vision GNN's relative-position term): 1 for a node with itself, decaying with distance.

    Computed in closed form, sin a sin b + cos a cos b = cos(a - b): a sum of cosines of the column
    and of the row offsets. So it depends on |dx| and |dy| only, exactly: offsets (3, 2) and (2, 3)
    get bit-identical values (a matmul of the embeddings rounds them differently, and the kNN graph
    then breaks such ties one way on one backend and the other way on another)."""
    if dim % 4 or dim <= 0:
        raise ValueError(f"relative_position_similarity: dim must be a positive multiple of 4, got {dim}")
    quarter = dim // 4  # frequencies per axis
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    offsets = torch.arange(max(height, width), dtype=torch.float64)
    per_offset = torch.cos(offsets[:, None] * omega[None, :]).sum(1)  # [max(H, W)]: sum_f cos(omega_f d)

    def along(n: int) -> torch.Tensor:  # [n, n]: the term of one axis, by |i - j|
        i = torch.arange(n)
        return per_offset[(i[:, None] - i[None, :]).abs()]

    # Row term + column term, broadcast to [H, W, H, W]: one N x N allocation (raster order i = y W + x).
    n = height * width
    return ((along(height)[:, None, :, None] + along(width)[None, :, None, :]) * (2.0 / dim)).reshape(n, n)
