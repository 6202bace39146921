"""Large-kernel spatial attention, the block SLSG puts on its decoder's skip connections."""
from __future__ import annotations

import torch
from torch import nn


class LargeKernelAttention(nn.Module):
    """``out = x * attn(x) + x`` with ``attn = Conv1x1(DWConv3x3_dilation3(DWConv3x3(x)))``.

    Two depthwise 3x3 convolutions, the second dilated by 3, see a 9x9 window (a large
    kernel, cheaply); the 1x1 convolution mixes channels. The product re-weights the input
    position by position and channel by channel; the residual keeps the input's signal.
    Shape-preserving: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"LargeKernelAttention: channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.dilated = nn.Conv2d(channels, channels, 3, padding=3, dilation=3, groups=channels)
        self.pointwise = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"LargeKernelAttention: expected x of shape [B, {self.channels}, H, W], got {tuple(x.shape)}")
        attn = self.pointwise(self.dilated(self.depthwise(x)))
        return x * attn + x
