"""Graph ops: knn_graph, sparse_graph_attention, dense_graph_attention and max_relative
(Python face, fake kernels, autograd formulas).

The forward kernels of the attention ops also return the softmax's logsumexp per node; the
backward kernels recompute the probabilities from it rather than saving them.
"""
from __future__ import annotations

import torch

from ..utils import all_finite
from . import graph_reference
from ._extension import EXTENSION_LOADED, use_extension
from ._validate import check_int, check_same_device, check_tensor
from .reference import accumulation_dtype
from .scoring import _kernel_dtype_ok

INDEX_DTYPES = (torch.int64,)


def _check_finite(op: str, **tensors: torch.Tensor | None) -> None:
    # Data-dependent: skipped while torch.compile traces (the kernels check it themselves).
    if torch.compiler.is_compiling():
        return
    for name, t in tensors.items():
        if t is not None and not all_finite(t):
            raise ValueError(f"{op}: {name} contains NaN or Inf")


# On CUDA, backend="auto" runs eager PyTorch where it beats our kernels on an H200 (benchmarks/
# RESULTS.md, 2026-11-30), but only where it keeps their guarantees; backend="extension"
# always runs our kernels.
# - dense_graph_attention: torch's scaled_dot_product_attention, when its fused (flash /
#   memory-efficient) kernels apply: half or float32 inputs, head sizes that are multiples of
#   8 up to 256, and no gradient for the bias (SDPA would expand it to [B, H, Nq, Nk]).
#   Otherwise SDPA's plain path would build every [Nq, Nk] score matrix at once.
# - knn_graph: the reference (blocked matrix product and stable sort, same result), when
#   float32 products are exact (TF32 off): else its neighbours could differ from the kernel's.
def _sdpa_keeps_memory_bounded(q: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> bool:
    dims_ok = all(d % 8 == 0 and 0 < d <= 256 for d in (q.shape[-1], v.shape[-1]))
    dtype_ok = q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    return dims_ok and dtype_ok and (bias is None or not bias.requires_grad) and q.numel() > 0 and v.numel() > 0


def _exact_float32_products(x: torch.Tensor) -> bool:
    return x.dtype == torch.float64 or not torch.backends.cuda.matmul.allow_tf32


def _auto_on_cuda(t: torch.Tensor, backend: str) -> bool:
    return t.is_cuda and backend == "auto"


def _check_index_values(op: str, index: torch.Tensor, n_source: int) -> None:
    """Index values must be valid node ids (the reference path; kernels check it too)."""
    if torch.compiler.is_compiling() or index.numel() == 0:
        return
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= n_source:
        raise ValueError(f"{op}: index values must be in [0, N={n_source}), got values in [{low}, {high}]")


def _check_index(op: str, index: object, B: int, N: int) -> torch.Tensor:
    index = check_tensor(op, "index", index, ndim=3, shape_hint="[B, N, K]", dtypes=INDEX_DTYPES)
    if index.shape[0] != B or index.shape[1] != N:
        raise ValueError(f"{op}: index must be [B, N, K] = [{B}, {N}, K], got shape {tuple(index.shape)}")
    if index.shape[2] == 0:
        raise ValueError(f"{op}: index needs K >= 1 neighbours per node, got shape {tuple(index.shape)}")
    return index


def _check_scale(op: str, scale: object, head_dim: int) -> float:
    if scale is None:
        return graph_reference.default_scale(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def _check_qkv(op: str, q: object, k: object, v: object) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, ndim=4, shape_hint="[B, H, N, D]")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"{op}: k must be [B, H, N, D] with q's B, H, D {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{op}: v must be [B, H, N, Dv] with k's B, H, N {tuple(k.shape)}, got {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{op}: dtype mismatch: q is {q.dtype}, k is {k.dtype}, v is {v.dtype}")


def knn_graph(
    x: torch.Tensor,
    k: int,
    dilation: int = 1,
    bias: torch.Tensor | None = None,
    include_self: bool = True,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Dilated k-nearest-neighbour graph by cosine similarity.

    For ``x [B, N, C]`` returns ``index [B, N, k]`` (int64): for each node, its
    ``k * dilation`` most similar nodes by ``cos(x_i, x_j) + bias[i, j]`` in descending order,
    keeping every ``dilation``-th (positions 0, d, 2d, ...). ``bias [N, N]`` is an optional
    additive term (e.g. a relative-position prior). Ties of equal computed similarities go to
    the lowest index; in float64 (and in the reference) the similarities come from BLAS
    products, which can round duplicate rows differently in the last bit, so duplicates may
    rank in either order there (the float32 CPU kernel computes them alike). Without
    ``include_self`` a node is never its own neighbour. Memory is bounded by blocking (no
    [B, N, N] tensor). Not differentiable (the result is an index). On CUDA,
    ``backend="auto"`` runs the blocked reference (faster there, same result) unless TF32
    matrix products are enabled; ``backend="extension"`` selects our kernel.
    """
    op = "knn_graph"
    check_tensor(op, "x", x, ndim=3, shape_hint="[B, N, C]")
    B, N, C = x.shape
    if C == 0:
        raise ValueError(f"{op}: feature size C is 0")
    if not isinstance(include_self, bool):
        raise TypeError(f"{op}: include_self must be a bool, got {type(include_self).__name__}")
    check_int(op, "dilation", dilation, 1, 1 << 30, "max")
    candidates = N if include_self else N - 1
    check_int(op, "k", k, 1, 1 << 30, "max")
    if N > 0 and k * dilation > candidates:
        raise ValueError(
            f"{op}: k * dilation = {k * dilation} exceeds the {candidates} candidate neighbours "
            f"(N={N}{'' if include_self else ', self excluded'})"
        )
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=2, shape_hint="[N, N]")
        if tuple(bias.shape) != (N, N):
            raise ValueError(f"{op}: bias must be [N, N] = [{N}, {N}], got shape {tuple(bias.shape)}")
        check_same_device(op, x=x, bias=bias)
        bias = bias.to(x.dtype)
    eager = _auto_on_cuda(x, backend) and _exact_float32_products(x)
    if use_extension(op, x.device, backend) and _kernel_dtype_ok(x) and not eager:
        return torch.ops.slsg.knn_graph(x, k, dilation, bias, include_self)
    _check_finite(op, x=x, bias=bias)
    return graph_reference.knn_graph(x, k, dilation, bias, include_self)


def max_relative(x: torch.Tensor, index: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Max-relative aggregation: ``out[b, i, c] = max_{j in index[b, i, :]} (x[b, j, c] - x[b, i, c])``.

    ``x [B, N, C]``, ``index [B, N, K]`` (int64, values in [0, N)). Differentiable in x: the
    gradient goes to the first neighbour (in index order) attaining the maximum, and its
    negative to x_i.
    """
    op = "max_relative"
    check_tensor(op, "x", x, ndim=3, shape_hint="[B, N, C]")
    index = _check_index(op, index, x.shape[0], x.shape[1])
    check_same_device(op, x=x, index=index)
    if use_extension(op, x.device, backend) and _kernel_dtype_ok(x):
        return torch.ops.slsg.max_relative(x, index)
    _check_index_values(op, index, x.shape[1])
    return graph_reference.max_relative(x, index)


def sparse_graph_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention of each node over its K graph neighbours.

    ``out_i = sum_j softmax_j(scale * q_i . k_j + bias_ij) v_j`` over ``j = index[b, i, :]``,
    for ``q, k [B, H, N, D]``, ``v [B, H, N, Dv]``, ``index [B, N, K]`` (int64, shared by the
    heads) and an optional per-edge ``bias [B, H, N, K]``. ``scale`` defaults to 1/sqrt(D).
    Returns ``[B, H, N, Dv]``; differentiable in q, k, v and bias.
    """
    op = "sparse_graph_attention"
    _check_qkv(op, q, k, v)
    B, H, N, D = q.shape
    if k.shape[2] != N:
        raise ValueError(f"{op}: q and k must have the same N, got {N} and {k.shape[2]}")
    index = _check_index(op, index, B, N)
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=4, shape_hint="[B, H, N, K]")
        if tuple(bias.shape) != (B, H, N, index.shape[2]):
            raise ValueError(f"{op}: bias must be [B, H, N, K] = [{B}, {H}, {N}, {index.shape[2]}], got shape {tuple(bias.shape)}")
        bias = bias.to(q.dtype)
    check_same_device(op, q=q, k=k, v=v, index=index, bias=bias)
    scale = _check_scale(op, scale, D)
    if use_extension(op, q.device, backend) and _kernel_dtype_ok(q):
        return torch.ops.slsg.sparse_graph_attention(q, k, v, index, bias, scale)[0]
    _check_index_values(op, index, N)
    return graph_reference.sparse_graph_attention(q, k, v, index, bias, scale)


def dense_graph_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention of every node over all nodes, fused with an online softmax.

    ``out_i = sum_j softmax_j(scale * q_i . k_j + bias[h, i, j]) v_j`` for
    ``q [B, H, Nq, D]``, ``k [B, H, Nk, D]``, ``v [B, H, Nk, Dv]`` and an optional additive
    ``bias [H, Nq, Nk]`` (shared by the batch). ``scale`` defaults to 1/sqrt(D). The kernels
    work in tiles and hold no ``Nq x Nk`` buffer (unless ``KEPT_SCORES_MAX_BYTES`` is
    raised: an opt-in CPU copy of the scores for the backward). Returns
    ``[B, H, Nq, Dv]``; differentiable in q, k, v and bias. Passing one tensor as q and k
    (shared projections, as in the graph layer) makes the CPU backward cheaper: it forms
    that tensor's whole gradient with one matrix product fewer per tile (head sizes >= 32).
    On CUDA, ``backend="auto"`` runs
    ``torch.nn.functional.scaled_dot_product_attention`` where its fused kernels apply (half
    or float32, head sizes multiples of 8 up to 256, no bias gradient): faster there than our
    kernel. A row whose bias is all -inf may then give 0 (SDPA's convention in recent torch)
    rather than NaN. ``backend="extension"`` selects our kernel.
    """
    op = "dense_graph_attention"
    _check_qkv(op, q, k, v)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if Nk == 0 and Nq > 0:
        raise ValueError(f"{op}: k and v have no nodes (shape {tuple(k.shape)})")
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=3, shape_hint="[H, Nq, Nk]")
        if tuple(bias.shape) != (H, Nq, Nk):
            raise ValueError(f"{op}: bias must be [H, Nq, Nk] = [{H}, {Nq}, {Nk}], got shape {tuple(bias.shape)}")
        bias = bias.to(q.dtype)
    check_same_device(op, q=q, k=k, v=v, bias=bias)
    scale = _check_scale(op, scale, D)
    if _auto_on_cuda(q, backend) and k.numel() > 0 and _sdpa_keeps_memory_bounded(q, v, bias):
        # The bias [H, Nq, Nk] broadcasts over the batch, as a 4-D view: SDPA's fused kernels
        # take 2-D or 4-D masks (on CPU a 3-D one sends it to its plain path).
        mask = bias[None] if bias is not None else None
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if use_extension(op, q.device, backend) and _kernel_dtype_ok(q):
        kept = _kept_dense_slices(q, k, v, bias)
        return torch.ops.slsg.dense_graph_attention(q, k, v, bias, scale, kept)[0]
    return graph_reference.dense_graph_attention(q, k, v, bias, scale)


# The CPU forward can keep the pre-softmax scores [Nq, Nk] of (batch, head) pairs for the
# backward, which then skips one of its five matrix products per tile for them: the first
# pairs whose scores fit in KEPT_SCORES_MAX_BYTES (one buffer; keep it under glibc's largest
# mmap threshold, 32 MiB, or it is mapped and faulted in afresh on every step). Off by
# default since 2026-11-30: with the products of blas.h it saved 6-11% of the op's time at
# 1 head of 256 and nothing at 8 heads of 32 or in the graph layer (B = 8, N = 1024), and
# its 28 MiB put the op's peak memory above SDPA's fused kernel (62 against 36 MiB; 34
# without it; benchmarks/RESULTS.md). Raise it to trade memory for that time. The CUDA
# kernels always recompute (their tiles live in registers and shared memory).
KEPT_SCORES_MAX_BYTES = 0


def _kept_dense_slices(q, k, v, bias) -> int:
    """How many (batch, head) pairs the CPU forward keeps the scores of (0: none)."""
    if q.device.type != "cpu" or not torch.is_grad_enabled():
        return 0
    if not any(t is not None and t.requires_grad for t in (q, k, v, bias)):
        return 0
    B, H, Nq, _ = q.shape
    slice_bytes = Nq * k.shape[2] * q.element_size()
    # Strictly under the limit; a limit of 0 keeps none.
    return min(B * H, max(0, KEPT_SCORES_MAX_BYTES - 1) // slice_bytes) if slice_bytes else 0


# An extension built before the graph ops existed has no schemas for them: stay on the
# reference then.
_GRAPH_OPS_LOADED = EXTENSION_LOADED and hasattr(torch.ops.slsg, "dense_graph_attention_backward")

# The shared q/k backward is newer than the op: an older build lacks its argument.
_SHARED_QK_BACKWARD = _GRAPH_OPS_LOADED and any(
    a.name == "shared_qk" for a in torch.ops.slsg.dense_graph_attention_backward.default._schema.arguments
)

if _GRAPH_OPS_LOADED:

    @torch.library.register_fake("slsg::knn_graph")
    def _knn_graph_fake(x, k, dilation, bias, include_self):
        return x.new_empty((x.shape[0], x.shape[1], k), dtype=torch.long)

    @torch.library.register_fake("slsg::max_relative")
    def _max_relative_fake(x, index):
        return x.new_empty(x.shape)

    @torch.library.register_fake("slsg::max_relative_backward")
    def _max_relative_backward_fake(grad, x, index):
        return x.new_empty(x.shape)

    def _max_relative_setup(ctx, inputs, output):
        x, index = inputs
        # x and index are all the backward needs: the argmax is recomputed, not stored.
        ctx.save_for_backward(x, index)

    def _max_relative_backward(ctx, grad):
        x, index = ctx.saved_tensors
        return torch.ops.slsg.max_relative_backward(grad, x, index), None

    torch.library.register_autograd(
        "slsg::max_relative", _max_relative_backward, setup_context=_max_relative_setup
    )

    def _attention_fake(q, v):
        B, H, N, _ = q.shape
        out = q.new_empty((B, H, N, v.shape[3]))
        return out, q.new_empty((B, H, N), dtype=accumulation_dtype(q.dtype))

    @torch.library.register_fake("slsg::sparse_graph_attention")
    def _sparse_fake(q, k, v, index, bias, scale):
        return _attention_fake(q, v)

    @torch.library.register_fake("slsg::sparse_graph_attention_backward")
    def _sparse_backward_fake(grad_out, q, k, v, index, bias, lse, scale, bias_grad):
        B, H, N, _ = q.shape
        grad_bias = q.new_empty((B, H, N, index.shape[2]) if bias_grad else (0,))
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grad_bias

    def _sparse_setup(ctx, inputs, output):
        q, k, v, index, bias, scale = inputs
        ctx.scale = scale
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(q, k, v, index, bias, output[1])

    def _sparse_backward(ctx, grad_out, _grad_lse):
        q, k, v, index, bias, lse = ctx.saved_tensors
        bias_grad = ctx.has_bias and ctx.needs_input_grad[4]
        gq, gk, gv, gb = torch.ops.slsg.sparse_graph_attention_backward(
            grad_out, q, k, v, index, bias, lse, ctx.scale, bias_grad
        )
        return gq, gk, gv, None, gb if bias_grad else None, None

    torch.library.register_autograd(
        "slsg::sparse_graph_attention", _sparse_backward, setup_context=_sparse_setup
    )

    @torch.library.register_fake("slsg::dense_graph_attention")
    def _dense_fake(q, k, v, bias, scale, kept_slices=0):
        B, H, Nq, _ = q.shape
        if not 0 <= kept_slices <= B * H:  # as the kernel, so traced graphs fail alike
            raise RuntimeError(f"dense_graph_attention: kept_slices must be in [0, B * H] = [0, {B * H}], got {kept_slices}")
        scores = q.new_empty((kept_slices, Nq, k.shape[2]) if kept_slices else (0,))
        return (*_attention_fake(q, v), scores)

    @torch.library.register_fake("slsg::dense_graph_attention_backward")
    def _dense_backward_fake(grad_out, q, k, v, bias, out, lse, scores, scale, bias_grad, shared_qk=False):
        if shared_qk and q.shape != k.shape:  # as the kernel, so traced graphs fail alike
            raise RuntimeError(
                f"dense_graph_attention_backward: shared_qk needs k of q's shape {list(q.shape)}, got {list(k.shape)}"
            )
        H, Nq, Nk = q.shape[1], q.shape[2], k.shape[2]
        grad_bias = q.new_empty((H, Nq, Nk) if bias_grad else (0,))
        grad_k = k.new_empty((0,) if shared_qk else k.shape)
        return q.new_empty(q.shape), grad_k, v.new_empty(v.shape), grad_bias

    def _dense_setup(ctx, inputs, output):
        q, k, v, bias, scale, *_ = inputs
        out, lse, scores = output
        ctx.scale = scale
        ctx.has_bias = bias is not None
        # One tensor as q and k (the graph layer's shared projection): the CPU backward then
        # returns its whole gradient as dq with one matrix product fewer per tile.
        ctx.shared_qk = q is k and q.device.type == "cpu" and _SHARED_QK_BACKWARD
        ctx.mark_non_differentiable(lse, scores)
        # Else autograd hands the backward a zero-filled gradient for every output, scores
        # included: an [B, H, Nq, Nk] fill per step (13 ms of 510 in the layer at N = 1024).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, bias, out, lse, scores if scores.numel() else None)

    def _dense_backward(ctx, grad_out, _grad_lse, _grad_scores):
        if grad_out is None:  # out does not reach the loss
            return None, None, None, None, None, None
        q, k, v, bias, out, lse, scores = ctx.saved_tensors
        bias_grad = ctx.has_bias and ctx.needs_input_grad[3]
        gq, gk, gv, gb = torch.ops.slsg.dense_graph_attention_backward(
            grad_out, q, k, v, bias, out, lse, scores, ctx.scale, bias_grad, ctx.shared_qk
        )
        return gq, None if ctx.shared_qk else gk, gv, gb if bias_grad else None, None, None

    torch.library.register_autograd(
        "slsg::dense_graph_attention", _dense_backward, setup_context=_dense_setup
    )

    # The backward kernels have no backward of their own. Without an autograd entry for them,
    # a second derivative through these ops (create_graph=True, then backward again) would
    # silently miss their terms; with this one it raises instead, and only when a second
    # derivative actually reaches them (first derivatives under create_graph=True still work).
    def _no_second_derivative(op):
        def backward(ctx, *grads):
            raise RuntimeError(
                f"slsg.ops.{op}: second derivatives (double backward) are not supported by the compiled kernels; "
                f"use backend='reference' for them"
            )

        return backward

    for _op in ("max_relative", "sparse_graph_attention", "dense_graph_attention"):
        torch.library.register_autograd(
            f"slsg::{_op}_backward", _no_second_derivative(_op), setup_context=lambda ctx, inputs, output: None
        )
