"""Loads the compiled extension (slsg._C) and decides, per op and device, whether to use it.

Without the extension every op falls back to its pure-PyTorch reference, after one clear
warning. SLSG_BACKEND=reference forces the fallback (useful to compare or to debug).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch

OPS = (
    "sphere_distance",
    "topk_mean",
    "greedy_coreset",
    "knn_graph",
    "max_relative",
    "sparse_graph_attention",
    "dense_graph_attention",
)


def _registered(op: str) -> bool:
    return bool(torch._C._jit_get_schemas_for_operator(f"slsg::{op}"))


def _load() -> tuple[bool, str | None]:
    if os.environ.get("SLSG_BACKEND", "").lower() == "reference":
        return False, "SLSG_BACKEND=reference"
    # The CMake build's libslsg_ops.so, loaded with torch.ops.load_library, registers the same
    # ops; importing slsg._C as well would abort the process (one TORCH_LIBRARY per namespace).
    if not any(_registered(op) for op in OPS):
        try:
            from slsg import _C  # noqa: F401  (importing registers the torch.ops.slsg kernels)
        except ImportError as exc:
            if importlib.util.find_spec("slsg._C") is None:
                return False, "slsg._C is not built"
            return False, str(exc)
    missing = [op for op in OPS if not _registered(op)]
    if missing:  # built from older sources
        return False, f"the compiled extension is out of date: it lacks {', '.join(missing)}"
    return True, None


EXTENSION_LOADED, _LOAD_ERROR = _load()
if not EXTENSION_LOADED:
    warnings.warn(
        "slsg: compiled kernels (slsg._C) are not available "
        f"({_LOAD_ERROR}); falling back to the pure-PyTorch reference ops, which are slower. "
        "Build them with `pip install -e . --no-build-isolation`.",
        RuntimeWarning,
        stacklevel=2,
    )


# Looked up once: a plain dict stays traceable by torch.compile, the dispatcher query does not.
_KERNELS = {
    (op, device): EXTENSION_LOADED
    and torch._C._dispatch_has_kernel_for_dispatch_key(f"slsg::{op}", device.upper())
    for op in OPS
    for device in ("cpu", "cuda")
}


def has_kernel(op: str, device_type: str) -> bool:
    """Whether the extension has a kernel for `op` on `device_type` ("cpu" or "cuda")."""
    return _KERNELS.get((op, device_type), False)


def use_extension(op: str, device: torch.device, backend: str) -> bool:
    """Resolve a per-call backend choice: "auto" | "extension" | "reference"."""
    if backend == "reference":
        return False
    available = has_kernel(op, device.type)
    if backend == "extension" and not available:
        raise RuntimeError(
            f"{op}: backend='extension' requested but the compiled extension has no {device.type} "
            f"kernel ({_LOAD_ERROR or 'built without ' + device.type.upper() + ' support'})"
        )
    if backend not in ("auto", "extension"):
        raise ValueError(f"{op}: backend must be 'auto', 'extension' or 'reference', got {backend!r}")
    if not available and device.type == "cuda" and EXTENSION_LOADED and not _warned_no_cuda \
            and not torch.compiler.is_compiling():
        _warn_no_cuda_kernels()
    return available


_warned_no_cuda = False


def _warn_no_cuda_kernels() -> None:
    # The import-time warning covers a missing extension; this one an extension built without CUDA
    # (no toolkit at install time), whose CUDA tensors would otherwise quietly take the slow path.
    global _warned_no_cuda
    _warned_no_cuda = True
    warnings.warn("slsg: the compiled extension has no CUDA kernels (built without a CUDA toolkit); ops on "
                  "CUDA tensors use the pure-PyTorch reference, which is slower. Reinstall with a CUDA toolkit "
                  "present (SLSG_WITH_CUDA=1 makes that an error when it cannot build them).",
                  RuntimeWarning, stacklevel=3)


@dataclass(frozen=True)
class BackendInfo:
    name: str  # "extension" or "reference"
    devices: tuple[str, ...]  # devices the extension has kernels for
    reason: str | None = None  # why the extension is not in use
    cpu_gemm: str | None = None  # matrix product of the CPU kernels: "avx2" (ours) or "blas"
    cpu_screen: str | None = None  # sphere_distance's float32 screen: "bf16" (AVX-512 BF16) or "off"
    cpu_blas: str | None = None  # how the CPU attention kernels call the BLAS: "direct" or "aten"

    def __str__(self) -> str:
        if self.name == "extension":
            return f"extension ({', '.join(self.devices)})"
        return f"reference ({self.reason})"


def backend() -> BackendInfo:
    """Which implementation the ops use and which devices the extension supports."""
    if not EXTENSION_LOADED:
        return BackendInfo("reference", (), _LOAD_ERROR)
    devices = tuple(d for d in ("cpu", "cuda") if all(has_kernel(op, d) for op in OPS))
    return BackendInfo(
        "extension",
        devices,
        cpu_gemm=str(torch.ops.slsg.cpu_gemm()),
        cpu_screen=str(torch.ops.slsg.cpu_screen()),
        cpu_blas=str(torch.ops.slsg.cpu_blas()),
    )
