"""Small synthetic images and generators for the synthesis tests (imported by them)."""
from __future__ import annotations

import math

import torch


def smooth_image(size: int = 64, seed: int = 0) -> torch.Tensor:
    """A structured RGB image [3, S, S] in [0, 1]: smooth colour waves plus a disc."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    freqs = torch.rand(3, 2, generator=g) * 6 + 1
    chans = [0.5 + 0.35 * torch.sin(2 * math.pi * (f[0] * xs + f[1] * ys)) for f in freqs]
    image = torch.stack(chans)
    disc = ((xs - 0.5) ** 2 + (ys - 0.5) ** 2) < 0.1
    image[:, disc] = image[:, disc] * 0.3
    return image.clamp(0, 1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
