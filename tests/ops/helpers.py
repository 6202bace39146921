"""Shared test helpers for the op tests."""
import pytest
import torch

from slsg.ops import backend

needs_extension = pytest.mark.skipif(
    backend().name != "extension", reason=f"compiled extension not in use: {backend().reason}"
)
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in backend().devices,
    reason="needs a CUDA GPU and the extension's CUDA kernels",
)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous layout, for tensors of any rank (every other element of
    an interleaved copy)."""
    out = torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    assert not out.is_contiguous() or t.numel() <= 1
    return out


def devices() -> list:
    """Device parameters: CUDA cases are always collected and skip cleanly without a GPU."""
    return ["cpu", pytest.param("cuda", marks=needs_cuda)]
