import math

import pytest
import torch
import torch.nn.functional as F

from slsg import ops
from slsg.ops import graph_reference

from .graph_helpers import generator, kernel_backend, peak_rss_increase_mib
from .helpers import devices, needs_cuda, needs_extension, noncontiguous


def brute_force_knn(x, k, dilation=1, bias=None, include_self=True):
    """Independent definition: per node, sort all candidates by (-similarity, index) in
    float64 with Python's sort, then keep every dilation-th."""
    xn = F.normalize(x.double(), dim=-1)
    B, N, _ = x.shape
    out = torch.empty(B, N, k, dtype=torch.long)
    for b in range(B):
        sim = xn[b] @ xn[b].T
        if bias is not None:
            sim = sim + bias.double()
        for i in range(N):
            order = sorted((j for j in range(N) if include_self or j != i), key=lambda j: (-float(sim[i, j]), j))
            out[b, i] = torch.tensor(order[: k * dilation : dilation])
    return out


def similarity_of(x, index, bias=None):
    """cos(x_i, x_index) (+ bias) in float64: what the chosen neighbours score."""
    xn = F.normalize(x.double().cpu(), dim=-1)
    index = index.cpu()
    B, N, k = index.shape
    sims = torch.einsum("bnc,bnkc->bnk", xn, xn[torch.arange(B)[:, None, None], index])
    if bias is not None:
        sims = sims + bias.double().cpu()[torch.arange(N)[:, None], index]
    return sims


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "B,N,C,k,dilation",
    [(1, 1, 1, 1, 1), (2, 9, 3, 3, 3), (3, 40, 5, 4, 2), (1, 300, 16, 9, 3), (2, 517, 7, 5, 1), (2, 300, 300, 5, 2)],
)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("include_self", [True, False])
def test_matches_reference(device, B, N, C, k, dilation, with_bias, include_self):
    if not include_self and k * dilation > N - 1:
        pytest.skip("not enough candidates without self")
    g = generator(B, N, C, k, dilation)
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    bias = 0.3 * torch.randn(N, N, generator=g, dtype=torch.float64) if with_bias else None
    expected = graph_reference.knn_graph(x, k, dilation, bias, include_self)
    if N <= 40:  # the reference itself agrees with a plain sort
        assert torch.equal(expected, brute_force_knn(x, k, dilation, bias, include_self))
    for dtype in (torch.float64, torch.float32):
        xd = x.to(device=device, dtype=dtype)
        bd = bias.to(device=device, dtype=dtype) if with_bias else None
        index = ops.knn_graph(xd, k, dilation, bd, include_self, backend=kernel_backend(device))
        assert index.shape == (B, N, k) and index.dtype == torch.long and index.device.type == device
        if dtype == torch.float64:
            assert torch.equal(index.cpu(), expected)
        else:
            # float32 rounding may swap near-ties: the chosen neighbours must score the same.
            torch.testing.assert_close(similarity_of(x, index, bias), similarity_of(x, expected, bias), atol=1e-5, rtol=0)
        if not include_self:
            assert not (index.cpu() == torch.arange(N)[None, :, None]).any()


def kernel_floor_sample(N):
    """The nodes the CPU kernel samples to guess each node's rejection threshold (its
    FloorSample in csrc/cpu/graph.cpp: golden-ratio steps through the node order)."""
    samples = min(N, max(64, min(N // 16, 256)))
    step = int(0.6180339887 * N) | 1
    while math.gcd(step, N) != 1:
        step += 2
    return sorted((t * step) % N for t in range(samples))


@pytest.mark.parametrize("B", [1, 3])  # one item: tiles in parallel; several: items in parallel
@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize("N", [600, 200])
def test_threshold_guessed_too_high_is_recomputed(B, include_self, N):
    # A bias that ranks the kernel's sampled nodes above all others makes its guessed
    # threshold (a high rank among the sample) admit fewer than k * dilation candidates for
    # every node, so every list must be recomputed; the result must still be exact. Graphs
    # of one tile (N <= 256) sample every 4th node of each row instead.
    C, k, dilation = 8, 9, 3
    g = generator(B, N, C, 99)
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    bias = 0.01 * torch.randn(N, N, generator=g, dtype=torch.float64)
    bias[:, kernel_floor_sample(N) if N > 256 else slice(0, N, 4)] += 5.0
    expected = graph_reference.knn_graph(x, k, dilation, bias, include_self)
    assert torch.equal(ops.knn_graph(x, k, dilation, bias, include_self), expected)
    index = ops.knn_graph(x.float(), k, dilation, bias.float(), include_self)
    torch.testing.assert_close(similarity_of(x, index, bias), similarity_of(x, expected, bias), atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(device, dtype):
    g = generator(11)
    x = torch.randn(2, 64, 8, generator=g)
    index = ops.knn_graph(x.to(device, dtype), 4, 2, backend=kernel_backend(device))
    assert index.shape == (2, 64, 4) and index.dtype == torch.long
    reference = graph_reference.knn_graph(x.to(dtype), 4, 2)
    torch.testing.assert_close(similarity_of(x, index), similarity_of(x, reference), atol=2e-2, rtol=0)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_exact_ties_go_to_lowest_index(backend):
    # One-hot rows make every cosine exactly 0 or 1, so ties are real ties.
    e = torch.eye(3)
    x = torch.stack([e[0], e[1], e[0], e[2], e[0], e[1]]).unsqueeze(0)  # nodes 0, 2, 4 identical
    index = ops.knn_graph(x, 6, backend=backend)
    assert index[0, 0].tolist() == [0, 2, 4, 1, 3, 5]
    assert index[0, 1].tolist() == [1, 5, 0, 2, 3, 4]
    assert index[0, 3].tolist() == [3, 0, 1, 2, 4, 5]
    # Without self, node 2's best matches are 0 and 4 (tied), then the zeros in index order.
    assert ops.knn_graph(x, 5, include_self=False, backend=backend)[0, 2].tolist() == [0, 4, 1, 3, 5]
    # dilation keeps positions 0, 2, 4 of the sorted list.
    assert ops.knn_graph(x, 3, dilation=2, backend=backend)[0, 0].tolist() == [0, 4, 3]
    # A bias can create ties too, and break them.
    bias = torch.zeros(6, 6)
    bias[0, 5] = 1.0  # node 5 now ties with the identical nodes (cos 0 + 1 = 1)
    assert ops.knn_graph(x, 4, bias=bias, backend=backend)[0, 0].tolist() == [0, 2, 4, 5]
    bias[0, 2] = 0.5
    assert ops.knn_graph(x, 4, bias=bias, backend=backend)[0, 0].tolist() == [2, 0, 4, 5]


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bias_can_outweigh_similarity(backend):
    # The relative-position term decides when features are uninformative.
    x = torch.ones(1, 5, 4)
    bias = torch.arange(5.0).view(5, 1) - torch.arange(5.0).view(1, 5)  # bias[i, j] = i - j: largest at j = 0
    index = ops.knn_graph(x, 2, bias=bias, backend=backend)
    assert index[0, :, 0].tolist() == [0, 0, 0, 0, 0]
    assert ops.knn_graph(x, 2, bias=-bias, backend=backend)[0, :, 0].tolist() == [4, 4, 4, 4, 4]


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_zero_vectors_have_cosine_zero(backend):
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]])
    index = ops.knn_graph(x, 4, backend=backend)
    assert index[0, 1].tolist() == [1, 0, 3, 2]  # 1, then the zero vectors (0), then -1
    assert index[0, 0].tolist() == [0, 1, 2, 3]  # all cosines 0: index order


@needs_extension
def test_noncontiguous_inputs():
    g = generator(2)
    x = torch.randn(2, 70, 6, generator=g)
    bias = torch.randn(70, 70, generator=g)
    expected = ops.knn_graph(x, 5, 2, bias)
    torch.testing.assert_close(ops.knn_graph(noncontiguous(x), 5, 2, noncontiguous(bias)), expected)
    torch.testing.assert_close(ops.knn_graph(x.transpose(0, 1).contiguous().transpose(0, 1), 5, 2, bias.t().contiguous().t()), expected)


@needs_extension
def test_many_tiles_and_batch_items_agree_with_reference():
    # N spans several 256-row tiles (odd count: round-robin with a bye); B=1 takes the
    # tile-parallel path, B=3 the item-parallel one.
    g = generator(3)
    x = torch.randn(3, 777, 12, generator=g, dtype=torch.float64)
    bias = 0.2 * torch.randn(777, 777, generator=g, dtype=torch.float64)
    for xs in (x[:1], x):
        assert torch.equal(ops.knn_graph(xs, 9, 3, bias), graph_reference.knn_graph(xs, 9, 3, bias))


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_ties_across_tiles_go_to_lowest_index(dtype):
    # 700 nodes drawn from 5 one-hot vectors: each node has about 140 exact ties (cosine 1),
    # spread over three tiles, more than a node's candidate buffer holds, so the kernel
    # must cut among equal values, from tiles visited out of node order, by index.
    g = generator(11)
    labels = torch.randint(0, 5, (3, 700), generator=g)
    x = torch.eye(5, dtype=dtype)[labels]
    for xs in (x[:1], x):  # tile-parallel and item-parallel paths
        for include_self in (True, False):
            expected = graph_reference.knn_graph(xs, 9, 3, None, include_self)
            assert torch.equal(ops.knn_graph(xs, 9, 3, None, include_self), expected)


@needs_extension
@pytest.mark.parametrize("N", [200, 700])
def test_ties_among_a_few_dozen_candidates_go_to_lowest_index(N):
    # Nodes with four ones among eight channels: every cosine is an exact multiple of 1/4,
    # so a node's few dozen candidates above its threshold hold many exact ties. The CPU
    # kernel ranks such small sets by counting (float32) and must then break ties by index.
    g = generator(21)
    picks = torch.rand(3, N, 8, generator=g).argsort(dim=-1)[..., :4]
    x = torch.zeros(3, N, 8).scatter_(-1, picks, 1.0)
    bias = torch.zeros(N, N)
    bias[:, ::7] = 0.25  # moves some candidates up a level, onto others' values
    for xs in (x[:1], x):
        for b in (None, bias):
            for include_self in (True, False):
                expected = graph_reference.knn_graph(xs, 9, 3, b, include_self)
                assert torch.equal(ops.knn_graph(xs, 9, 3, b, include_self), expected)


@needs_extension
@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_large_graphs_with_a_position_bias_agree_with_reference(include_self, sign):
    # N >= 1024 turns on the kernel's sampled lower bounds; a bias that favours distant
    # (sign +1) or nearby (sign -1) nodes puts the best candidates in the last or the first
    # tiles it visits. Both backends must still return exactly the reference's lists.
    g = generator(9)
    side = 33
    x = torch.randn(2, side * side, 16, generator=g, dtype=torch.float64)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1).double()
    bias = sign * torch.cdist(pos, pos) / side
    expected = graph_reference.knn_graph(x, 9, 3, bias, include_self)
    assert torch.equal(ops.knn_graph(x, 9, 3, bias, include_self), expected)
    assert torch.equal(ops.knn_graph(x[:1], 9, 3, bias, include_self), expected[:1])
    single = ops.knn_graph(x.float(), 9, 3, bias.float(), include_self)
    torch.testing.assert_close(similarity_of(x, single, bias), similarity_of(x, expected, bias), atol=1e-5, rtol=0)


def test_empty_batch_and_nodes():
    assert ops.knn_graph(torch.randn(0, 5, 3), 2).shape == (0, 5, 2)
    assert ops.knn_graph(torch.randn(2, 0, 3), 2).shape == (2, 0, 2)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((torch.randn(5, 3), 1), {}, "x must be 3-D"),
        ((torch.randn(1, 5, 3).int(), 1), {}, "dtype"),
        ((torch.randn(1, 5, 0), 1), {}, "C is 0"),
        ((torch.randn(1, 5, 3), 0), {}, "k must be in"),
        ((torch.randn(1, 5, 3), 2), {"dilation": 0}, "dilation must be in"),
        ((torch.randn(1, 5, 3), 3), {"dilation": 2}, "k \\* dilation = 6 exceeds the 5"),
        ((torch.randn(1, 5, 3), 5), {"include_self": False}, "exceeds the 4 candidate neighbours"),
        ((torch.randn(1, 5, 3), 2), {"bias": torch.randn(5, 4)}, r"bias must be \[N, N\] = \[5, 5\]"),
        ((torch.randn(1, 5, 3), 2), {"bias": torch.randn(25)}, "bias must be 2-D"),
        ((torch.randn(1, 5, 3), 2.0), {}, "k must be an int"),
        ((torch.randn(1, 5, 3), 2), {"include_self": 1}, "include_self must be a bool"),
    ],
)
def test_bad_input_names_the_problem(args, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ops.knn_graph(*args, **kwargs)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_non_finite_input_is_rejected(backend):
    x = torch.randn(1, 6, 3)
    x[0, 2, 1] = float("nan")
    with pytest.raises((RuntimeError, ValueError), match="x contains NaN or Inf"):
        ops.knn_graph(x, 2, backend=backend)
    bias = torch.zeros(6, 6)
    bias[1, 1] = float("inf")
    with pytest.raises((RuntimeError, ValueError), match="bias contains NaN or Inf"):
        ops.knn_graph(torch.randn(1, 6, 3), 2, bias=bias, backend=backend)


@needs_extension
def test_opcheck():
    g = generator(5)
    x = torch.randn(2, 30, 4, generator=g)
    for bias, include_self in ((None, True), (torch.randn(30, 30, generator=g), False)):
        torch.library.opcheck(torch.ops.slsg.knn_graph.default, (x, 4, 2, bias, include_self))
    torch.library.opcheck(torch.ops.slsg.knn_graph.default, (x.double(), 3, 1, None, True))


@needs_extension
def test_torch_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def neighbours(x, bias):
        return ops.knn_graph(x, 3, 2, bias) * 2

    g = generator(6)
    x, bias = torch.randn(2, 40, 5, generator=g), torch.randn(40, 40, generator=g)
    torch.testing.assert_close(neighbours(x, bias), ops.knn_graph(x, 3, 2, bias) * 2)


@needs_extension
def test_memory_is_bounded_at_4096_nodes():
    # [B, N, N] in float32 would be 256 MiB; the blocked kernel needs a few tiles and lists.
    grew = peak_rss_increase_mib(
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(4, 4096, 8, generator=g)\n"
        "bias = torch.randn(4096, 4096, generator=g) * 0.01\n"
        "slsg.ops.knn_graph(x[:, :300], 9, 3)  # warm up allocator and threads\n"
        "# measure\n"
        "index = slsg.ops.knn_graph(x, 9, 3, bias)\n"
        "assert index.shape == (4, 4096, 9)\n"
    )
    assert grew < 48, f"knn_graph peak memory grew by {grew:.0f} MiB"


@pytest.mark.parametrize("scale", [1e19, 1e30])
def test_reference_is_scale_invariant_beyond_float32_norms(scale):
    # Cosine similarity ignores scale; the reference normalised in float32, so rows this large
    # got infinite norms and every similarity tied.
    x = torch.randn(2, 50, 16, generator=generator(21))
    x[0, 7] *= 1e-3  # a row of another scale stays as it was
    expected = graph_reference.knn_graph(x, 5)
    assert torch.equal(graph_reference.knn_graph(x * scale, 5), expected)


@needs_extension
def test_direct_op_call_rejects_k_times_dilation_that_overflows():
    # 4 * 2^62 wraps to 0 in int64: the check passed and the kernel read past its buffer.
    with pytest.raises(RuntimeError, match=r"k \* dilation = 4 \* 4611686018427387904 exceeds"):
        torch.ops.slsg.knn_graph(torch.randn(1, 8, 4), 4, 2**62, None, True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype, scale", [(torch.float32, 2e38), (torch.float64, 1e200)])
def test_kernel_is_scale_invariant_beyond_the_norms_range(device, dtype, scale):
    # Finite rows whose norm exceeds the dtype's range: the float32 kernel divided them by an
    # infinite norm (every similarity tied), the float64 one reported NaN or Inf.
    x = (torch.rand(2, 40, 24, generator=generator(31), dtype=torch.float64) + 0.5).to(dtype).to(device)
    big = x.clone()
    big[:, ::2] *= scale / 2  # large rows beside ordinary ones
    expected = graph_reference.knn_graph(x.double(), 5)
    assert torch.equal(ops.knn_graph(big, 5, backend=kernel_backend(device)).cpu(), expected.cpu())


def test_reference_rescale_accounts_for_the_number_of_channels():
    # Each value below 2^60 but C * peak^2 beyond float32: the reference's old guard looked at
    # the peak alone, so the norms overflowed and every similarity tied.
    x = torch.rand(1, 16, 1024, generator=generator(32)) + 0.5
    expected = graph_reference.knn_graph(x.double(), 3)
    assert torch.equal(graph_reference.knn_graph(x * 2.0**59.9, 3), expected)


@needs_cuda
def test_cuda_neighbours_do_not_depend_on_tf32():
    x = torch.randn(2, 300, 64, generator=generator(33)).cuda()
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = ops.knn_graph(x, 9, 2, backend="extension")
        torch.backends.cuda.matmul.allow_tf32 = True
        assert torch.equal(ops.knn_graph(x, 9, 2, backend="extension"), exact)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
