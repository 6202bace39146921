"""Locating the CUDA toolkit, for setup.py and the CMake build (no torch import here)."""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
from pathlib import Path


def find_cuda_home() -> str | None:
    """Toolkit root: $CUDA_HOME, else the real nvcc's parent (nvcc on PATH may be a wrapper
    script, which fools torch's own guess), else the usual install locations."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(str(real.parent.parent))
        try:  # a wrapper like `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            for word in real.read_text(errors="ignore").split():
                if word.endswith("/bin/nvcc"):
                    candidates.append(str(Path(word).parent.parent))
        except OSError:
            pass
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").is_file() and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return c
    return None


def _nvidia_wheel_dirs(kind: str) -> list[str]:
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(base, "*", kind)))
    return dirs


def nvidia_wheel_includes() -> list[str]:
    """Headers shipped in torch's nvidia-* wheels (e.g. cuBLAS) that a bare toolkit may lack."""
    return _nvidia_wheel_dirs("include")


def nvidia_wheel_library(name: str) -> str | None:
    """lib<name>.so[.N] from torch's nvidia-* wheels (e.g. nvrtc, which a bare toolkit may lack)."""
    for folder in _nvidia_wheel_dirs("lib"):
        found = sorted(glob.glob(os.path.join(folder, f"lib{name}.so*")))
        if found:
            return found[0]
    return None
