"""C++ deployment: CMakeLists.txt builds csrc/ against libtorch into a library that
torch.ops.load_library loads."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slsg._toolkit import find_cuda_home, nvidia_wheel_includes, nvidia_wheel_library

ROOT = Path(__file__).resolve().parents[1]


def cmake_build(tmp_path, cuda: bool) -> Path:
    build = tmp_path / "build"
    configure = ["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    env = dict(os.environ)
    if torch.version.cuda is not None:
        cuda_home = find_cuda_home()
        if cuda_home is None:
            pytest.skip("a CUDA build of libtorch needs a CUDA toolkit to configure")
        configure.append(f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}")
        if cuda:
            configure += ["-DSLSG_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={cuda_home}/bin/nvcc"]
            # A bare toolkit (this project's CI) lacks cuBLAS headers and nvrtc: torch's
            # nvidia-* wheels have them, as setup.py uses.
            includes = " ".join(f"-I{d}" for d in nvidia_wheel_includes())
            configure += [f"-DCMAKE_CUDA_FLAGS={includes}", f"-DCMAKE_CXX_FLAGS={includes}"]
            nvrtc = nvidia_wheel_library("nvrtc")
            if nvrtc and not list(Path(cuda_home).glob("lib*/libnvrtc.so*")):
                configure.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
            env["TORCH_CUDA_ARCH_LIST"] = "9.0"  # one architecture: a compile check
    elif cuda:
        pytest.skip("torch is not a CUDA build")
    for cmd in (configure, ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1)]):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    library = build / "libslsg_ops.so"
    assert library.is_file()
    return library


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "with-cuda-kernels"])
def test_cmake_build_loads_and_runs(tmp_path, cuda):
    library = cmake_build(tmp_path, cuda)
    # A fresh interpreter without slsg._C: the namespace may be registered only once.
    code = (
        "import torch\n"
        f"torch.ops.load_library({str(library)!r})\n"
        "x = torch.tensor([[0.0, 0.0], [3.0, 0.0]]); c = torch.tensor([[1.0, 0.0], [2.5, 0.0], [9.0, 9.0]])\n"
        "d, i = torch.ops.slsg.sphere_distance(x, c, None, 2)\n"
        "assert i.tolist() == [[0, 1], [1, 0]], i\n"
        "assert d.tolist() == [[1.0, 6.25], [0.25, 4.0]], d\n"
        "assert torch.ops.slsg.topk_mean(torch.tensor([[1.0, 4.0, 2.0]]), 2).item() == 3.0\n"
        "has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key('slsg::sphere_distance', 'CUDA')\n"
        f"assert has_cuda == {cuda}, has_cuda\n"
        "if has_cuda and torch.cuda.is_available():  # on a GPU machine, run a CUDA kernel too\n"
        "    d, i = torch.ops.slsg.sphere_distance(x.cuda(), c.cuda(), None, 2)\n"
        "    assert i.tolist() == [[0, 1], [1, 0]] and d.tolist() == [[1.0, 6.25], [0.25, 4.0]], (d, i)\n"
        # slsg then uses the loaded library: importing its own slsg._C as well aborted the process.
        "import slsg\n"
        "assert slsg.ops.backend().name == 'extension', slsg.ops.backend()\n"
        "assert slsg.ops.sphere_distance(x, c, k=2)[1].tolist() == [[0, 1], [1, 0]]\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
