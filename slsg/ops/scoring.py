"""Nearest-normal scoring ops: sphere_distance and topk_mean (Python face, fake kernels,
autograd formulas)."""
from __future__ import annotations

import math

import torch

from ..utils import all_finite, squared_norms_fit_float32
from . import reference
from ._extension import EXTENSION_LOADED, use_extension
from ._validate import check_int, check_same_device, check_tensor


def sphere_distance(
    x: torch.Tensor,
    centers: torch.Tensor,
    radii: torch.Tensor | None = None,
    k: int = 1,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance from each query to its k nearest hyperspheres.

    Returns ``dist [M, k]``, the k smallest values over j of ``||x_i - c_j||^2 - r_j^2`` in
    ascending order (float32, or float64 for float64 inputs), and ``index [M, k]`` (int64),
    ties broken by the lowest j. Exact search; memory is bounded by blocking (no [M, K]
    matrix). Differentiable with respect to x, centers and radii. On CUDA, float32 inputs
    are screened with TF32 tensor-core products and every centre the rounding bound cannot
    rule out is recomputed in float32, so the result is exact whatever torch's matmul
    precision settings; float16 / bfloat16 inputs use tensor cores with float32 accumulation.
    """
    op = "sphere_distance"
    check_tensor(op, "x", x, ndim=2, shape_hint="[M, D]")
    check_tensor(op, "centers", centers, ndim=2, shape_hint="[K, D]", nonempty=True)
    if radii is not None:
        check_tensor(op, "radii", radii, ndim=1, shape_hint="[K]")
        if radii.shape[0] != centers.shape[0]:
            raise ValueError(f"{op}: radii has {radii.shape[0]} entries but centers has K={centers.shape[0]}")
    check_same_device(op, x=x, centers=centers, radii=radii)
    if x.shape[1] != centers.shape[1]:
        raise ValueError(f"{op}: feature sizes differ: x has D={x.shape[1]}, centers has D={centers.shape[1]}")
    if x.shape[1] == 0:
        raise ValueError(f"{op}: feature size D is 0")
    if x.dtype != centers.dtype:
        raise TypeError(f"{op}: dtype mismatch: x is {x.dtype}, centers is {centers.dtype}")
    check_int(op, "k", k, 1, centers.shape[0], "K")
    if use_extension(op, x.device, backend) and _kernel_dtype_ok(x):
        return torch.ops.slsg.sphere_distance(x, centers, radii, k)
    # The kernels reject non-finite inputs; the reference would return NaN silently.
    if not torch.compiler.is_compiling():
        for name, t in (("x", x), ("centers", centers), ("radii", radii)):
            if t is not None and not all_finite(t):
                raise ValueError(f"{op}: {name} contains NaN or Inf")
        # Like the kernels, refuse what would overflow in float32 accumulation (NaN otherwise).
        if x.dtype != torch.float64 and not (squared_norms_fit_float32(x) and squared_norms_fit_float32(centers)):
            raise ValueError(f"{op}: squared norms of x or centers overflow float32; rescale the inputs")
    return reference.sphere_distance(x, centers, radii, k)


def topk_mean(scores: torch.Tensor, k: int = 100, *, backend: str = "auto") -> torch.Tensor:
    """Mean of the k largest values of each ``[B, ...]`` map, shape ``[B]`` (k=1: the max).
    The image score from a pixel map. Differentiable."""
    op = "topk_mean"
    check_tensor(op, "scores", scores, shape_hint="[B, ...]")
    if scores.dim() < 2:
        raise ValueError(f"{op}: scores must be [B, ...] with at least 2 dims, got shape {tuple(scores.shape)}")
    if math.prod(scores.shape[1:]) == 0:
        raise ValueError(f"{op}: each map is empty (shape {tuple(scores.shape)})")
    flat = scores.reshape(scores.shape[0], math.prod(scores.shape[1:]))  # -1 is ambiguous for B = 0
    check_int(op, "k", k, 1, flat.shape[1], "values per map")
    if use_extension(op, flat.device, backend) and _kernel_dtype_ok(flat):
        return torch.ops.slsg.topk_mean(flat, k)
    return reference.topk_mean(flat, k)


def _kernel_dtype_ok(t: torch.Tensor) -> bool:
    # CPU kernels are float32/float64 only; half precision there takes the reference path.
    return t.is_cuda or t.dtype in (torch.float32, torch.float64)


if EXTENSION_LOADED:

    @torch.library.register_fake("slsg::sphere_distance")
    def _sphere_distance_fake(x, centers, radii, k):
        acc = reference.accumulation_dtype(x.dtype)
        return x.new_empty((x.shape[0], k), dtype=acc), x.new_empty((x.shape[0], k), dtype=torch.long)

    def _sphere_distance_setup(ctx, inputs, output):
        x, centers, radii, _ = inputs
        ctx.has_radii = radii is not None
        ctx.save_for_backward(x, centers, radii if radii is not None else x.new_empty(0), output[1])

    def _sphere_distance_backward(ctx, grad_dist, _grad_index):
        # d/dx (||x - c||^2 - r^2) = 2 (x - c); d/dc = -2 (x - c); d/dr = -2 r, summed over uses.
        x, centers, radii, index = ctx.saved_tensors
        g = grad_dist.to(x.dtype)
        diff = x.unsqueeze(1) - centers[index]  # [M, k, D]
        grad_x = grad_c = grad_r = None
        if ctx.needs_input_grad[0]:
            grad_x = 2 * (g.unsqueeze(-1) * diff).sum(1)
        if ctx.needs_input_grad[1]:
            contrib = (-2 * g.unsqueeze(-1) * diff).reshape(-1, x.shape[1])
            grad_c = torch.zeros_like(centers).index_add_(0, index.reshape(-1), contrib)
        if ctx.has_radii and ctx.needs_input_grad[2]:
            contrib = (-2 * g * radii[index].to(g.dtype)).reshape(-1).to(radii.dtype)
            grad_r = torch.zeros_like(radii).index_add_(0, index.reshape(-1), contrib)
        return grad_x, grad_c, grad_r, None

    torch.library.register_autograd(
        "slsg::sphere_distance", _sphere_distance_backward, setup_context=_sphere_distance_setup
    )

    @torch.library.register_fake("slsg::topk_mean")
    def _topk_mean_fake(scores, k):
        return scores.new_empty((scores.shape[0],))

    def _topk_mean_setup(ctx, inputs, output):
        scores, k = inputs
        ctx.k = k
        ctx.save_for_backward(scores)

    def _topk_mean_backward(ctx, grad):
        # The mean spreads the gradient evenly over the k winners.
        (scores,) = ctx.saved_tensors
        winners = scores.topk(ctx.k, dim=1).indices
        share = (grad / ctx.k).unsqueeze(1).expand(-1, ctx.k).to(scores.dtype)
        return torch.zeros_like(scores).scatter(1, winners, share), None

    torch.library.register_autograd("slsg::topk_mean", _topk_mean_backward, setup_context=_topk_mean_setup)
