import functools
import math

import pytest
import torch
import torch.nn.functional as F

from slsg import ops
from slsg.ops import graph as graph_ops
from slsg.ops import graph_reference

from .graph_helpers import generator, kernel_backend, peak_rss_increase_mib, tolerances
from .helpers import devices, needs_extension, noncontiguous


def make_inputs(B, H, Nq, Nk, D, Dv, g, dtype=torch.float64, with_bias=True):
    q = torch.randn(B, H, Nq, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, Nk, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, Nk, Dv, generator=g, dtype=dtype)
    bias = torch.randn(H, Nq, Nk, generator=g, dtype=dtype) if with_bias else None
    return q, k, v, bias


def kernel_on(device):
    return functools.partial(ops.dense_graph_attention, backend=kernel_backend(device))


def grads_of(fn, inputs, grad_out):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out)


def test_reference_agrees_with_sdpa():
    g = generator(1)
    q, k, v, bias = make_inputs(2, 3, 7, 11, 5, 4, g)
    for b, scale in ((None, None), (bias, None), (bias, 0.3)):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=b, scale=scale)
        torch.testing.assert_close(graph_reference.dense_graph_attention(q, k, v, b, scale), expected)


def limit_scores(monkeypatch, kept, slices, slice_bytes):
    """Sets the CPU forward's limit on kept scores so that "all", "some" (the first half of
    the (batch, head) pairs) or "none" of them fit."""
    limit = {"all": slices * slice_bytes + 1, "some": slices // 2 * slice_bytes + 1, "none": 0}[kept]
    monkeypatch.setattr(graph_ops, "KEPT_SCORES_MAX_BYTES", limit)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "B,H,Nq,Nk,D,Dv",
    [(1, 1, 1, 1, 1, 1), (2, 3, 5, 7, 4, 3), (1, 2, 130, 1100, 16, 8), (2, 1, 300, 300, 300, 70), (1, 1, 33, 40, 64, 520)],
)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kept_scores", ["all", "some", "none"])
def test_matches_reference(device, B, H, Nq, Nk, D, Dv, with_bias, dtype, kept_scores, monkeypatch):
    # Shapes cover several query tiles, several key tiles (Nk > 1024: the online rescaling),
    # and feature sizes above the CUDA kernels' per-slice width. The CPU backward reads the
    # scores its forward kept, for all (batch, head) pairs, the first half of them (a size
    # limit that fits only those), or none (a limit of 0 bytes), and recomputes the rest.
    limit_scores(monkeypatch, kept_scores, B * H, Nq * Nk * dtype.itemsize)
    g = generator(B, H, Nq, Nk, D, Dv)
    inputs = make_inputs(B, H, Nq, Nk, D, Dv, g, with_bias=with_bias)
    grad_out = torch.randn(B, H, Nq, Dv, generator=g, dtype=torch.float64)
    expected, expected_grads = grads_of(graph_reference.dense_graph_attention, inputs, grad_out)
    cast = [t.to(device, dtype) if t is not None else None for t in inputs]
    out, out_grads = grads_of(kernel_on(device), cast, grad_out.to(device, dtype))
    assert out.shape == (B, H, Nq, Dv) and out.dtype == dtype
    torch.testing.assert_close(out.double().cpu(), expected, **tolerances(dtype))
    for a, b in zip(out_grads, expected_grads):
        torch.testing.assert_close(a.double().cpu(), b, **tolerances(dtype))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(device, dtype):
    g = generator(2)
    inputs = make_inputs(2, 2, 40, 50, 16, 8, g, dtype=torch.float32)
    expected = graph_reference.dense_graph_attention(*(t.to(dtype).double() for t in inputs))
    out = kernel_on(device)(*(t.to(device, dtype) for t in inputs))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double().cpu(), expected, **tolerances(dtype))


def test_cuda_auto_takes_sdpa_only_where_its_fused_kernels_apply():
    # Elsewhere SDPA's plain path would hold every [Nq, Nk] score matrix, or expand a bias
    # that needs a gradient to [B, H, Nq, Nk]: our kernel keeps memory bounded there.
    q, v = torch.randn(2, 3, 40, 16), torch.randn(2, 3, 40, 8)
    bias = torch.randn(3, 40, 40)
    assert graph_ops._sdpa_keeps_memory_bounded(q, v, None)
    assert graph_ops._sdpa_keeps_memory_bounded(q.half(), v.half(), bias.half())
    assert not graph_ops._sdpa_keeps_memory_bounded(q, v, bias.requires_grad_())
    assert not graph_ops._sdpa_keeps_memory_bounded(q.double(), v.double(), None)
    assert not graph_ops._sdpa_keeps_memory_bounded(q[..., :12], v, None)
    assert not graph_ops._sdpa_keeps_memory_bounded(torch.randn(1, 1, 4, 264), v[:1, :1, :4], None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias_grad", [False, True])  # True: our kernel (SDPA would expand it)
def test_cuda_auto_matches_reference(dtype, bias_grad):
    g = generator(3)
    q, k, v, bias = make_inputs(2, 3, 40, 56, 16, 8, g, dtype=torch.float32)
    grad_out = torch.randn(2, 3, 40, 8, generator=g, dtype=torch.float64)
    results = []
    for fn, device, t_dtype, t_grad in ((graph_reference.dense_graph_attention, "cpu", torch.float64, grad_out),
                                        (ops.dense_graph_attention, "cuda", dtype, grad_out.to("cuda", dtype))):
        leaves = [t.to(device, t_dtype).requires_grad_(t is not bias or bias_grad) for t in (q, k, v, bias)]
        out = fn(*leaves)
        wanted = leaves if bias_grad else leaves[:3]
        results.append((out, torch.autograd.grad(out, wanted, t_grad)))
    (expected, expected_grads), (out, out_grads) = results
    torch.testing.assert_close(out.double().cpu(), expected, **tolerances(dtype))
    for a, b in zip(out_grads, expected_grads, strict=True):  # q, k, v (and the bias summed over the batch)
        torch.testing.assert_close(a.double().cpu(), b, **tolerances(dtype))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_scale_and_bias(backend):
    q = torch.tensor([[[[1.0, 1.0, 1.0, 1.0]]]])
    k = torch.tensor([[[[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]]])
    v = torch.tensor([[[[1.0], [0.0]]]])
    # Default scale 1/sqrt(4): scores 2 and 0.
    out = ops.dense_graph_attention(q, k, v, backend=backend)
    torch.testing.assert_close(out.flatten(), torch.tensor([math.exp(2) / (math.exp(2) + 1)]))
    bias = torch.tensor([[[-2.0, math.log(3.0)]]])
    out = ops.dense_graph_attention(q, k, v, bias, backend=backend)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.25]))
    out = ops.dense_graph_attention(q, k, v, scale=0.0, backend=backend)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.5]))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_large_scores_do_not_overflow(backend):
    # The online softmax subtracts the running maximum; exp(1000) would be inf.
    g = generator(3)
    q, k, v, _ = make_inputs(1, 1, 20, 1500, 4, 3, g, dtype=torch.float32)
    bias = torch.zeros(1, 20, 1500)
    bias[:, :, 1400] = 1000.0  # the winner sits in the second key tile
    out = ops.dense_graph_attention(q, k, v, bias, backend=backend)
    torch.testing.assert_close(out[0, 0], v[0, 0, 1400].expand(20, 3))


@needs_extension
@pytest.mark.parametrize("device", devices())
def test_masked_entries_match_reference(device):
    # -inf in the bias masks single edges and whole key tiles; the gradients stay finite
    # and agree with the reference.
    g = generator(4)
    q, k, v, bias = make_inputs(2, 2, 37, 600, 5, 3, g)
    bias[:, :, 512:] = float("-inf")  # the whole second key tile (CPU tiles of 512 keys)
    bias[:, 3, :100] = float("-inf")
    inputs = [t.to(device) for t in (q, k, v, bias)]
    grad_out = torch.randn(2, 2, 37, 3, generator=g, dtype=torch.float64).to(device)
    out, grads = grads_of(kernel_on(device), inputs, grad_out)
    ref_out, ref_grads = grads_of(graph_reference.dense_graph_attention, inputs, grad_out)
    torch.testing.assert_close(out, ref_out)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_extension
def test_fully_masked_row_gives_the_same_value_gradient_on_cuda_and_cpu():
    # A query row whose bias is all -inf: the output there is NaN (0 / 0) on both devices;
    # it must not spill NaN into the value gradient of every key.
    g = generator(5)
    q, k, v, bias = make_inputs(1, 1, 9, 70, 4, 3, g, dtype=torch.float32)
    bias[0, 2] = float("-inf")
    grad_out = torch.randn(1, 1, 9, 3, generator=g)
    grad_out[0, 0, 2] = 0.0  # so the masked row's own NaN output does not reach the loss
    _, cpu = grads_of(ops.dense_graph_attention, [q, k, v, bias], grad_out)
    _, cuda = grads_of(kernel_on("cuda"), [t.cuda() for t in (q, k, v, bias)], grad_out.cuda())
    assert torch.isfinite(cpu[2]).all()
    torch.testing.assert_close(cuda[2].cpu(), cpu[2], atol=1e-5, rtol=1e-4)


@needs_extension
def test_noncontiguous_inputs():
    g = generator(4)
    q, k, v, bias = make_inputs(2, 2, 20, 30, 6, 5, g, dtype=torch.float32)
    expected = ops.dense_graph_attention(q, k, v, bias)
    out = ops.dense_graph_attention(*(noncontiguous(t) for t in (q, k, v, bias)))
    torch.testing.assert_close(out, expected)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(ops.dense_graph_attention(qt, k, v, bias.transpose(1, 2).contiguous().transpose(1, 2)), expected)


def test_empty():
    assert ops.dense_graph_attention(torch.randn(0, 2, 5, 3), torch.randn(0, 2, 4, 3), torch.randn(0, 2, 4, 2)).shape == (0, 2, 5, 2)
    assert ops.dense_graph_attention(torch.randn(1, 2, 0, 3), torch.randn(1, 2, 4, 3), torch.randn(1, 2, 4, 2)).shape == (1, 2, 0, 2)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize(
    "change,match",
    [
        ({"q": torch.randn(2, 5, 3)}, "q must be 4-D"),
        ({"k": torch.randn(1, 2, 6, 4)}, "k must be"),
        ({"v": torch.randn(1, 2, 5, 2)}, "v must be"),
        ({"k": torch.randn(1, 2, 0, 3), "v": torch.randn(1, 2, 0, 2)}, "no nodes"),
        ({"q": torch.randn(1, 2, 4, 3).half()}, "dtype mismatch"),
        ({"bias": torch.randn(2, 4, 5)}, r"bias must be \[H, Nq, Nk\] = \[2, 4, 6\]"),
        ({"bias": torch.randn(1, 2, 4, 6)}, "bias must be 3-D"),
        ({"scale": True}, "scale must be a float"),
    ],
)
def test_bad_input_names_the_problem(change, match, backend):
    args = {"q": torch.randn(1, 2, 4, 3), "k": torch.randn(1, 2, 6, 3), "v": torch.randn(1, 2, 6, 2), "bias": None, "scale": None}
    args.update(change)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        ops.dense_graph_attention(**args, backend=backend)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_gradcheck_float64(backend):
    g = generator(5)
    leaves = [t.requires_grad_() for t in make_inputs(2, 2, 5, 6, 3, 4, g)]
    fn = lambda a, b, c, d: ops.dense_graph_attention(a, b, c, d, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)
    fn = lambda b, c: ops.dense_graph_attention(leaves[0].detach(), b, c, scale=1.7, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (leaves[1], leaves[2]))


def spy_backward_flags(monkeypatch):
    """Records the shared_qk argument of every call of the dense backward op."""
    flags = []
    real = torch.ops.slsg.dense_graph_attention_backward

    def spy(*args):
        flags.append(args[10] if len(args) > 10 else False)
        return real(*args)

    monkeypatch.setattr(torch.ops.slsg, "dense_graph_attention_backward", spy)
    return flags


@needs_extension
@pytest.mark.parametrize("N", [1, 7, 256, 300, 600])
@pytest.mark.parametrize("D", [5, 40])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kept_scores", ["all", "some", "none"])
def test_shared_query_key_matches_reference(N, D, with_bias, dtype, kept_scores, monkeypatch):
    # One tensor as q and k (the graph layer's case): the CPU backward returns its whole
    # gradient, from one product per tile pair side at D >= 32 (else the general backward
    # adds dk to dq). N covers one tile, a ragged last tile (300 = 256 + 44) and three tiles
    # (600); "some" keeps one of the two (batch, head) pairs.
    limit_scores(monkeypatch, kept_scores, 2, N * N * dtype.itemsize)
    flags = spy_backward_flags(monkeypatch)
    g = generator(N, D, with_bias, 21)
    q, _, v, bias = make_inputs(2, 1, N, N, D, 3, g, with_bias=with_bias)
    grad_out = torch.randn(2, 1, N, 3, generator=g, dtype=torch.float64)
    shared = lambda q, v, b=None: ops.dense_graph_attention(q, q, v, b)  # noqa: E731
    inputs = (q, v) + ((bias,) if with_bias else ())
    want, want_grads = grads_of(lambda q, v, b=None: graph_reference.dense_graph_attention(q, q, v, b), inputs, grad_out)
    out, got = grads_of(shared, [t.to(dtype) for t in inputs], grad_out.to(dtype))
    assert flags == [True]
    torch.testing.assert_close(out.double(), want, **tolerances(dtype))
    for a, b in zip(got, want_grads):
        torch.testing.assert_close(a.double(), b, **tolerances(dtype))


@needs_extension
@pytest.mark.parametrize("kept_scores", ["all", "none"])
def test_shared_query_key_with_masked_entries_matches_separate_tensors(kept_scores, monkeypatch):
    # A fully masked row (its output NaN, no gradient from it) and a masked column, across
    # tiles: the shared backward gives what the general one gives with q and k separate.
    limit_scores(monkeypatch, kept_scores, 2, 300 * 300 * 8)
    g = generator(22)
    q, _, v, bias = make_inputs(1, 2, 300, 300, 36, 3, g)
    bias[0, 5] = float("-inf")
    bias[1, :, 270] = float("-inf")
    grad_out = torch.randn(1, 2, 300, 3, generator=g, dtype=torch.float64)
    grad_out[0, 0, 5] = 0.0
    out, (gq, gv, gb) = grads_of(lambda q, v, b: ops.dense_graph_attention(q, q, v, b), (q, v, bias), grad_out)
    sep_out, (sq, sk, sv, sb) = grads_of(ops.dense_graph_attention, (q, q.clone(), v, bias), grad_out)
    torch.testing.assert_close(out, sep_out, equal_nan=True)
    for got, want in ((gq, sq + sk), (gv, sv), (gb, sb)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


@needs_extension
@pytest.mark.parametrize("N,D", [(5, 3), (5, 32), (300, 32)])
@pytest.mark.parametrize("kept_scores", ["all", "none"])
def test_shared_query_key_gradcheck_float64(N, D, kept_scores, monkeypatch):
    # N = 300: tile pairs off the diagonal and a ragged tile (fast mode: a random projection)
    limit_scores(monkeypatch, kept_scores, 2, N * N * 8)
    flags = spy_backward_flags(monkeypatch)
    g = generator(23, N, D)
    q, _, v, bias = (t.requires_grad_() for t in make_inputs(1, 2, N, N, D, 4, g))
    fn = lambda q, v, b: ops.dense_graph_attention(q, q, v, b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, v, bias), fast_mode=N > 8)
    assert flags and all(flags)


@needs_extension
def test_bias_gradient_sums_over_the_batch():
    g = generator(6)
    q, k, v, bias = make_inputs(3, 2, 9, 8, 4, 3, g, dtype=torch.float32)
    bias.requires_grad_()
    ops.dense_graph_attention(q, k, v, bias).sum().backward()
    expected = sum(torch.autograd.grad(graph_reference.dense_graph_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], bias).sum(), bias)[0] for i in range(3))
    torch.testing.assert_close(bias.grad, expected, atol=1e-5, rtol=1e-4)


@needs_extension
def test_opcheck():
    g = generator(7)
    q, k, v, bias = make_inputs(2, 2, 9, 7, 4, 3, g, dtype=torch.float32)
    op = torch.ops.slsg.dense_graph_attention.default
    torch.library.opcheck(op, (q, k, v, bias, 0.5))
    torch.library.opcheck(op, (q, k, v, None, 0.5))
    torch.library.opcheck(op, tuple(t.double().requires_grad_() for t in (q, k, v, bias)) + (0.5,))
    for kept_slices in (4, 3):
        torch.library.opcheck(op, tuple(t.double().requires_grad_() for t in (q, k, v, bias)) + (0.5, kept_slices))
    out, lse, none = op(q, k, v, bias, 0.5)
    _, _, scores = op(q, k, v, bias, 0.5, 4)
    _, _, some = op(q, k, v, bias, 0.5, 3)
    assert none.numel() == 0
    expected = (0.5 * q @ k.transpose(-1, -2) + bias).reshape(4, 9, 7)  # (b, h) order
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(some, expected[:3])
    with pytest.raises(RuntimeError, match=r"kept_slices must be in \[0, B \* H\] = \[0, 4\], got 5"):
        op(q, k, v, bias, 0.5, 5)
    backward = torch.ops.slsg.dense_graph_attention_backward.default
    for bias_grad in (True, False):
        for kept in (None, scores, some):
            torch.library.opcheck(backward, (torch.randn_like(out), q, k, v, bias, out, lse, kept, 0.5, bias_grad))
    # shared_qk: one tensor as q and k; grad_q is the whole gradient, grad_k empty (D = 32:
    # the shared kernel; D = 4: the general one, dk added to dq)
    q_sq, v_sq, bias_sq = q[:, :, :7], v, bias[:, :7]
    out, lse, scores = op(q_sq, q_sq, v_sq, bias_sq, 0.5, 4)
    deep = torch.randn(2, 2, 7, 32, generator=g)
    out_deep, lse_deep, scores_deep = op(deep, deep, v_sq, bias_sq, 0.5, 4)
    for kept in (None, scores):
        args = (torch.randn_like(out), q_sq, q_sq, v_sq, bias_sq, out, lse, kept, 0.5, True, True)
        torch.library.opcheck(backward, args)
        gq, gk, _, _ = backward(*args)
        assert gq.shape == q_sq.shape and gk.numel() == 0
    for kept in (None, scores_deep):
        args = (torch.randn_like(out_deep), deep, deep, v_sq, bias_sq, out_deep, lse_deep, kept, 0.5, True, True)
        torch.library.opcheck(backward, args)
        gq, gk, _, _ = backward(*args)
        assert gq.shape == deep.shape and gk.numel() == 0
    # k is not read with shared_qk: it stands for q, whatever it holds, at both head sizes
    for query, o, lse_q in ((q_sq, out, lse), (deep, out_deep, lse_deep)):
        grad = torch.randn_like(o)
        want = backward(grad, query, query, v_sq, bias_sq, o, lse_q, None, 0.5, True, True)
        got = backward(grad, query, torch.zeros_like(query), v_sq, bias_sq, o, lse_q, None, 0.5, True, True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match=r"shared_qk needs k of q's shape"):
        backward(torch.randn_like(out), q_sq, q[:, :, :6], v_sq[:, :, :6], bias_sq[..., :6], out, lse, None, 0.5, False, True)


@needs_extension
def test_scores_are_kept_only_when_a_gradient_is_needed_and_as_far_as_they_fit(monkeypatch):
    calls = []
    real = torch.ops.slsg.dense_graph_attention

    class Spy:
        def __call__(self, *args):
            calls.append(args[5])
            return real(*args)

    monkeypatch.setattr(torch.ops.slsg, "dense_graph_attention", Spy())
    q, k, v, bias = make_inputs(2, 2, 9, 7, 4, 3, generator(9), dtype=torch.float32)
    ops.dense_graph_attention(q, k, v, bias)  # no input needs a gradient
    ops.dense_graph_attention(q, k, v.requires_grad_(), bias)  # the default keeps none
    monkeypatch.setattr(graph_ops, "KEPT_SCORES_MAX_BYTES", 1 << 20)
    ops.dense_graph_attention(q, k, v, bias)
    with torch.no_grad():
        ops.dense_graph_attention(q, k, v, bias)
    monkeypatch.setattr(graph_ops, "KEPT_SCORES_MAX_BYTES", 2 * 2 * 9 * 7 * 4)  # kept: strictly smaller
    ops.dense_graph_attention(q, k, v, bias)
    monkeypatch.setattr(graph_ops, "KEPT_SCORES_MAX_BYTES", 9 * 7 * 4)
    ops.dense_graph_attention(q, k, v, bias)
    assert calls == [0, 0, 4, 0, 3, 0]


@needs_extension
def test_backward_rejects_scores_of_the_wrong_shape():
    q, k, v, bias = make_inputs(1, 2, 5, 6, 4, 3, generator(10), dtype=torch.float32)
    out, lse, _ = torch.ops.slsg.dense_graph_attention(q, k, v, bias, 0.5)
    for wrong in (torch.zeros(1, 2, 5, 6), torch.zeros(2, 6, 5), torch.zeros(3, 5, 6)):
        with pytest.raises(RuntimeError, match=r"scores must be .*S <= B \* H = 2, Nq = 5, Nk = 6"):
            torch.ops.slsg.dense_graph_attention_backward(out, q, k, v, bias, out, lse, wrong, 0.5, False)


@needs_extension
def test_torch_compile_fullgraph_forward_and_backward():
    def loss(q, k, v, bias):
        return ops.dense_graph_attention(q, k, v, bias).square().sum()

    def shared_loss(q, v, bias):  # one tensor as q and k: the shared backward
        return ops.dense_graph_attention(q, q, v, bias).square().sum()

    g = generator(8)
    q, k, v, bias = make_inputs(2, 2, 12, 10, 4, 3, g, dtype=torch.float32)
    shared_q, _, shared_v, shared_bias = make_inputs(2, 2, 12, 12, 32, 3, g, dtype=torch.float32)
    for fn, inputs in ((loss, (q, k, v, bias)), (shared_loss, (shared_q, shared_v, shared_bias))):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        results = []
        for f in (compiled, fn):
            leaves = [t.clone().requires_grad_() for t in inputs]
            value = f(*leaves)
            value.backward()
            results.append([value.detach()] + [t.grad for t in leaves])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b)


@needs_extension
def test_memory_is_bounded_at_4096_nodes():
    # One [B, H, N, N] score matrix in float32 would be 128 MiB; the kernels keep tiles.
    grew = peak_rss_increase_mib(
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(2, 1, 4096, 16, generator=g, requires_grad=True) for _ in range(3))\n"
        "bias = torch.randn(1, 4096, 4096, generator=g) * 0.1\n"
        "slsg.ops.dense_graph_attention(q[:, :, :300], k, v, bias[:, :300]).sum().backward()  # warm-up\n"
        "# measure\n"
        "slsg.ops.dense_graph_attention(q, k, v, bias).sum().backward()\n"
    )
    assert grew < 48, f"dense_graph_attention peak memory grew by {grew:.0f} MiB"



@needs_extension
def test_torch_compile_keeps_the_shared_query_key_backward():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    flags = []

    def backward_compiler(gm, _):
        for node in gm.graph.nodes:
            if node.target is torch.ops.slsg.dense_graph_attention_backward.default:
                flags.append(node.args[10] if len(node.args) > 10 else node.kwargs.get("shared_qk", False))
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=backward_compiler)
    q, _, v, bias = make_inputs(1, 2, 300, 300, 32, 3, generator(24))
    compiled = torch.compile(lambda q, v, b: ops.dense_graph_attention(q, q, v, b).square().sum(), backend=backend)
    leaves = [t.clone().requires_grad_() for t in (q, v, bias)]
    compiled(*leaves).backward()
    assert flags == [True]
    ref_leaves = [t.clone().requires_grad_() for t in (q, v, bias)]
    graph_reference.dense_graph_attention(ref_leaves[0], ref_leaves[0], *ref_leaves[1:]).square().sum().backward()
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, **tolerances(torch.float64))


@needs_extension
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kept_scores", ["all", "some", "none"])
def test_fully_masked_row_does_not_spill_nan_into_other_gradients(device, kept_scores, monkeypatch):
    # A query row whose bias is all -inf: its output is 0 / 0 = NaN, as in the reference;
    # with no gradient flowing from it, every gradient stays finite and equals the
    # reference's with that row unmasked (a row with zero grad_out contributes nothing).
    limit_scores(monkeypatch, kept_scores, 2, 40 * 600 * 8)
    g = generator(13)
    q, k, v, bias = make_inputs(1, 2, 40, 600, 4, 3, g)
    masked = bias.clone()
    masked[0, 5] = float("-inf")
    masked[1, 7, :550] = float("-inf")  # partly masked, across both CPU key tiles
    grad_out = torch.randn(1, 2, 40, 3, generator=g, dtype=torch.float64)
    grad_out[0, 0, 5] = 0.0
    out, grads = grads_of(kernel_on(device), [t.to(device) for t in (q, k, v, masked)], grad_out.to(device))
    assert torch.isnan(out[0, 0, 5]).all()
    unmasked = masked.clone()
    unmasked[0, 5] = 0.0
    ref_out, ref_grads = grads_of(graph_reference.dense_graph_attention, (q, k, v, unmasked), grad_out)
    keep = torch.ones(1, 2, 40, dtype=torch.bool)
    keep[0, 0, 5] = False
    torch.testing.assert_close(out.cpu()[keep], ref_out[keep])
    for got, want in zip(grads[:3], ref_grads[:3]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.cpu(), want)
    # the bias gradient of the masked row is 0 (P = 0 there); elsewhere the reference's
    gb, want_gb = grads[3].cpu(), ref_grads[3].clone()
    want_gb[0, 5] = 0.0
    assert torch.isfinite(gb).all()
    torch.testing.assert_close(gb, want_gb)


@needs_extension
def test_inference_mode_with_several_threads():
    # The CPU kernel's tiles go through ATen ops on pool threads, which do not inherit
    # inference_mode; out is an inference tensor there.
    g = generator(14)
    q, k, v, bias = make_inputs(2, 2, 300, 700, 8, 5, g, dtype=torch.float32)
    expected = ops.dense_graph_attention(q, k, v, bias)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            out = ops.dense_graph_attention(q, k, v, bias)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out, expected)


@needs_extension
@pytest.mark.parametrize("device", devices())
def test_backward_op_rejects_gradient_and_statistics_of_the_wrong_shape(device):
    q, k, v, bias = (t.to(device) for t in make_inputs(1, 2, 5, 6, 4, 3, generator(12), dtype=torch.float32))
    out, lse, _ = torch.ops.slsg.dense_graph_attention(q, k, v, bias, 0.5)
    backward = torch.ops.slsg.dense_graph_attention_backward
    shape = r"must be \[B, H, Nq, Dv\] = \[1, 2, 5, 3\]"
    with pytest.raises(RuntimeError, match=rf"grad_out and out {shape}, got \[1, 2, 5, 2\] and \[1, 2, 5, 3\]"):
        backward(out[..., :2], q, k, v, bias, out, lse, None, 0.5, False)
    with pytest.raises(RuntimeError, match=rf"grad_out and out {shape}, got \[1, 2, 5, 3\] and \[1, 2, 4, 3\]"):
        backward(out, q, k, v, bias, out[:, :, :4], lse, None, 0.5, False)
    with pytest.raises(RuntimeError, match=r"lse must be \[B, H, Nq\] = \[1, 2, 5\], got \[1, 2\]"):
        backward(out, q, k, v, bias, out, lse[..., 0], None, 0.5, False)
    if device == "cuda":
        with pytest.raises(RuntimeError, match=r"out on cpu, expected cuda"):
            backward(out, q, k, v, bias, out.cpu(), lse, None, 0.5, False)


@pytest.mark.parametrize("device", devices())
def test_bias_gradient_over_a_batch_is_flagged_nondeterministic(device):
    # Batch items add into the shared [H, N, N] bias gradient in thread (CPU) or atomic (CUDA)
    # order; torch.use_deterministic_algorithms must hear about it.
    if device == "cpu" and (not graph_ops.EXTENSION_LOADED or torch.get_num_threads() < 2):
        pytest.skip("the CPU kernel is deterministic on one thread (or not compiled)")
    g = generator(41)
    q, k, v = (torch.randn(2, 2, 20, 8, generator=g).to(device).requires_grad_() for _ in range(3))
    bias = torch.randn(2, 20, 20, generator=g).to(device).requires_grad_()
    out = ops.dense_graph_attention(q, k, v, bias, backend=kernel_backend(device))
    old = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(old)
