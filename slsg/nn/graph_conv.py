"""The self-attentive graph convolution of SLSG (docs/METHOD.md), generalised to several
heads and any grid size."""
from __future__ import annotations

import math

import torch
from torch import nn

from slsg import ops

from .pointwise import PointwiseConv2d
from .position import relative_position_similarity

SPARSE_AGGREGATIONS = ("max_relative", "attention")


class SelfAttentiveGraphConv(nn.Module):
    """Graph convolution over the H*W positions of a feature map, with a dense
    (self-attention) relation and a sparse (dilated kNN) relation.

    For ``x [B, C, H, W]`` with nodes ``x_i`` (N = H*W):

    1. ``q = k = BN(Conv1x1(x))``: one projection to ``proj_channels`` shared by queries and
       keys, split into ``heads`` heads of ``d = proj_channels / heads`` channels.
    2. Dense relation: ``h = x + W(sum_j softmax_j(q_i . k_j / sqrt(d)) v_j)`` with
       ``v = Conv3x3(x)`` and ``W`` a 1x1 conv. The 1/sqrt(d) scale is applied here; the
       authors' release omits it (their softmax sees unscaled dot products).
    3. Sparse relation: node j is a neighbour of i if it is among the ``k * dilation`` best
       by ``cos(q_i, k_j) + relative_position_weight * r_ij``, keeping every
       ``dilation``-th (k = 9, dilation = 3 by default). ``r_ij = 2 e_i . e_j / dim`` is the
       fixed similarity of 2-D sin-cos position embeddings (1 for i = j). The release's
       sign corresponds to ``relative_position_weight = -1`` (the default): it favours
       *distant* nodes, i.e. long-range relations; +1 favours nearby nodes, 0 ignores
       position. Aggregation is max-relative, ``m_i = max_{j in N(i)} (x_j - x_i)``, or
       with ``sparse_aggregation="attention"`` its soft version
       ``m_i = sum_j softmax_j(q_i . k_j / sqrt(d)) x_j - x_i`` over the neighbours.
    4. ``y = GELU(BN(GroupConv1x1([h; m])))`` with h and m interleaved channel by channel
       (as Vision GNN), so each group mixes both relations; ``out = x + BN(Conv1x1(y))``,
       ``y`` having 2C channels.

    Grids with fewer than ``k * dilation`` candidates use a smaller dilation (and k), so
    any N works. ``backend`` ("auto" | "extension" | "reference") picks the ops'
    implementation; both give the same outputs and gradients up to rounding, except that in
    float64 nodes with identical features may be ranked in either order by the kNN graph (see
    ``slsg.ops.knn_graph``): the outputs then agree, the input gradient goes to another of the
    identical nodes.
    """

    def __init__(
        self,
        channels: int,
        proj_channels: int | None = None,
        value_channels: int | None = None,
        heads: int = 1,
        k: int = 9,
        dilation: int = 3,
        relative_position_weight: float = -1.0,
        include_self: bool = True,
        groups: int = 4,
        sparse_aggregation: str = "max_relative",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        proj_channels = proj_channels if proj_channels is not None else max(heads, channels // 2)
        value_channels = value_channels if value_channels is not None else proj_channels
        for name, value in (("channels", channels), ("proj_channels", proj_channels), ("value_channels", value_channels),
                            ("heads", heads), ("k", k), ("dilation", dilation), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SelfAttentiveGraphConv: {name} must be a positive int, got {value!r}")
        if proj_channels % heads or value_channels % heads:
            raise ValueError(
                f"SelfAttentiveGraphConv: proj_channels ({proj_channels}) and value_channels "
                f"({value_channels}) must be divisible by heads ({heads})"
            )
        if (2 * channels) % groups:
            raise ValueError(f"SelfAttentiveGraphConv: 2 * channels ({2 * channels}) must be divisible by groups ({groups})")
        if sparse_aggregation not in SPARSE_AGGREGATIONS:
            raise ValueError(f"SelfAttentiveGraphConv: sparse_aggregation must be one of {SPARSE_AGGREGATIONS}, got {sparse_aggregation!r}")
        if sparse_aggregation == "attention" and channels % heads:
            raise ValueError(f"SelfAttentiveGraphConv: attention aggregation needs channels ({channels}) divisible by heads ({heads})")
        if backend not in ("auto", "extension", "reference"):
            raise ValueError(f"SelfAttentiveGraphConv: backend must be 'auto', 'extension' or 'reference', got {backend!r}")
        self.channels, self.proj_channels, self.value_channels = channels, proj_channels, value_channels
        self.heads, self.k, self.dilation = heads, k, dilation
        self.relative_position_weight = float(relative_position_weight)
        self.include_self = include_self
        self.sparse_aggregation = sparse_aggregation
        self.backend = backend
        self.position_dim = max(4, proj_channels - proj_channels % 4)

        self.query_key = nn.Sequential(PointwiseConv2d(channels, proj_channels, bias=False), nn.BatchNorm2d(proj_channels))
        self.value = nn.Conv2d(channels, value_channels, 3, padding=1)
        self.dense_out = PointwiseConv2d(value_channels, channels)
        self.fuse = nn.Sequential(
            PointwiseConv2d(2 * channels, 2 * channels, groups=groups, bias=False), nn.BatchNorm2d(2 * channels), nn.GELU()
        )
        self.project = nn.Sequential(PointwiseConv2d(2 * channels, channels, bias=False), nn.BatchNorm2d(channels))
        self._position_cache: dict[tuple, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, proj_channels={self.proj_channels}, value_channels={self.value_channels}, "
            f"heads={self.heads}, k={self.k}, dilation={self.dilation}, "
            f"relative_position_weight={self.relative_position_weight}, sparse_aggregation={self.sparse_aggregation!r}, "
            f"backend={self.backend!r}"
        )

    def neighbourhood(self, nodes: int) -> tuple[int, int]:
        """(k, dilation) used for a graph of `nodes` nodes: the configured ones when there are
        enough candidates, else a smaller dilation, then a smaller k. A single node is its own
        neighbour even without include_self (there is no other)."""
        candidates = nodes if self._includes_self(nodes) else nodes - 1
        k = min(self.k, max(1, candidates))
        return k, max(1, min(self.dilation, candidates // k))

    def _includes_self(self, nodes: int) -> bool:
        return self.include_self or nodes == 1

    def position_bias(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The [N, N] term added to the cosine similarities (None when the weight is 0)."""
        if self.relative_position_weight == 0.0:
            return None
        key = (height, width, device, dtype, float(self.relative_position_weight))
        if key not in self._position_cache:
            r = relative_position_similarity(self.position_dim, height, width)
            self._position_cache = {key: (self.relative_position_weight * r).to(device=device, dtype=dtype)}
        return self._position_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"SelfAttentiveGraphConv: expected x of shape [B, {self.channels}, H, W], got {tuple(x.shape)}")
        B, C, H, W = x.shape
        N = H * W
        heads, d = self.heads, self.proj_channels // self.heads
        scale = 1.0 / math.sqrt(d)

        qk = self.query_key(x)  # [B, P, H, W]
        # Node-major copies made once here, so the kernels (and their saved tensors for the
        # backward) need none of their own.
        q = qk.reshape(B, heads, d, N).transpose(2, 3).contiguous()  # [B, heads, N, d]
        v = self.value(x).reshape(B, heads, self.value_channels // heads, N).transpose(2, 3).contiguous()
        attended = ops.dense_graph_attention(q, q, v, scale=scale, backend=self.backend)
        h = x + self.dense_out(attended.transpose(2, 3).reshape(B, self.value_channels, H, W))

        k, dilation = self.neighbourhood(N)
        with torch.no_grad():
            # Neighbours chosen in at least float32: in bf16 / fp16 (autocast) the rounded
            # similarities and position term would pick other neighbours; this step is cheap.
            features = qk.detach().flatten(2).transpose(1, 2)  # [B, N, P]
            if features.dtype in (torch.float16, torch.bfloat16):
                features = features.float()
            bias = self.position_bias(H, W, x.device, features.dtype)
            index = ops.knn_graph(features, k, dilation, bias, self._includes_self(N), backend=self.backend)
        nodes = x.flatten(2).transpose(1, 2).contiguous()  # [B, N, C]
        if self.sparse_aggregation == "max_relative":
            m = ops.max_relative(nodes, index, backend=self.backend)
        else:
            # Under autocast q comes out of a convolution in half precision while x does not.
            values = nodes.to(q.dtype).reshape(B, N, heads, C // heads).transpose(1, 2)  # [B, heads, N, C/heads]
            m = ops.sparse_graph_attention(q, q, values, index, scale=scale, backend=self.backend)
            m = m.transpose(1, 2).reshape(B, N, C).to(nodes.dtype) - nodes
        m = m.transpose(1, 2).reshape(B, C, H, W)

        y = self.fuse(torch.stack([h, m], dim=2).reshape(B, 2 * C, H, W))  # channels h0, m0, h1, m1, ...
        return x + self.project(y)
