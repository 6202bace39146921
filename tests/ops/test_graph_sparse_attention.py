import math

import pytest
import torch

from slsg import ops
from slsg.ops import graph_reference

from .graph_helpers import generator, random_index, tolerances
from .helpers import devices, needs_extension, noncontiguous


def make_inputs(B, H, N, D, Dv, K, g, dtype=torch.float64, with_bias=True):
    q = torch.randn(B, H, N, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, N, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, N, Dv, generator=g, dtype=dtype)
    index = random_index(B, N, K, g)
    bias = torch.randn(B, H, N, K, generator=g, dtype=dtype) if with_bias else None
    return q, k, v, index, bias


def loop_attention(q, k, v, index, bias, scale):
    """Independent definition, one node at a time in float64."""
    B, H, N, _ = q.shape
    out = torch.empty(B, H, N, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                nb = index[b, i]
                s = (k[b, h, nb].double() @ q[b, h, i].double()) * scale
                if bias is not None:
                    s = s + bias[b, h, i].double()
                w = torch.exp(s - s.max())
                out[b, h, i] = (w / w.sum()) @ v[b, h, nb].double()
    return out


def grads_of(fn, inputs, grad_out):
    leaves = [t.clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    wanted = [t for t in leaves if t is not None and t.is_floating_point()]
    return out, torch.autograd.grad(out, wanted, grad_out)


def test_reference_agrees_with_loops():
    g = generator(1)
    q, k, v, index, bias = make_inputs(2, 2, 6, 3, 4, 5, g)
    for b in (None, bias):
        torch.testing.assert_close(graph_reference.sparse_graph_attention(q, k, v, index, b), loop_attention(q, k, v, index, b, 1 / math.sqrt(3)))
    torch.testing.assert_close(graph_reference.sparse_graph_attention(q, k, v, index, bias, 0.7), loop_attention(q, k, v, index, bias, 0.7))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "B,H,N,D,Dv,K",
    [(1, 1, 1, 1, 1, 1), (1, 1, 2, 3, 5, 6), (2, 3, 17, 8, 5, 4), (2, 1, 64, 300, 260, 9), (1, 2, 40, 33, 70, 1),
     # Rows of whole 16-byte vectors (the CUDA forward's lane-group path): 1 to 32 lanes per
     # row, more neighbours than lane groups, several vectors per lane, Dv != D.
     (2, 2, 50, 32, 32, 9), (1, 3, 40, 4, 8, 40), (1, 1, 20, 256, 64, 9), (1, 2, 30, 64, 128, 7),
     (1, 2, 30, 16, 16, 5), (1, 1, 25, 8, 32, 6)],
)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(device, B, H, N, D, Dv, K, with_bias, dtype):
    g = generator(B, H, N, D, Dv, K)
    q, k, v, index, bias = make_inputs(B, H, N, D, Dv, K, g, with_bias=with_bias)
    grad_out = torch.randn(B, H, N, Dv, generator=g, dtype=torch.float64)
    expected, expected_grads = grads_of(graph_reference.sparse_graph_attention, (q, k, v, index, bias), grad_out)
    cast = [t.to(device, dtype) if t is not None and t.is_floating_point() else (t.to(device) if t is not None else None) for t in (q, k, v, index, bias)]
    out, out_grads = grads_of(ops.sparse_graph_attention, cast, grad_out.to(device, dtype))
    assert out.shape == (B, H, N, Dv) and out.dtype == dtype
    torch.testing.assert_close(out.double().cpu(), expected, **tolerances(dtype))
    for a, b in zip(out_grads, expected_grads):
        torch.testing.assert_close(a.double().cpu(), b, **tolerances(dtype))


@needs_extension
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("Dv", [3, 4])  # 4: rows of whole 16-byte vectors in float64
def test_fully_masked_row_does_not_spill_nan_into_other_gradients(device, Dv):
    # A node whose every edge bias is -inf (a padded node, say): its output is 0 / 0 = NaN
    # as in the reference, but with no gradient flowing from it, the other nodes' gradients
    # stay finite and equal the reference's with that row unmasked (a row with zero
    # grad_out contributes nothing to them).
    g = generator(12)
    q, k, v, index, bias = make_inputs(2, 2, 10, 4, Dv, 5, g)
    masked = bias.clone()
    masked[1, 0, 3] = float("-inf")
    masked[0, 1, 7, :2] = float("-inf")  # a partly masked row, for contrast
    grad_out = torch.randn(2, 2, 10, Dv, generator=g, dtype=torch.float64)
    grad_out[1, 0, 3] = 0.0
    inputs = [t.to(device) for t in (q, k, v, index, masked)]
    out, grads = grads_of(ops.sparse_graph_attention, inputs, grad_out.to(device))
    assert torch.isnan(out[1, 0, 3]).all()
    unmasked = masked.clone()
    unmasked[1, 0, 3] = 0.0
    ref_out, ref_grads = grads_of(graph_reference.sparse_graph_attention, (q, k, v, index, unmasked), grad_out)
    keep = torch.ones(2, 2, 10, dtype=torch.bool)
    keep[1, 0, 3] = False
    torch.testing.assert_close(out.cpu()[keep], ref_out[keep])
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.cpu(), want)


@needs_extension
@pytest.mark.parametrize("device", devices())
def test_inputs_at_an_unaligned_storage_offset(device):
    # Contiguous views that start 4 bytes into their storage: the CUDA forward's 16-byte
    # loads do not apply and the general kernel must run.
    g = generator(13)
    q, k, v, index, bias = make_inputs(1, 2, 20, 8, 8, 4, g, dtype=torch.float32)
    shifted = []
    for t in (q, k, v):
        flat = torch.empty(t.numel() + 1, device=device)
        flat[1:] = t.flatten().to(device)
        shifted.append(flat[1:].view(t.shape))
    assert shifted[0].is_contiguous() and shifted[0].data_ptr() % 16 != 0
    out = ops.sparse_graph_attention(*shifted, index.to(device), bias.to(device))
    expected = graph_reference.sparse_graph_attention(*(t.double() for t in (q, k, v)), index, bias.double())
    torch.testing.assert_close(out.double().cpu(), expected, **tolerances(torch.float32))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,Dv", [(16, 8), (12, 6), (64, 32)])
def test_half_precision(device, dtype, D, Dv):
    g = generator(2)
    q, k, v, index, bias = make_inputs(2, 2, 30, D, Dv, 5, g, dtype=torch.float32)
    rounded = [t.to(dtype).double() for t in (q, k, v)]
    expected = graph_reference.sparse_graph_attention(*rounded, index, bias.to(dtype).double())
    out = ops.sparse_graph_attention(*(t.to(device, dtype) for t in (q, k, v)), index.to(device), bias.to(device, dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double().cpu(), expected, **tolerances(dtype))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_single_neighbour_copies_its_value_and_duplicates_count_twice(backend):
    g = generator(3)
    q, k, v, _, _ = make_inputs(1, 1, 5, 4, 3, 1, g, dtype=torch.float32)
    index = torch.tensor([[[3], [0], [4], [4], [1]]])
    out = ops.sparse_graph_attention(q, k, v, index, backend=backend)
    torch.testing.assert_close(out[0, 0], v[0, 0, [3, 0, 4, 4, 1]])
    # Neighbours (2, 2, 0) with equal scores: node 2 weighs 2/3.
    q0 = torch.zeros(1, 1, 3, 4)
    index = torch.tensor([[[2, 2, 0], [0, 1, 2], [1, 1, 1]]])
    v3 = torch.tensor([[[[3.0], [6.0], [9.0]]]])
    out = ops.sparse_graph_attention(q0, q0, v3, index, backend=backend)
    torch.testing.assert_close(out.flatten(), torch.tensor([7.0, 6.0, 6.0]))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bias_and_scale_shift_the_weights(backend):
    q = torch.zeros(1, 1, 2, 2)
    v = torch.tensor([[[[1.0], [0.0]]]])
    index = torch.tensor([[[0, 1], [0, 1]]])
    bias = torch.tensor([[[[math.log(3.0), 0.0], [0.0, 0.0]]]])
    out = ops.sparse_graph_attention(q, q, v, index, bias, backend=backend)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.75, 0.5]))
    # Default scale is 1/sqrt(D): q.k = 4 with D = 4 gives a score of 2 against 0.
    q = torch.tensor([[[[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]]])
    out = ops.sparse_graph_attention(q, q, v, torch.tensor([[[0, 1], [0, 1]]]), backend=backend)
    torch.testing.assert_close(out[0, 0, 0, 0], torch.tensor(math.exp(2) / (math.exp(2) + 1)))
    out = ops.sparse_graph_attention(q, q, v, torch.tensor([[[0, 1], [0, 1]]]), scale=0.0, backend=backend)
    torch.testing.assert_close(out[0, 0, 0, 0], torch.tensor(0.5))


@needs_extension
def test_noncontiguous_inputs():
    g = generator(4)
    q, k, v, index, bias = make_inputs(2, 2, 20, 6, 5, 4, g, dtype=torch.float32)
    expected = ops.sparse_graph_attention(q, k, v, index, bias)
    out = ops.sparse_graph_attention(*(noncontiguous(t) for t in (q, k, v, index, bias)))
    torch.testing.assert_close(out, expected)
    # A [B, N, H, D] layout viewed as [B, H, N, D] is the common non-contiguous case.
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(ops.sparse_graph_attention(qt, k, v, index, bias), expected)


def test_empty():
    q = torch.randn(0, 2, 5, 3)
    out = ops.sparse_graph_attention(q, q, torch.randn(0, 2, 5, 4), torch.zeros(0, 5, 2, dtype=torch.long))
    assert out.shape == (0, 2, 5, 4)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize(
    "change,match",
    [
        ({"q": torch.randn(2, 3, 4)}, "q must be 4-D"),
        ({"k": torch.randn(1, 2, 5, 4)}, "k must be"),
        ({"k": torch.randn(1, 2, 6, 3), "v": torch.randn(1, 2, 6, 2)}, "same N"),
        ({"v": torch.randn(1, 2, 4, 2)}, "v must be"),
        ({"v": torch.randn(1, 2, 5, 2).double()}, "dtype mismatch"),
        ({"index": torch.zeros(1, 5, 2, dtype=torch.int32)}, "index must have dtype"),
        ({"index": torch.zeros(1, 4, 2, dtype=torch.long)}, r"index must be \[B, N, K\]"),
        ({"index": torch.full((1, 5, 2), 5)}, r"index values must be in \[0, N=5\)"),
        ({"bias": torch.randn(1, 2, 5, 3)}, r"bias must be \[B, H, N, K\] = \[1, 2, 5, 2\]"),
        ({"scale": "big"}, "scale must be a float"),
    ],
)
def test_bad_input_names_the_problem(change, match, backend):
    args = {"q": torch.randn(1, 2, 5, 3), "k": torch.randn(1, 2, 5, 3), "v": torch.randn(1, 2, 5, 2),
            "index": torch.zeros(1, 5, 2, dtype=torch.long), "bias": None, "scale": None}
    args.update(change)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        ops.sparse_graph_attention(**args, backend=backend)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_gradcheck_float64(backend):
    g = generator(5)
    q, k, v, index, bias = make_inputs(2, 2, 7, 3, 4, 3, g)
    leaves = [t.requires_grad_() for t in (q, k, v, bias)]
    fn = lambda a, b, c, d: ops.sparse_graph_attention(a, b, c, index, d, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)
    # Without a bias, and with some inputs not requiring grad.
    fn = lambda a, c: ops.sparse_graph_attention(a, k.detach(), c, index, scale=0.3, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (leaves[0], leaves[2]))


@needs_extension
def test_opcheck():
    g = generator(6)
    q, k, v, index, bias = make_inputs(2, 2, 9, 4, 3, 3, g, dtype=torch.float32)
    op = torch.ops.slsg.sparse_graph_attention.default
    torch.library.opcheck(op, (q, k, v, index, bias, 0.5))
    torch.library.opcheck(op, (q, k, v, index, None, 0.5))
    torch.library.opcheck(op, tuple(t.double().requires_grad_() if t is not None and t.is_floating_point() else t for t in (q, k, v, index, bias)) + (0.5,))
    out, lse = op(q, k, v, index, bias, 0.5)
    backward = torch.ops.slsg.sparse_graph_attention_backward.default
    for bias_grad in (True, False):
        torch.library.opcheck(backward, (torch.randn_like(out), q, k, v, index, bias, lse, 0.5, bias_grad))


@needs_extension
def test_torch_compile_fullgraph_forward_and_backward():
    def loss(q, k, v, index, bias):
        return ops.sparse_graph_attention(q, k, v, index, bias).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    g = generator(7)
    inputs = make_inputs(2, 2, 12, 4, 3, 3, g, dtype=torch.float32)
    results = []
    for fn in (compiled, loss):
        leaves = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
        value = fn(*leaves)
        value.backward()
        results.append([value.detach()] + [t.grad for t in leaves if t.is_floating_point()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@needs_extension
def test_saves_logsumexp_not_probabilities():
    # The backward needs q, k, v, index, bias and one statistic per node, nothing [.., K].
    g = generator(8)
    q, k, v, index, _ = make_inputs(1, 1, 10, 4, 3, 5, g, dtype=torch.float32)
    q.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        ops.sparse_graph_attention(q, k, v, index)
    assert set(saved) == {q.shape, v.shape, index.shape, torch.Size([1, 1, 10])}


@needs_extension
@pytest.mark.parametrize("device", devices())
def test_backward_op_rejects_gradient_and_statistics_of_the_wrong_shape(device):
    q, k, v, index, bias = (t.to(device) for t in make_inputs(2, 3, 5, 4, 6, 2, generator(11), dtype=torch.float32))
    out, lse = torch.ops.slsg.sparse_graph_attention(q, k, v, index, bias, 0.5)
    backward = torch.ops.slsg.sparse_graph_attention_backward
    with pytest.raises(RuntimeError, match=r"grad_out must be \[B, H, N, Dv\] = \[2, 3, 5, 6\], got \[2, 3, 5, 4\]"):
        backward(out[..., :4], q, k, v, index, bias, lse, 0.5, True)
    with pytest.raises(RuntimeError, match=r"lse must be \[B, H, N\] = \[2, 3, 5\], got \[2, 3, 4\]"):
        backward(out, q, k, v, index, bias, lse[..., :4], 0.5, True)
    if device == "cuda":
        with pytest.raises(RuntimeError, match=r"lse on cpu, expected cuda"):
            backward(out, q, k, v, index, bias, lse.cpu(), 0.5, True)
