import pytest
import torch

from slsg import ops

from .helpers import devices, needs_extension, noncontiguous


@needs_extension
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape,k", [((1, 1), 1), ((3, 17), 1), ((3, 17), 17), ((4, 1, 64, 64), 100), ((2, 5, 7), 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_topk(device, shape, k, dtype):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(k), dtype=dtype).to(device)
    expected = scores.reshape(shape[0], -1).double().topk(k, dim=1).values.mean(1)
    out = ops.topk_mean(scores, k)
    assert out.shape == (shape[0],) and out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


def test_ties_and_constant_maps():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    assert ops.topk_mean(scores, 2).tolist() == [3.0, 5.0]
    assert ops.topk_mean(scores, 3).tolist() == pytest.approx([8 / 3, 5.0])


@needs_extension
def test_noncontiguous_and_nan():
    scores = torch.randn(6, 40)
    torch.testing.assert_close(ops.topk_mean(noncontiguous(scores), 5), ops.topk_mean(scores, 5))
    scores[2, 7] = float("nan")
    out = ops.topk_mean(scores, 5)
    assert out[2].isnan() and not out[[0, 1, 3, 4, 5]].isnan().any()
    assert ops.topk_mean(scores, 5, backend="reference")[2].isnan()


def test_half_precision_on_cpu_uses_reference():
    scores = torch.randn(2, 50).half()
    assert ops.topk_mean(scores, 3).dtype == torch.float16


@pytest.mark.parametrize(
    "scores,k,match",
    [
        (torch.randn(5), 1, "at least 2 dims"),
        (torch.randn(2, 5), 6, r"k must be in \[1, values per map=5\]"),
        (torch.randn(2, 5), 0, "k must be in"),
        (torch.randint(0, 5, (2, 5)), 1, "dtype"),
        (torch.randn(2, 0), 1, r"each map is empty \(shape \(2, 0\)\)"),
        (torch.randn(0, 0), 1, "each map is empty"),
    ],
)
def test_bad_input(scores, k, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ops.topk_mean(scores, k)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_gradcheck_float64(backend):
    scores = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: ops.topk_mean(s, 4, backend=backend), (scores,))


@needs_extension
def test_opcheck_and_compile():
    torch.library.opcheck(torch.ops.slsg.topk_mean.default, (torch.randn(3, 20), 4))
    torch.library.opcheck(torch.ops.slsg.topk_mean.default, (torch.randn(3, 20, dtype=torch.float64, requires_grad=True), 4))
    fn = torch.compile(lambda s: ops.topk_mean(s, 10) * 2, fullgraph=True, backend="aot_eager")
    scores = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(fn(scores), ops.topk_mean(scores, 10) * 2)


def test_empty_batch_gives_empty_scores():
    assert ops.topk_mean(torch.randn(0, 7), 3).shape == (0,)
    assert ops.topk_mean(torch.randn(0, 4, 5), 1).shape == (0,)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_values_near_the_float32_maximum_do_not_overflow(backend):
    scores = torch.full((2, 10), 3e38)
    torch.testing.assert_close(ops.topk_mean(scores, 4, backend=backend), torch.full((2,), 3e38))


@needs_extension
@pytest.mark.parametrize("device", devices())
def test_direct_op_call_refuses_integer_scores(device):
    # CUDA converted them and truncated the mean back to an integer.
    with pytest.raises(RuntimeError, match="topk_mean: scores must be floating point, got Long"):
        torch.ops.slsg.topk_mean(torch.arange(10, device=device).view(2, 5), 2)
