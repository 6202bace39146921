import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slsg.data.io import DataError
from slsg.data.synthesis import AnomalySynthesizer, write_examples


def _folder(tmp_path, n=3, size=40):
    d = tmp_path / "normals"
    d.mkdir()
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        img = np.stack([(xx * (i + 3)) % 255, (yy * 5) % 255, ((xx + yy) * 2 + 40 * i) % 255], -1)
        Image.fromarray(img.astype(np.uint8)).save(d / f"{i:03d}.png")
    return d


def test_writes_all_files(tmp_path):
    out = tmp_path / "out"
    paths = write_examples(_folder(tmp_path), out, n=4, seed=0, image_size=32)
    names = {p.name for p in paths}
    for k in range(4):
        assert {f"{k:03d}_image.png", f"{k:03d}_mask.png", f"{k:03d}_source.png", f"{k:03d}_normal.png"} <= names
    assert {"overview.png", "examples.json"} <= names
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # nothing else, no temp files
    mask = np.asarray(Image.open(out / "000_mask.png"))
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255} and (mask == 255).sum() >= 49
    image = Image.open(out / "000_image.png")
    assert image.size == (32, 32) and image.mode == "RGB"
    assert Image.open(out / "overview.png").size == (1024, 2 * 144)
    meta = json.loads((out / "examples.json").read_text())
    assert len(meta["examples"]) == 4 and meta["config"]["self_content_prob"] == 0.58
    assert {e["kind"] for e in meta["examples"]} <= {"structural", "logical"}


def test_rerun_replaces_the_set_and_a_failed_run_leaves_nothing(tmp_path):
    folder, out = _folder(tmp_path), tmp_path / "out"
    write_examples(folder, out, n=5, seed=0, image_size=32)
    (out / "notes.txt").write_text("mine")  # not ours: never touched
    paths = write_examples(folder, out, n=2, seed=0, image_size=32)
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in paths] + ["notes.txt"])
    # A corrupt image met partway: none of this run's files stay behind.
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"{i}.png").write_bytes((folder / f"{i:03d}.png").read_bytes())
    (broken / "3.png").write_bytes((folder / "000.png").read_bytes()[:60])
    with pytest.raises(DataError):
        write_examples(broken, tmp_path / "fresh", n=8, seed=0, image_size=32)
    assert not (tmp_path / "fresh").exists() or not any((tmp_path / "fresh").iterdir())


def test_seeded(tmp_path):
    folder = _folder(tmp_path)
    write_examples(folder, tmp_path / "a", n=3, seed=1, image_size=32)
    write_examples(folder, tmp_path / "b", n=3, seed=1, image_size=32)
    write_examples(folder, tmp_path / "c", n=3, seed=2, image_size=32)
    same = [(tmp_path / "a" / f"{k:03d}_image.png").read_bytes() == (tmp_path / "b" / f"{k:03d}_image.png").read_bytes()
            for k in range(3)]
    diff = [(tmp_path / "a" / f"{k:03d}_mask.png").read_bytes() != (tmp_path / "c" / f"{k:03d}_mask.png").read_bytes()
            for k in range(3)]
    assert all(same) and any(diff)


def test_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        write_examples(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        write_examples(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ValueError, match="n must be"):
        write_examples(tmp_path, tmp_path / "out", n=0)
    with pytest.raises(ValueError, match="unknown synthesis preset"):
        write_examples(_folder(tmp_path), tmp_path / "out", preset="nope")
    for size in (8, 100000):  # 100000 ran out of memory with no message
        with pytest.raises(ValueError, match=r"image_size must be an int in \[16, 8192\]"):
            write_examples(tmp_path, tmp_path / "out", image_size=size)


def test_real_bottle_with_dtd(shared_data, tmp_path):
    bottle, dtd = shared_data / "mvtec_ad" / "bottle", shared_data / "textures" / "dtd"
    if not (bottle.is_dir() and dtd.is_dir()):
        pytest.skip("bottle or DTD data missing")
    paths = write_examples(bottle, tmp_path / "ex", n=2, seed=0, textures=dtd, preset="object", image_size=64)
    meta = json.loads((tmp_path / "ex" / "examples.json").read_text())
    assert all("/train/good/" in e["input"] for e in meta["examples"])
    assert meta["config"]["foreground"] == "border" and len(paths) == 2 * 4 + 2


def _snapshot(out):
    return {p.name: p.read_bytes() for p in out.iterdir()}


def _assert_previous_set_intact(out, before):
    meta = json.loads((out / "examples.json").read_text())
    parts = ("normal", "source", "image", "mask")
    listed = [f"{r['index']:03d}_{part}.png" for r in meta["examples"] for part in parts]
    assert _snapshot(out) == before  # every file of the surviving set, unchanged; no leftovers
    assert set(listed) <= set(before)


def test_a_failed_rerun_leaves_the_previous_set_intact(tmp_path, monkeypatch):
    folder, out = _folder(tmp_path), tmp_path / "out"
    write_examples(folder, out, n=4, seed=0, image_size=32)
    before = _snapshot(out)
    original = AnomalySynthesizer.sample
    calls = []

    def fail_on_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("synthesis failed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AnomalySynthesizer, "sample", fail_on_third)
    with pytest.raises(RuntimeError, match="synthesis failed"):
        write_examples(folder, out, n=4, seed=1, image_size=32)
    _assert_previous_set_intact(out, before)


def test_an_interrupted_move_into_place_is_undone(tmp_path, monkeypatch):
    folder, out = _folder(tmp_path), tmp_path / "out"
    write_examples(folder, out, n=3, seed=0, image_size=32)
    before = _snapshot(out)
    replace, interrupted = os.replace, []

    def interrupt_midway(source, target):  # once: as the new 001_image.png moves in
        if not interrupted and Path(target) == out / "001_image.png" and Path(source).parent.name.startswith(
                ".slsg-examples-new-"):
            interrupted.append(source)
            raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(os, "replace", interrupt_midway)
    with pytest.raises(KeyboardInterrupt):
        write_examples(folder, out, n=2, seed=1, image_size=32)
    assert interrupted
    monkeypatch.setattr(os, "replace", replace)
    _assert_previous_set_intact(out, before)
    write_examples(folder, out, n=2, seed=1, image_size=32)  # the smaller set replaces the larger one
    assert len(_snapshot(out)) == 2 * 4 + 2
