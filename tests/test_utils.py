"""Shared helpers (slsg.utils)."""
from __future__ import annotations

import pytest
import torch

from slsg.utils import all_finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_one_bad_value_anywhere(dtype, bad):
    x = torch.randn(37, 11).to(dtype)
    assert all_finite(x)
    for where in [(0, 0), (18, 5), (36, 10)]:
        y = x.clone()
        y[where] = bad
        assert not all_finite(y)
        assert not all_finite(y.t())  # non-contiguous
        assert all_finite(y[:, :5] if where[1] >= 5 else y[:, 5:])  # a view without it


def test_all_finite_edge_cases():
    assert all_finite(torch.empty(0, 3))
    assert all_finite(torch.arange(5))  # integers are always finite
    assert all_finite(torch.tensor(3.0))
    assert not all_finite(torch.tensor(float("nan")))
    big = torch.finfo(torch.float32).max
    assert all_finite(torch.tensor([big, -big]))


def test_atomic_write_keeps_the_old_file_on_error_and_syncs_before_the_rename(tmp_path, monkeypatch):
    import os

    from slsg import utils

    target = tmp_path / "model.json"
    utils.atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with utils.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model.json"]

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    utils.atomic_write_text(target, "new")
    assert target.read_text() == "new"
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[0][1].startswith(str(tmp_path / ".model.json.")) and events[2][1] == str(tmp_path)


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    import os

    from slsg import utils

    utils.atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~utils._umask()
    mask = os.umask(0o022)
    os.umask(mask)
    assert utils._umask() == mask


def test_umask_is_read_anew_each_time(tmp_path):
    import os

    from slsg import utils

    old = os.umask(0o077)
    try:
        utils.atomic_write_text(tmp_path / "private.txt", "x")
        assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_elapsed_status_shows_the_step_and_cleans_up(capsys):
    import threading
    import time

    from slsg.utils import elapsed_status

    def ours() -> int:
        return sum(t.name == "slsg-elapsed-status" for t in threading.enumerate())

    with elapsed_status("coreset: selecting 5 of 50 patches", interval=0.01):
        time.sleep(0.05)
    assert "coreset: selecting 5 of 50 patches" in capsys.readouterr().err
    assert ours() == 0  # the refreshing thread has ended
    with pytest.raises(KeyError):  # an error inside passes through, the line is closed
        with elapsed_status("failing step", interval=0.01):
            raise KeyError("x")
    assert ours() == 0
    with elapsed_status("quiet", enabled=False):
        pass
    assert "quiet" not in capsys.readouterr().err
