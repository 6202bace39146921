"""Coreset selection op: greedy_coreset (Python face and fake kernel)."""
from __future__ import annotations

import math

import torch

from ..utils import all_finite
from . import reference
from ._extension import EXTENSION_LOADED, use_extension
from ._validate import check_int, check_tensor


def coreset_plan(
    x: torch.Tensor, seed: int = 0, projection_dim: int | None = 128
) -> tuple[torch.Tensor, int]:
    """The seeded inputs of the greedy selection, shared by every backend so they select
    identically: the features to select on and the starting row.

    With ``projection_dim`` set, features go through a seeded Gaussian random projection
    (Johnson-Lindenstrauss: distances survive up to a small distortion, cost drops), then
    are quantised to int8 with one global scale. Integer distances are exact, so kernels
    and reference agree bit for bit whatever their summation order, and the working set
    (27 MB for 214k x 128) stays near the CPU cache. The rounding (under 0.5% of the
    value range per coordinate) is far below the projection's own distortion.
    With ``projection_dim=None`` the selection runs on the raw features (float64 sums).
    """
    generator = torch.Generator().manual_seed(seed)
    start = int(torch.randint(x.shape[0], (1,), generator=generator))
    if projection_dim is None:
        return x, start
    if projection_dim < x.shape[1]:
        proj = torch.randn(x.shape[1], projection_dim, generator=generator) / math.sqrt(projection_dim)
        x = x.float() @ proj.to(device=x.device)
    x = x.float()
    peak = x.abs().max()
    if not torch.isfinite(peak):  # float64 input beyond float32's range, or a projection that overflowed
        raise ValueError("greedy_coreset: x is too large for float32 (values overflow in the cast or the "
                         "random projection); rescale it or pass projection_dim=None")
    scale = 127.0 / peak if peak > 0 else torch.ones((), device=x.device)
    return (x * scale).round_().clamp_(-127, 127).to(torch.int8), start


def greedy_coreset(
    x: torch.Tensor,
    n: int,
    seed: int = 0,
    projection_dim: int | None = 128,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Indices ``[n]`` of a k-center greedy coreset of the rows of ``x [N, D]`` (PatchCore).

    The features are first projected to ``projection_dim`` dimensions with a seeded
    Gaussian projection (None: no projection); the start row is drawn from the same seed.
    Every backend makes the identical selection for the same seed: exactly on the int8
    features of a projection; with ``projection_dim=None`` up to float64 rounding (each
    backend sums in its own order, so two rows whose distances agree to ~1e-16 may swap).
    """
    op = "greedy_coreset"
    check_tensor(op, "x", x, ndim=2, shape_hint="[N, D]", nonempty=True)
    if x.shape[1] == 0:
        raise ValueError(f"{op}: feature size D is 0")
    check_int(op, "n", n, 1, x.shape[0], "N")
    check_int(op, "seed", seed, 0, (1 << 63) - 1, "max")
    if projection_dim is not None:
        check_int(op, "projection_dim", projection_dim, 1, 1 << 30, "max")
    # A NaN or Inf row would poison the projection's global scale, so every selection
    # would be meaningless (and the reference would not notice).
    if not torch.compiler.is_compiling() and not all_finite(x):
        raise ValueError(f"{op}: x contains NaN or Inf")
    projected, start = coreset_plan(x, seed, projection_dim)
    if use_extension(op, x.device, backend) and (x.is_cuda or projected.dtype != torch.float16):
        return torch.ops.slsg.greedy_coreset(projected.contiguous(), n, start)
    return reference.greedy_coreset(projected, n, start)


if EXTENSION_LOADED:

    @torch.library.register_fake("slsg::greedy_coreset")
    def _greedy_coreset_fake(x, n, start):
        return x.new_empty((n,), dtype=torch.long)
