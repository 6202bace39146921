import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from slsg import ops
from slsg.nn import SelfAttentiveGraphConv, relative_position_similarity, sincos_2d
from slsg.nn import graph_conv as graph_conv_module
from slsg.ops import backend as ops_backend

needs_extension = pytest.mark.skipif(ops_backend().name != "extension", reason="compiled extension not in use")


def make_layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = SelfAttentiveGraphConv(**kwargs)
    # Non-trivial BatchNorm statistics and affine parameters, so eval mode is not identity.
    for module in layer.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    return layer


def independent_forward(layer, x):
    """The layer's equations written again with plain torch (no slsg ops): SDPA for the dense
    relation, a full similarity matrix and a stable sort for the graph, gather + max for
    the aggregation."""
    B, C, H, W = x.shape
    N, heads = H * W, layer.heads
    d = layer.proj_channels // heads
    qk = layer.query_key(x)
    q = qk.reshape(B, heads, d, N).transpose(2, 3)
    v = layer.value(x).reshape(B, heads, layer.value_channels // heads, N).transpose(2, 3)
    attended = F.scaled_dot_product_attention(q, q, v, scale=1 / math.sqrt(d))
    h = x + layer.dense_out(attended.transpose(2, 3).reshape(B, layer.value_channels, H, W))
    k, dilation = layer.neighbourhood(N)
    feats = F.normalize(qk.detach().flatten(2).transpose(1, 2), dim=-1)
    sim = feats @ feats.transpose(1, 2)
    if layer.relative_position_weight:
        sim = sim + layer.relative_position_weight * relative_position_similarity(layer.position_dim, H, W).to(sim)
    if not layer.include_self:
        sim = sim - torch.diag(torch.full((N,), math.inf, dtype=sim.dtype))
    index = sim.sort(dim=-1, descending=True, stable=True).indices[:, :, : k * dilation : dilation]
    nodes = x.flatten(2).transpose(1, 2)
    neighbours = torch.gather(nodes, 1, index.reshape(B, -1, 1).expand(-1, -1, C)).reshape(B, N, k, C)
    m = (neighbours.max(dim=2).values - nodes).transpose(1, 2).reshape(B, C, H, W)
    y = layer.fuse(torch.stack([h, m], dim=2).reshape(B, 2 * C, H, W))
    return x + layer.project(y)


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        ({"channels": 16}, (2, 16, 5, 7)),
        ({"channels": 8, "heads": 2, "proj_channels": 8, "value_channels": 4}, (1, 8, 6, 6)),
        ({"channels": 12, "heads": 3, "relative_position_weight": 1.0, "include_self": False}, (2, 12, 4, 5)),
        ({"channels": 8, "relative_position_weight": 0.0, "k": 4, "dilation": 1}, (2, 8, 3, 3)),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_matches_independent_implementation(kwargs, shape, backend):
    layer = make_layer(**kwargs, backend=backend).double().eval()
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, independent_forward(layer, x), atol=1e-9, rtol=1e-9)


@needs_extension
@pytest.mark.parametrize("sparse_aggregation", ["max_relative", "attention"])
@pytest.mark.parametrize("heads", [1, 4])
def test_backends_agree_in_outputs_and_gradients(sparse_aggregation, heads):
    x = torch.randn(3, 16, 6, 5, generator=torch.Generator().manual_seed(2))
    results = []
    for backend in ("extension", "reference"):
        layer = make_layer(channels=16, heads=heads, sparse_aggregation=sparse_aggregation, backend=backend).train()
        leaf = x.clone().requires_grad_()
        out = layer(leaf)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append([out.detach(), leaf.grad] + [p.grad for p in layer.parameters()])
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_every_parameter_gets_a_gradient():
    layer = make_layer(channels=8, heads=2, sparse_aggregation="attention").train()
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    layer(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_small_grids_shrink_the_neighbourhood():
    layer = make_layer(channels=8)
    assert layer.neighbourhood(1024) == (9, 3)
    assert layer.neighbourhood(20) == (9, 2)
    assert layer.neighbourhood(4) == (4, 1)
    assert layer(torch.randn(2, 8, 1, 1)).shape == (2, 8, 1, 1)
    assert layer(torch.randn(2, 8, 2, 2)).shape == (2, 8, 2, 2)


def test_position_term_sign_picks_near_or_far_nodes():
    # Identical features make every cosine 1, so the position term alone decides.
    features = torch.ones(1, 25, 4)
    centre = 12  # (row 2, col 2) of a 5 x 5 grid
    for weight, expect_far in ((-1.0, True), (1.0, False)):
        layer = make_layer(channels=32, relative_position_weight=weight)
        bias = layer.position_bias(5, 5, features.device, features.dtype)
        index = ops.knn_graph(features, 3, 1, bias, include_self=False)
        rows, cols = index[0, centre] // 5, index[0, centre] % 5
        distance = ((rows - 2).abs() + (cols - 2).abs()).float()
        assert (distance == 4).all() if expect_far else (distance == 1).all(), (weight, index[0, centre])


def test_position_similarity_is_one_on_the_diagonal_and_decays():
    r = relative_position_similarity(64, 8, 8)
    torch.testing.assert_close(r.diagonal(), torch.ones(64, dtype=torch.float64))
    assert r[0, 1] > r[0, 2] > r[0, 4] and r[0, 8] > r[0, 16]
    e = sincos_2d(8, 2, 3)
    assert e.shape == (6, 8)
    torch.testing.assert_close(e[1, :2], torch.tensor([math.sin(1.0), math.sin(1.0 / 100)], dtype=torch.float64))


@pytest.mark.parametrize("dim,height,width", [(8, 7, 6), (64, 5, 9), (16, 1, 4)])
def test_position_similarity_is_the_embeddings_product_and_exact_in_offsets(dim, height, width):
    e = sincos_2d(dim, height, width)
    r = relative_position_similarity(dim, height, width)
    torch.testing.assert_close(r, 2.0 * (e @ e.T) / dim, rtol=0, atol=1e-12)
    assert torch.equal(r, r.T) and (r.diagonal() == 1).all()
    # Offsets (dx, dy) and (dy, dx), and signs: bit-identical, so no backend breaks ties by rounding.
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    dx = (cols.flatten()[:, None] - cols.flatten()[None, :]).abs()
    dy = (rows.flatten()[:, None] - rows.flatten()[None, :]).abs()
    for a in range(max(height, width)):
        for b in range(max(height, width)):
            values = torch.cat([r[(dx == a) & (dy == b)], r[(dx == b) & (dy == a)]])
            if values.numel():
                assert (values == values[0]).all(), (a, b)


@pytest.mark.parametrize("sparse_aggregation", ["max_relative", "attention"])
def test_runs_under_bfloat16_autocast(sparse_aggregation):
    torch.manual_seed(7)
    layer = SelfAttentiveGraphConv(16, heads=2, sparse_aggregation=sparse_aggregation).eval()
    x = torch.randn(2, 16, 7, 5)
    with torch.no_grad():
        expected = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer(x)
    assert got.shape == expected.shape and torch.isfinite(got).all()
    assert (got.float() - expected).norm() < 0.1 * expected.norm()  # bf16 has 8 significant bits


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"channels": 8, "heads": 3}, "divisible by heads"),
        ({"channels": 6, "groups": 5}, "divisible by groups"),
        ({"channels": 0}, "channels must be a positive int"),
        ({"channels": 8, "backend": "fast"}, "backend must be"),
        ({"channels": 8, "sparse_aggregation": "mean"}, "sparse_aggregation must be one of"),
        ({"channels": 9, "heads": 2, "proj_channels": 8, "value_channels": 8, "groups": 2, "sparse_aggregation": "attention"}, "channels \\(9\\) divisible"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfAttentiveGraphConv(**kwargs)


def test_bad_input_shape():
    layer = make_layer(channels=8)
    with pytest.raises(ValueError, match=r"expected x of shape \[B, 8, H, W\]"):
        layer(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="expected x of shape"):
        layer(torch.randn(8, 3, 3))


def test_goes_through_slsg_ops_only():
    source = inspect.getsource(graph_conv_module)
    assert "torch.ops" not in source and "ops.dense_graph_attention" in source and "ops.knn_graph" in source


def test_a_single_node_is_its_own_neighbour_without_include_self():
    # There is no other node: the layer raised "k * dilation = 1 exceeds the 0 candidates".
    layer = make_layer(channels=8, include_self=False, heads=2)
    assert layer.neighbourhood(1) == (1, 1)
    x = torch.randn(2, 8, 1, 1)
    assert torch.isfinite(layer(x)).all()


def test_position_bias_follows_a_changed_weight():
    layer = make_layer(channels=8, relative_position_weight=-1.0)
    first = layer.position_bias(3, 3, torch.device("cpu"), torch.float32)
    layer.relative_position_weight = 1.0
    torch.testing.assert_close(layer.position_bias(3, 3, torch.device("cpu"), torch.float32), -first)
