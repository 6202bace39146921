"""Pure-PyTorch references of the graph ops (kNN graph, sparse and dense graph attention,
max-relative aggregation).

They define the semantics the compiled kernels must match, are the fallback when the
extension is missing (and for half precision on CPU), and their gradients come from plain
autograd. Clarity over speed; knn_graph chunks its rows so the fallback never builds a
[B, N, N] similarity tensor.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .reference import accumulation_dtype

# Elements of the [rows, N] similarity block knn_graph materialises at a time.
_CHUNK_ELEMS = 1 << 22

# F.normalize's default: zero vectors stay zero, so their cosine with anything is 0.
COSINE_EPS = 1e-12


def knn_graph(
    x: torch.Tensor,
    k: int,
    dilation: int = 1,
    bias: torch.Tensor | None = None,
    include_self: bool = True,
) -> torch.Tensor:
    """Indices [B, N, k] of the k * dilation most cosine-similar nodes of each node (plus the
    additive bias [N, N]), in descending order of similarity, keeping every dilation-th.

    Ties go to the lowest index (a stable descending sort). Without include_self, node i is
    never its own neighbour.
    """
    B, N, _ = x.shape
    acc = accumulation_dtype(x.dtype)
    x = x.to(acc)
    peak = x.abs().amax(-1, keepdim=True)
    # C * peak^2 <= 2^124 keeps the squared norm within float32; larger rows are scaled by a
    # power of two (exact; cosine similarity ignores a row's scale).
    limit = 2.0**62 / math.sqrt(x.shape[-1])
    if bool((peak > limit).any()):
        x = x * torch.where(peak > limit, torch.exp2(-torch.ceil(torch.log2(peak))), torch.ones_like(peak))
    xn = F.normalize(x, dim=-1, eps=COSINE_EPS)
    span = k * dilation
    out = torch.empty((B, N, k), dtype=torch.long, device=x.device)
    rows = max(1, _CHUNK_ELEMS // max(N, 1))
    for b in range(B):
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            sim = xn[b, r0:r1] @ xn[b].T
            if bias is not None:
                sim = sim + bias[r0:r1].to(acc)
            if not include_self:
                own = torch.arange(r0, r1, device=x.device)
                sim[own - r0, own] = -math.inf
            order = sim.sort(dim=1, descending=True, stable=True).indices
            out[b, r0:r1] = order[:, :span:dilation]
    return out


def _gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [B, H, N, D] gathered at index [B, M, K] -> [B, H, M, K, D]."""
    B, H, _, D = t.shape
    _, M, K = index.shape
    flat = index.reshape(B, 1, M * K, 1).expand(B, H, M * K, D)
    return torch.gather(t, 2, flat).reshape(B, H, M, K, D)


def default_scale(head_dim: int) -> float:
    """1 / sqrt(d): the attention scale when none is given."""
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def sparse_graph_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """out_i = sum_j softmax_j(scale * q_i . k_j + bias_ij) v_j over the K neighbours j =
    index[b, i, :] of node i; q, k [B, H, N, D], v [B, H, N, Dv], bias [B, H, N, K].
    Repeated neighbours count once per occurrence."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    dtype, acc = v.dtype, accumulation_dtype(q.dtype)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    keys = _gather_rows(k, index)  # [B, H, N, K, D]
    values = _gather_rows(v, index)  # [B, H, N, K, Dv]
    scores = torch.einsum("bhnd,bhnkd->bhnk", q, keys) * scale
    if bias is not None:
        scores = scores + bias.to(acc)
    weights = scores.softmax(dim=-1)
    return torch.einsum("bhnk,bhnkd->bhnd", weights, values).to(dtype)


def dense_graph_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """out_i = sum_j softmax_j(scale * q_i . k_j + bias[h, i, j]) v_j over all nodes;
    q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv], bias [H, Nq, Nk]."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    acc = accumulation_dtype(q.dtype)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(acc)
    return (scores.softmax(dim=-1) @ v.to(acc)).to(v.dtype)


def max_relative(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[b, i, c] = max over j in index[b, i, :] of (x[b, j, c] - x[b, i, c]).

    The gradient goes to the first neighbour (in index order) that attains the maximum,
    and its negative to x_i: torch.max's rule.
    """
    B, N, C = x.shape
    K = index.shape[-1]
    flat = index.reshape(B, N * K, 1).expand(B, N * K, C)
    neighbours = torch.gather(x, 1, flat).reshape(B, N, K, C)
    return neighbours.max(dim=2).values - x
