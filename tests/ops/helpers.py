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
    """Same values, non-contiguous layout (a transposed copy viewed back)."""
    out = t.t().contiguous().t() if t.dim() == 2 else t.unsqueeze(-1).expand(*t.shape, 2)[..., 0]
    assert not out.is_contiguous() or t.numel() <= 1
    return out


def devices() -> list:
    """Device parameters: CUDA cases are always collected and skip cleanly without a GPU."""
    return ["cpu", pytest.param("cuda", marks=needs_cuda)]
