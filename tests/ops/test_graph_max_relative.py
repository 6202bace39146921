import pytest
import torch

from slsg import ops
from slsg.ops import graph_reference

from .graph_helpers import generator, random_index, tolerances
from .helpers import devices, needs_extension, noncontiguous


def loop_max_relative(x, index):
    """Independent definition with Python loops: values and the gradient routing rule
    (first neighbour in index order that holds the maximum)."""
    B, N, C = x.shape
    out = torch.empty(B, N, C, dtype=torch.float64)
    winner = torch.empty(B, N, C, dtype=torch.long)
    for b in range(B):
        for i in range(N):
            for c in range(C):
                values = [float(x[b, j, c]) for j in index[b, i].tolist()]
                best = max(range(len(values)), key=lambda t: (values[t], -t))
                out[b, i, c] = values[best] - float(x[b, i, c])
                winner[b, i, c] = index[b, i, best]
    return out, winner


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("B,N,C,K", [(1, 1, 1, 1), (1, 1, 3, 4), (2, 7, 3, 3), (3, 50, 70, 9), (1, 200, 130, 1), (2, 33, 5, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_values_and_gradients(device, B, N, C, K, dtype):
    g = generator(B, N, C, K)
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    index = random_index(B, N, K, g)
    grad = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    expected = graph_reference.max_relative(xr, index)
    (expected_grad,) = torch.autograd.grad(expected, xr, grad)
    xd = x.to(device, dtype).requires_grad_()
    out = ops.max_relative(xd, index.to(device))
    assert out.shape == (B, N, C) and out.dtype == dtype
    torch.testing.assert_close(out.double().cpu(), expected.detach(), **tolerances(dtype))
    (out_grad,) = torch.autograd.grad(out, xd, grad.to(device, dtype))
    torch.testing.assert_close(out_grad.double().cpu(), expected_grad, **tolerances(dtype))


def test_reference_agrees_with_loops():
    g = generator(1)
    x = torch.randint(-2, 3, (2, 6, 3), generator=g).double().requires_grad_()  # many ties
    index = random_index(2, 6, 4, g)
    out = graph_reference.max_relative(x, index)
    expected, winner = loop_max_relative(x.detach(), index)
    torch.testing.assert_close(out.detach(), expected)
    grad = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    (x_grad,) = torch.autograd.grad(out, x, grad)
    expected_grad = -grad.clone()
    for b in range(2):
        for i in range(6):
            for c in range(3):
                expected_grad[b, winner[b, i, c], c] += grad[b, i, c]
    torch.testing.assert_close(x_grad, expected_grad)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_ties_route_the_gradient_to_the_first_neighbour(device, backend):
    x = torch.tensor([[[1.0], [5.0], [5.0], [2.0]]], device=device, requires_grad=True)
    index = torch.tensor([[[3, 2, 1], [0, 0, 3], [2, 1, 2], [1, 2, 3]]], device=device)
    out = ops.max_relative(x, index, backend=backend)
    assert out.squeeze().tolist() == [4.0, -3.0, 0.0, 3.0]
    out.sum().backward()
    # Winners: node 0 -> 2 (the first of the tied 5s), node 1 -> 3, node 2 -> 2, node 3 -> 1;
    # every node also gets -1 for its own x_i.
    assert x.grad.squeeze().tolist() == [-1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("device", devices())
def test_nan_propagates_like_torch_max(device):
    x = torch.tensor([[[1.0, 2.0], [float("nan"), 0.0], [3.0, 1.0]]], device=device)
    index = torch.tensor([[[0, 1, 2], [2, 0, 0], [1, 1, 0]]], device=device)
    out = ops.max_relative(x, index)
    expected = graph_reference.max_relative(x.cpu(), index.cpu())
    torch.testing.assert_close(out.cpu(), expected, equal_nan=True)
    assert out[0, 0, 0].isnan() and not out[0, 0, 1].isnan()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(device, dtype):
    g = generator(2)
    x = torch.randn(2, 30, 17, generator=g)
    index = random_index(2, 30, 5, g)
    out = ops.max_relative(x.to(device, dtype), index.to(device))
    assert out.dtype == dtype
    expected = graph_reference.max_relative(x.to(dtype).double(), index)
    torch.testing.assert_close(out.double().cpu(), expected, **tolerances(dtype))


@needs_extension
def test_noncontiguous_inputs():
    g = generator(3)
    x = torch.randn(2, 40, 9, generator=g, requires_grad=True)
    index = random_index(2, 40, 6, g)
    expected = ops.max_relative(x, index)
    out = ops.max_relative(noncontiguous(x), noncontiguous(index))
    torch.testing.assert_close(out, expected)
    grad = noncontiguous(torch.randn(2, 40, 9, generator=g))
    a = torch.autograd.grad(out, x, grad)[0]
    b = torch.autograd.grad(expected, x, grad.contiguous())[0]
    torch.testing.assert_close(a, b)


def test_empty():
    assert ops.max_relative(torch.randn(0, 4, 3), torch.zeros(0, 4, 2, dtype=torch.long)).shape == (0, 4, 3)
    assert ops.max_relative(torch.randn(2, 4, 0), torch.zeros(2, 4, 2, dtype=torch.long)).shape == (2, 4, 0)


@pytest.mark.parametrize(
    "x,index,match",
    [
        (torch.randn(4, 3), torch.zeros(1, 4, 2, dtype=torch.long), "x must be 3-D"),
        (torch.randn(1, 4, 3), torch.zeros(4, 2, dtype=torch.long), "index must be 3-D"),
        (torch.randn(1, 4, 3), torch.zeros(1, 4, 2, dtype=torch.int32), "index must have dtype in"),
        (torch.randn(1, 4, 3), torch.zeros(1, 5, 2, dtype=torch.long), r"index must be \[B, N, K\] = \[1, 4, K\]"),
        (torch.randn(1, 4, 3), torch.zeros(1, 4, 0, dtype=torch.long), "K >= 1"),
        (torch.randn(1, 4, 3).int(), torch.zeros(1, 4, 2, dtype=torch.long), "x must have dtype"),
        (torch.randn(1, 4, 3), torch.full((1, 4, 2), 4), r"index values must be in \[0, N=4\)"),
        (torch.randn(1, 4, 3), torch.full((1, 4, 2), -1), r"index values must be in \[0, N=4\)"),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_input_names_the_problem(x, index, match, backend):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        ops.max_relative(x, index, backend=backend)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_gradcheck_float64(backend):
    g = generator(4)
    # Distinct, well-separated values: a finite-difference step cannot change the argmax.
    x = (torch.randperm(4 * 6 * 5, generator=g).double() / 10).reshape(4, 6, 5).requires_grad_()
    index = random_index(4, 6, 3, g)
    assert torch.autograd.gradcheck(lambda t: ops.max_relative(t, index, backend=backend), (x,))


@needs_extension
def test_opcheck():
    g = generator(5)
    x = torch.randperm(2 * 9 * 4, generator=g).float().reshape(2, 9, 4)
    index = random_index(2, 9, 3, g)
    torch.library.opcheck(torch.ops.slsg.max_relative.default, (x, index))
    torch.library.opcheck(torch.ops.slsg.max_relative.default, (x.double().requires_grad_(), index))
    torch.library.opcheck(torch.ops.slsg.max_relative_backward.default, (torch.randn(2, 9, 4, generator=g), x, index))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_extension
def test_backward_on_cuda_rejects_a_host_gradient():
    x = torch.randn(2, 9, 4, device="cuda")
    index = random_index(2, 9, 3, generator(7)).cuda()
    with pytest.raises(RuntimeError, match="grad"):
        torch.ops.slsg.max_relative_backward(torch.randn(2, 9, 4), x, index)


@needs_extension
def test_torch_compile_fullgraph_forward_and_backward():
    def loss(x, index):
        return (ops.max_relative(x, index) * torch.arange(4.0)).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    g = generator(6)
    x = torch.randn(2, 12, 4, generator=g)
    index = random_index(2, 12, 3, g)
    grads = []
    for fn in (compiled, loss):
        leaf = x.clone().requires_grad_()
        value = fn(leaf, index)
        value.backward()
        grads.append((value.detach(), leaf.grad))
    torch.testing.assert_close(grads[0], grads[1])
