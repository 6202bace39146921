"""Graph ops side by side with their eager references, per size: time and peak extra memory,
forward ("fwd") and forward + backward ("fwd+bwd").

    pytest benchmarks/test_graph_bench.py --benchmark-only --benchmark-json=graph.json
    python benchmarks/render.py graph.json --baseline extension

Variants:
- extension: slsg.ops with the compiled kernels.
- reference: slsg.ops.graph_reference, the pure-PyTorch fallback (plain autograd).
- matmul_topk (knn_graph): what one writes by hand, normalise + (b)addbmm + topk over a
  [B, N, N] matrix, keeping every dilation-th.
- sdpa (dense_graph_attention): torch.nn.functional.scaled_dot_product_attention with the
  same additive bias as attn_mask, given 4-D ([1, H, N, N]) so that SDPA can run its fused
  (flash) CPU kernel: with the 3-D [H, N, N] bias it falls back to its math path, which
  materialises [B, H, N, N] and is slower (runs before 2026-11-30 15:19 UTC compared
  against that path).
- pyg (sparse_graph_attention): PyTorch Geometric's formulation (GATConv / TransformerConv):
  gather per edge, torch_geometric.utils.softmax over each node's edges, scatter-sum. The
  inputs are given in PyG's [nodes, heads, D] layout outside the timed region.
- layer rows: slsg.nn.SelfAttentiveGraphConv with backend="extension" or "reference".
- paired rows (the layer at N = 1024; dense attention with 1 head against SDPA): the two
  variants alternate round by round, so that both see the same moments of this machine,
  whose speed drifts by 10-40% within minutes; reported as the median and range of the
  per-round ratios (render.py prints them under the table).

Peak memory: benchmarks/memory.py (peak RSS above the RSS before the call, via
/proc/self/clear_refs and VmHWM, in an untimed call with an allocator that returns freed
memory to the OS at once; the timed calls run with glibc's steady-state thresholds).
"""
import math
import statistics
import time
import zlib

import pytest
import torch
import torch.nn.functional as F

from slsg import ops
from slsg.nn import SelfAttentiveGraphConv
from slsg.nn.position import relative_position_similarity
from slsg.ops import graph_reference

from .memory import bench_once

try:
    from torch_geometric.utils import scatter as pyg_scatter
    from torch_geometric.utils import softmax as pyg_softmax
except Exception:  # noqa: BLE001  (missing or broken install: re-implemented below)
    pyg_scatter = pyg_softmax = None

B, C, K, DILATION = 8, 256, 9, 3
NODES = [256, 1024, 4096]
HEADS = [1, 8]


def rounds_for(work: float) -> int:
    """Timed rounds (after one untimed call that measures memory, when more than one):
    fewer for the big cases so the whole file runs in about 4 minutes on 2 cores, many for
    the millisecond cases, whose times scatter by tens of percent from round to round."""
    return 20 if work < 2e8 else 3 if work < 2e9 else 2 if work < 1e11 else 1


def fwd_bwd(fn, inputs, parameters=()):
    """fn(*inputs) then the gradients (inputs and `parameters`) of a fixed random
    projection of the output."""
    leaves = [t.detach().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    wanted = [t for t in leaves if t is not None and t.requires_grad] + list(parameters)
    probe = {}

    def run():
        out = fn(*leaves)
        if "grad" not in probe:
            probe["grad"] = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        return torch.autograd.grad(out, wanted, probe["grad"])

    return run


def grid(n: int) -> tuple[int, int]:
    side = int(math.isqrt(n))
    return side, n // side


@pytest.fixture(scope="module")
def data():
    cache = {}

    def get(kind, *key):
        if (kind, *key) not in cache:
            g = torch.Generator().manual_seed(zlib.crc32(repr((kind, *key)).encode()))
            if kind == "nodes":  # x [B, N, C]
                (n,) = key
                cache[(kind, *key)] = torch.randn(B, n, C, generator=g)
            elif kind == "index":
                (n,) = key
                cache[(kind, *key)] = torch.randint(0, n, (B, n, K), generator=g)
            elif kind == "position":
                (n,) = key
                cache[(kind, *key)] = -relative_position_similarity(64, *grid(n)).float()
            elif kind == "qkv":
                n, h = key
                cache[(kind, *key)] = tuple(torch.randn(B, h, n, C // h, generator=g) for _ in range(3))
            elif kind == "dense_bias":
                n, h = key
                cache[(kind, *key)] = 0.1 * torch.randn(h, n, n, generator=g)
        return cache[(kind, *key)]

    return get


# ---- knn_graph -----------------------------------------------------------------------------


def matmul_topk(x, k, dilation, bias):
    xn = F.normalize(x, dim=-1)
    sim = torch.baddbmm(bias.expand(x.shape[0], -1, -1), xn, xn.transpose(1, 2))
    return sim.topk(k * dilation, dim=-1).indices[:, :, ::dilation]


@pytest.mark.parametrize("variant", ["extension", "matmul_topk", "reference"])
@pytest.mark.parametrize("N", NODES)
def test_knn_graph(benchmark, data, N, variant):
    if variant == "reference" and N > 1024:
        pytest.skip("the sort-based reference takes minutes at N=4096")
    x, bias = data("nodes", N), data("position", N)
    fn = {
        "extension": lambda: ops.knn_graph(x, K, DILATION, bias),
        "matmul_topk": lambda: matmul_topk(x, K, DILATION, bias),
        "reference": lambda: graph_reference.knn_graph(x, K, DILATION, bias),
    }[variant]
    benchmark.group = f"knn_graph B={B} N={N} C={C} k={K} dilation={DILATION} (+bias)"
    bench_once(benchmark, fn, rounds=rounds_for(B * N * N * C))


# ---- max_relative --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["extension", "reference"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("N", NODES)
def test_max_relative(benchmark, data, N, mode, variant):
    x, index = data("nodes", N), data("index", N)
    op = ops.max_relative if variant == "extension" else graph_reference.max_relative
    fn = (lambda: op(x, index)) if mode == "fwd" else fwd_bwd(op, (x, index))
    benchmark.group = f"max_relative {mode} B={B} N={N} C={C} K={K}"
    bench_once(benchmark, fn, rounds=rounds_for(20 * B * N * C * K))


# ---- sparse_graph_attention ----------------------------------------------------------------


def pyg_attention(q, k, v, src, dst, num_nodes, scale):
    """PyG's formulation on [nodes, heads, D] tensors and an edge list (src -> dst)."""
    alpha = (q[dst] * k[src]).sum(-1) * scale  # [E, H]
    if pyg_softmax is not None:
        alpha = pyg_softmax(alpha, dst, num_nodes=num_nodes)
        return pyg_scatter(alpha.unsqueeze(-1) * v[src], dst, dim=0, dim_size=num_nodes, reduce="sum")
    # The same steps without PyG installed: segment max, exp, segment sum, scatter-add.
    index = dst.unsqueeze(-1).expand_as(alpha)
    seg_max = torch.full((num_nodes, alpha.shape[1]), -math.inf).scatter_reduce(0, index, alpha, "amax")
    alpha = (alpha - seg_max[dst]).exp()
    alpha = alpha / torch.zeros(num_nodes, alpha.shape[1]).index_add(0, dst, alpha)[dst]
    return torch.zeros(num_nodes, *v.shape[1:]).index_add(0, dst, alpha.unsqueeze(-1) * v[src])


def pyg_inputs(q, k, v, index):
    """[B, H, N, D] -> [B*N, H, D] and the graph as an edge list over the flattened nodes."""
    Bq, H, N, _ = q.shape
    flat = [t.transpose(1, 2).reshape(Bq * N, H, t.shape[-1]).contiguous() for t in (q, k, v)]
    offsets = (torch.arange(Bq) * N).view(Bq, 1, 1)
    src = (index + offsets).reshape(-1)
    dst = torch.arange(Bq * N).repeat_interleave(index.shape[-1])
    return flat, src, dst, Bq * N


@pytest.mark.parametrize("variant", ["extension", "reference", "pyg"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("H", HEADS)
@pytest.mark.parametrize("N", NODES)
def test_sparse_graph_attention(benchmark, data, N, H, mode, variant):
    q, k, v = data("qkv", N, H)
    index = data("index", N)
    scale = 1 / math.sqrt(C // H)
    if variant == "pyg":
        (qf, kf, vf), src, dst, nodes = pyg_inputs(q, k, v, index)
        op = lambda a, b, c: pyg_attention(a, b, c, src, dst, nodes, scale)  # noqa: E731
        inputs = (qf, kf, vf)
    else:
        impl = ops.sparse_graph_attention if variant == "extension" else graph_reference.sparse_graph_attention
        op = lambda a, b, c: impl(a, b, c, index, None, scale)  # noqa: E731
        inputs = (q, k, v)
    fn = (lambda: op(*inputs)) if mode == "fwd" else fwd_bwd(op, inputs)
    benchmark.group = f"sparse_graph_attention {mode} B={B} H={H} N={N} D={C // H} K={K}"
    bench_once(benchmark, fn, rounds=rounds_for(20 * B * N * C * K))


# ---- dense_graph_attention -----------------------------------------------------------------


@pytest.mark.parametrize("variant", ["extension", "sdpa", "reference"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("H", HEADS)
@pytest.mark.parametrize("N", NODES)
def test_dense_graph_attention(benchmark, data, N, H, mode, variant):
    if variant == "reference" and N > 1024:
        pytest.skip("the reference materialises [B, H, N, N] (GiBs at N=4096)")
    q, k, v = data("qkv", N, H)
    bias = data("dense_bias", N, H)
    op = {
        "extension": lambda a, b, c: ops.dense_graph_attention(a, b, c, bias),
        "sdpa": lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=bias[None]),
        "reference": lambda a, b, c: graph_reference.dense_graph_attention(a, b, c, bias),
    }[variant]
    fn = (lambda: op(q, k, v)) if mode == "fwd" else fwd_bwd(op, (q, k, v))
    benchmark.group = f"dense_graph_attention {mode} B={B} H={H} N={N} D={C // H} (+bias [H, N, N])"
    bench_once(benchmark, fn, rounds=rounds_for(4 * B * N * N * C))


# ---- the layer -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["extension", "reference"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("H", HEADS)
@pytest.mark.parametrize("N", [256, 1024])
def test_self_attentive_graph_conv(benchmark, data, N, H, mode, variant):
    torch.manual_seed(0)
    layer = SelfAttentiveGraphConv(C, heads=H, backend=variant).train()
    x = data("nodes", N).transpose(1, 2).reshape(B, C, *grid(N)).contiguous()
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return layer(x)
    else:
        fn = fwd_bwd(layer, (x,), layer.parameters())
    benchmark.group = f"SelfAttentiveGraphConv {mode} B={B} C={C} heads={H} N={N}"
    bench_once(benchmark, fn, rounds=rounds_for(40 * B * N * C * C))


PAIRED_ROUNDS = 8


def paired_rounds(benchmark, runs: dict, group: str) -> None:
    """Times runs["extension"] and its peer (the other entry) alternately, PAIRED_ROUNDS
    rounds after one warm-up each, and records the per-round ratios peer / extension."""
    (peer,) = [name for name in runs if name != "extension"]
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}

    def pair():
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    benchmark.group = group
    benchmark.pedantic(pair, rounds=PAIRED_ROUNDS, iterations=1)
    ratios = sorted(p / e for p, e in zip(times[peer], times["extension"]))
    benchmark.extra_info["paired"] = {
        "rounds": PAIRED_ROUNDS,
        "peer": peer,
        "extension_s": times["extension"],
        "peer_s": times[peer],
        "ratio_median": statistics.median(ratios),
        "ratio_min": ratios[0],
        "ratio_max": ratios[-1],
        "ratio_of_minima": min(times[peer]) / min(times["extension"]),
    }


@pytest.mark.parametrize("H", HEADS)
def test_self_attentive_graph_conv_paired(benchmark, data, H):
    N = 1024
    x = data("nodes", N).transpose(1, 2).reshape(B, C, *grid(N)).contiguous()
    runs = {}
    for variant in ("extension", "reference"):
        torch.manual_seed(0)
        layer = SelfAttentiveGraphConv(C, heads=H, backend=variant).train()
        runs[variant] = fwd_bwd(layer, (x,), layer.parameters())
    paired_rounds(benchmark, runs, f"SelfAttentiveGraphConv fwd+bwd B={B} C={C} heads={H} N={N}, paired rounds")


@pytest.mark.parametrize("N", [256, 1024])
def test_dense_graph_attention_paired(benchmark, data, N):
    H = 1  # the case whose ratio to SDPA sits near 1
    q, k, v = data("qkv", N, H)
    bias = data("dense_bias", N, H)
    runs = {
        "extension": fwd_bwd(lambda a, b, c: ops.dense_graph_attention(a, b, c, bias), (q, k, v)),
        "sdpa": fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=bias[None]), (q, k, v)),
    }
    paired_rounds(benchmark, runs, f"dense_graph_attention fwd+bwd B={B} H={H} N={N} D={C // H} (+bias), paired rounds")
