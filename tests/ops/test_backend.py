import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slsg
from slsg.ops import backend

ROOT = Path(__file__).resolve().parents[2]


def test_backend_reports_extension_and_devices():
    info = backend()
    assert info.name in ("extension", "reference")
    if info.name == "extension":
        assert "cpu" in info.devices and info.reason is None
    else:
        assert info.devices == () and info.reason


@pytest.mark.skipif(os.environ.get("SLSG_WITH_CUDA", "").strip().lower() in ("0", "off", "false", "no"),
                    reason="CUDA build disabled by SLSG_WITH_CUDA")
def test_cuda_kernels_compiled_when_toolkit_present():
    """Where a CUDA toolkit and a CUDA torch exist (as in CI), the build must include the
    CUDA kernels: compiling them is the check that they build."""
    from slsg._toolkit import find_cuda_home

    if find_cuda_home() is None or torch.version.cuda is None:
        pytest.skip("no CUDA toolkit or CPU-only torch: CPU-only build expected")
    assert backend().name == "extension", backend().reason
    assert "cuda" in backend().devices


def test_reference_fallback_warns_once_and_works():
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import slsg\n"
        "msgs = [str(x.message) for x in w if 'slsg' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'reference' in msgs[0], msgs\n"
        "assert slsg.ops.backend().name == 'reference'\n"
        "x, c = torch.randn(5, 3), torch.randn(7, 3)\n"
        "d, i = slsg.ops.sphere_distance(x, c, k=2)\n"
        "assert d.shape == (5, 2)\n"
        "print(slsg.ops.backend())\n"
    )
    env = dict(os.environ, SLSG_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "reference (SLSG_BACKEND=reference)" in out.stdout


def test_explicit_extension_request_without_kernel_fails_clearly():
    if backend().name == "extension":
        pytest.skip("extension present")
    with pytest.raises(RuntimeError, match="backend='extension'"):
        slsg.ops.sphere_distance(torch.randn(2, 2), torch.randn(2, 2), backend="extension")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be"):
        slsg.ops.topk_mean(torch.randn(2, 3), 1, backend="fast")


def test_an_extension_built_from_older_sources_falls_back_with_its_reason(monkeypatch):
    # An old slsg/_C*.so without a newer op: the per-op kernel lookup raised "operator
    # slsg::greedy_coreset does not exist" and `import slsg` failed.
    from slsg.ops import _extension

    monkeypatch.setattr(_extension, "_registered", lambda op: op != "greedy_coreset")
    assert _extension._load() == (False, "the compiled extension is out of date: it lacks greedy_coreset")


def test_a_missing_extension_is_reported_as_not_built(monkeypatch):
    from slsg.ops import _extension

    monkeypatch.setattr(_extension, "_registered", lambda op: False)
    monkeypatch.setitem(sys.modules, "slsg._C", None)  # the import fails
    monkeypatch.delattr(slsg, "_C", raising=False)
    monkeypatch.setattr(_extension.importlib.util, "find_spec", lambda name: None)
    assert _extension._load() == (False, "slsg._C is not built")


def test_an_extension_without_cuda_kernels_warns_once_on_cuda_tensors(monkeypatch):
    import warnings

    from slsg.ops import _extension

    monkeypatch.setattr(_extension, "EXTENSION_LOADED", True)
    monkeypatch.setattr(_extension, "_KERNELS", {("knn_graph", "cpu"): True, ("knn_graph", "cuda"): False})
    monkeypatch.setattr(_extension, "_warned_no_cuda", False)
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="no CUDA kernels"):
        assert _extension.use_extension("knn_graph", cuda, "auto") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _extension.use_extension("knn_graph", cuda, "auto") is False  # once per process
        assert _extension.use_extension("knn_graph", torch.device("cpu"), "auto") is True
        assert _extension.use_extension("knn_graph", cuda, "reference") is False
