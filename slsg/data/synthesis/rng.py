"""Scalar draws from a torch.Generator: every random choice in synthesis goes through these."""
from __future__ import annotations

import torch

__all__ = ["uniform", "randint", "chance"]


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    """A float uniform in [low, high)."""
    return low + (high - low) * float(torch.rand((), generator=generator, device=generator.device))


def randint(generator: torch.Generator, low: int, high: int) -> int:
    """An int uniform in [low, high], both ends included."""
    return int(torch.randint(low, high + 1, (), generator=generator, device=generator.device))


def chance(generator: torch.Generator, p: float) -> bool:
    """True with probability p. Always draws, so the stream does not depend on p."""
    return uniform(generator, 0.0, 1.0) < p
