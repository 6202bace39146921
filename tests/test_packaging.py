"""The source distribution holds what building it needs (setup.py lists only the .cpp files)."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_sdist_holds_every_kernel_source_and_header(tmp_path):
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    tree = tmp_path / "tree"
    for name in tracked:  # a copy: sdist writes egg-info and a release tree beside setup.py
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    env = dict(os.environ, SLSG_WITH_CUDA="0")
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")],
                         cwd=tree, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    (archive,) = (tmp_path / "dist").glob("slsg-*.tar.gz")
    with tarfile.open(archive) as tar:
        inside = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = [n for n in tracked if n.startswith("csrc/")] + ["CMakeLists.txt", "LICENSE", "pyproject.toml"]
    assert not [n for n in needed if n not in inside], "missing from the sdist"
