import pytest
import torch
import torch.nn.functional as F

from slsg.nn import LargeKernelAttention


def test_matches_its_definition():
    torch.manual_seed(0)
    block = LargeKernelAttention(6).double()
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    attn = F.conv2d(x, block.depthwise.weight, block.depthwise.bias, padding=1, groups=6)
    attn = F.conv2d(attn, block.dilated.weight, block.dilated.bias, padding=3, dilation=3, groups=6)
    attn = F.conv2d(attn, block.pointwise.weight, block.pointwise.bias)
    torch.testing.assert_close(block(x), x * attn + x)


def test_receptive_field_is_nine_by_nine():
    block = LargeKernelAttention(1)
    x = torch.ones(1, 1, 21, 21, requires_grad=True)  # x multiplies attn: at x = 0 only the centre matters
    block(x)[0, 0, 10, 10].backward()
    rows, cols = torch.nonzero(x.grad[0, 0], as_tuple=True)
    assert rows.min() == 6 and rows.max() == 14 and cols.min() == 6 and cols.max() == 14


def test_zero_attention_is_identity():
    block = LargeKernelAttention(4)
    torch.nn.init.zeros_(block.pointwise.weight)
    torch.nn.init.zeros_(block.pointwise.bias)
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(block(x), x)


def test_bad_input():
    with pytest.raises(ValueError, match="channels must be a positive int"):
        LargeKernelAttention(0)
    with pytest.raises(ValueError, match=r"expected x of shape \[B, 4, H, W\]"):
        LargeKernelAttention(4)(torch.randn(1, 3, 5, 5))
