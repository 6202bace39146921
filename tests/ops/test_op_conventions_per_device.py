"""Every compiled op on every device it is built for: torch.library.opcheck (schema, fake
implementation, autograd registration, AOT dispatch) and float64 gradcheck through the public
op layer. The per-op files run the same checks on the CPU in more detail; here the CUDA
kernels get them too (the CUDA cases skip cleanly without a GPU)."""
import pytest
import torch

from slsg import ops

from .graph_helpers import generator, random_index
from .helpers import devices, needs_extension

pytestmark = needs_extension


def opcheck(op, *args):
    torch.library.opcheck(getattr(torch.ops.slsg, op).default, args)


def randn(*shape, g, device, dtype=torch.float64, grad=False):
    return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(grad)


@pytest.mark.parametrize("device", devices())
def test_scoring_ops(device):
    g = generator(1)
    for dtype in (torch.float32, torch.float64):
        x, centers = randn(10, 8, g=g, device=device, dtype=dtype), randn(40, 8, g=g, device=device, dtype=dtype)
        radii = torch.rand(40, generator=g, dtype=dtype).to(device)
        opcheck("sphere_distance", x, centers, radii, 3)
        opcheck("sphere_distance", x.requires_grad_(dtype == torch.float64), centers, None, 1)
        opcheck("topk_mean", randn(3, 20, g=g, device=device, dtype=dtype, grad=dtype == torch.float64), 4)
    opcheck("greedy_coreset", randn(30, 4, g=g, device=device, dtype=torch.float32), 5, 2)
    leaves = [randn(6, 5, g=g, device=device, grad=True), randn(9, 5, g=g, device=device, grad=True)]
    radii = torch.rand(9, generator=g, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: ops.sphere_distance(a, b, c, k=3)[0], (*leaves, radii))
    assert torch.autograd.gradcheck(lambda s: ops.topk_mean(s, 4), (randn(3, 20, g=g, device=device, grad=True),))


@pytest.mark.parametrize("device", devices())
def test_knn_graph_and_max_relative(device):
    g = generator(2)
    x = randn(2, 30, 4, g=g, device=device, dtype=torch.float32)
    opcheck("knn_graph", x, 4, 2, None, True)
    opcheck("knn_graph", x, 3, 1, randn(30, 30, g=g, device=device, dtype=torch.float32), False)
    # Distinct, well-separated values: a finite-difference step cannot change the argmax.
    values = (torch.randperm(2 * 9 * 4, generator=g).double() / 10).reshape(2, 9, 4).to(device)
    index = random_index(2, 9, 3, g, device)
    opcheck("max_relative", values.float(), index)
    opcheck("max_relative", values.clone().requires_grad_(), index)
    opcheck("max_relative_backward", randn(2, 9, 4, g=g, device=device), values, index)
    assert torch.autograd.gradcheck(lambda t: ops.max_relative(t, index), (values.clone().requires_grad_(),))


@pytest.mark.parametrize("device", devices())
def test_sparse_graph_attention(device):
    g = generator(3)
    B, H, N, D, K = 2, 2, 9, 4, 3
    q, k, v = (randn(B, H, N, D, g=g, device=device, grad=True) for _ in range(3))
    index, bias = random_index(B, N, K, g, device), randn(B, H, N, K, g=g, device=device, grad=True)
    opcheck("sparse_graph_attention", q, k, v, index, bias, 0.5)
    opcheck("sparse_graph_attention", *(t.detach().float() for t in (q, k, v)), index, None, 0.5)
    out, lse = torch.ops.slsg.sparse_graph_attention(q.detach(), k.detach(), v.detach(), index, bias.detach(), 0.5)
    for bias_grad in (True, False):
        opcheck("sparse_graph_attention_backward", torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                index, bias.detach(), lse, 0.5, bias_grad)
    assert torch.autograd.gradcheck(lambda a, b, c, d: ops.sparse_graph_attention(a, b, c, index, d), (q, k, v, bias))


@pytest.mark.parametrize("device", devices())
def test_dense_graph_attention(device):
    g = generator(4)
    B, H, Nq, Nk, D = 2, 2, 9, 7, 4
    q = randn(B, H, Nq, D, g=g, device=device, grad=True)
    k, v = (randn(B, H, Nk, D, g=g, device=device, grad=True) for _ in range(2))
    bias = randn(H, Nq, Nk, g=g, device=device, grad=True)
    opcheck("dense_graph_attention", q, k, v, bias, 0.5)
    opcheck("dense_graph_attention", *(t.detach().float() for t in (q, k, v)), None, 0.5)
    detached = [t.detach() for t in (q, k, v, bias)]
    out, lse, scores = torch.ops.slsg.dense_graph_attention(*detached, 0.5)
    for bias_grad in (True, False):
        opcheck("dense_graph_attention_backward", torch.randn_like(out), *detached, out, lse, None, 0.5, bias_grad)
    kernel = lambda a, b, c, d: ops.dense_graph_attention(a, b, c, d, backend="extension")  # noqa: E731
    assert torch.autograd.gradcheck(kernel, (q, k, v, bias))
