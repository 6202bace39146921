import pytest
import torch
from torch import nn

from slsg.nn.pointwise import PointwiseConv2d


@pytest.mark.parametrize("groups,bias", [(1, True), (1, False), (4, False), (2, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_conv2d_in_output_and_gradients(groups, bias, channels_last):
    g = torch.Generator().manual_seed(groups)
    ours = PointwiseConv2d(8, 12, groups=groups, bias=bias).double()
    conv = nn.Conv2d(8, 12, 1, groups=groups, bias=bias).double()
    conv.load_state_dict(ours.state_dict())  # same parameters and state_dict keys
    x = torch.randn(3, 8, 5, 7, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), conv(xb)
    torch.testing.assert_close(ya, yb)
    probe = torch.randn(ya.shape, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad(ya, [xa, *ours.parameters()], probe)
    gb = torch.autograd.grad(yb, [xb, *conv.parameters()], probe)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def test_wrong_input_names_the_shape():
    layer = PointwiseConv2d(8, 4)
    with pytest.raises(ValueError, match=r"\[B, 8, H, W\], got \(2, 6, 3, 3\)"):
        layer(torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError, match="got \\(8, 3, 3\\)"):
        layer(torch.randn(8, 3, 3))
