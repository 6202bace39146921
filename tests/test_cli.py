import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slsg import cli
from slsg.detectors import MemoryBankConfig, MemoryBankDetector


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A saved detector on random images (random backbone weights: fast, no files needed)."""
    images = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    config = MemoryBankConfig(image_size=32, weights=None, coreset_ratio=None)
    detector = MemoryBankDetector(config, progress=False).fit(images)
    return detector.save(tmp_path_factory.mktemp("run") / "model").parent


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("fit", "test", "predict", "download", "simulate"):
        assert command in out


def test_bad_data_path_is_one_line_exit_2(capsys, tmp_path):
    missing = tmp_path / "no_such_dataset"
    code, _, err = run(capsys, "fit", "--data", missing, "--out", tmp_path / "run", "--quiet")
    assert code == 2
    assert str(missing) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_unrecognised_dataset_layout(capsys, tmp_path):
    (tmp_path / "stuff").mkdir()
    code, _, err = run(capsys, "fit", "--data", tmp_path / "stuff", "--out", tmp_path / "run")
    assert code == 2 and "layout" in err and str(tmp_path / "stuff") in err


def test_test_and_predict_with_missing_model(capsys, tmp_path):
    code, _, err = run(capsys, "test", "--model", tmp_path / "nomodel", "--data", tmp_path)
    assert code == 2 and str(tmp_path / "nomodel") in err
    code, _, err = run(capsys, "predict", "--model", tmp_path / "nomodel", tmp_path / "x.png")
    assert code == 2 and str(tmp_path / "nomodel") in err


def test_predict_bad_images(capsys, tmp_path, tiny_model):
    code, _, err = run(capsys, "predict", "--model", tiny_model, tmp_path / "missing.png")
    assert code == 2 and str(tmp_path / "missing.png") in err
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG but not really")
    code, _, err = run(capsys, "predict", "--model", tiny_model, corrupt)
    assert code == 2 and str(corrupt) in err and "Traceback" not in err


def test_predict_writes_scores_and_heatmaps(capsys, tmp_path, tiny_model):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (50, 40), (90, 120, 30)).save(folder / "a.png")
    Image.new("L", (30, 30), 200).save(folder / "b.jpg")  # grayscale works too
    (tmp_path / "other").mkdir()
    Image.new("RGB", (20, 20), (10, 10, 10)).save(tmp_path / "other" / "a.png")  # same name, other folder
    code, out, err = run(capsys, "predict", "--model", tiny_model, folder, tmp_path / "other" / "a.png",
                         "--out", tmp_path / "pred", "--quiet")
    assert code == 0, err
    lines = [line.split("\t") for line in out.splitlines() if "\t" in line]
    assert [Path(p[0]).name for p in lines] == ["a.png", "b.jpg", "a.png"]
    assert all(p[2] in ("normal", "anomalous") for p in lines)
    record = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert [r["score"] for r in record["predictions"]] == pytest.approx([float(p[1]) for p in lines], abs=1e-4)
    with Image.open(tmp_path / "pred" / "a_heatmap.png") as im:
        assert im.width == 2 * 50 + 4
    assert len({r["heatmap"] for r in record["predictions"]}) == 3


def test_predict_skips_unreadable_images_and_keeps_the_others(capsys, tmp_path, tiny_model):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.png", "c.png"):
        Image.new("RGB", (40, 40), (90, 120, 30)).save(folder / name)
    Image.new("RGB", (40, 40)).save(tmp_path / "full.png")
    (folder / "b.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])  # a half-copied file
    code, out, err = run(capsys, "predict", "--model", tiny_model, folder, "--out", tmp_path / "pred", "--quiet",
                         "--batch-size", 2)
    assert code == 2 and "1 of 3 images could not be read" in err and "b.png" in err
    assert [Path(line.split("\t")[0]).name for line in out.splitlines() if "\t" in line] == ["a.png", "c.png"]
    record = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert [Path(r["path"]).name for r in record["predictions"]] == ["a.png", "c.png"]
    assert [Path(r["path"]).name for r in record["unreadable"]] == ["b.png"]
    # a pattern no shell expanded (quoted; Windows shells never expand them)
    code, out, err = run(capsys, "predict", "--model", tiny_model, str(folder / "[ac].png"), "--quiet")
    assert code == 0 and [Path(line.split("\t")[0]).name for line in out.splitlines()] == ["a.png", "c.png"], err
    code, _, err = run(capsys, "predict", "--model", tiny_model, str(folder / "*.jpg"), "--quiet")
    assert code == 2 and "no file matches" in err
    # --model may name the model's detector.json itself
    code, _, err = run(capsys, "predict", "--model", tiny_model / "model" / "detector.json", folder / "a.png")
    assert code == 0, err
    # --out: not an input folder; not under a file (found before any work)
    code, _, err = run(capsys, "predict", "--model", tiny_model, folder, "--out", folder, "--quiet")
    assert code == 2 and "is an input folder" in err
    code, _, err = run(capsys, "predict", "--model", tiny_model, folder, "--out", tmp_path / "full.png" / "x")
    assert code == 2 and "cannot be created" in err and "full.png is a file" in err
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    code, _, err = run(capsys, "predict", "--model", tiny_model, folder, "--out", tmp_path / "dangling")
    assert code == 2 and "is a link to nothing" in err


def test_predict_warns_once_about_images_far_larger_than_the_training_images(capsys, tmp_path, tiny_model):
    from PIL import Image

    for name in ("big1.png", "big2.png"):
        Image.new("RGB", (200, 200), (90, 120, 30)).save(tmp_path / name)  # model trained at 32 px
    for _ in range(2):  # each run says it once, not once per process
        code, _, err = run(capsys, "predict", "--model", tiny_model, tmp_path / "big1.png", tmp_path / "big2.png",
                           "--batch-size", 1, "--quiet")
        assert code == 0 and err.count("over 16 times the pixels of the training images") == 1, err


def test_predict_out_of_memory_names_the_image(capsys, tmp_path, tiny_model, monkeypatch):
    from PIL import Image

    from slsg.detectors import MemoryBankDetector

    for name, side in (("small.png", 40), ("large.png", 90)):
        Image.new("RGB", (side, side), (90, 120, 30)).save(tmp_path / name)

    def exhausted(self, images):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(MemoryBankDetector, "predict_each", exhausted)
    code, _, err = run(capsys, "predict", "--model", tiny_model, tmp_path / "small.png", tmp_path / "large.png")
    assert code == 2 and "out of memory scoring 2 image(s), the largest" in err and "large.png (90 x 90 px" in err
    assert "use --batch-size 1" in err

    def other_error(self, images):
        raise RuntimeError("an illegal memory access was encountered")  # not out of memory: raised as it is

    monkeypatch.setattr(MemoryBankDetector, "predict_each", other_error)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        cli.main(["predict", "--model", str(tiny_model), str(tmp_path / "small.png")])


def test_warnings_print_as_one_line(capsys, tmp_path):
    from PIL import Image

    good = tmp_path / "good"
    good.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 90, 30)).save(good / f"{i}.png")
    import subprocess
    import sys

    # a process of its own: pytest records warnings instead of printing them
    result = subprocess.run([sys.executable, "-m", "slsg.cli", "fit", "--data", str(good), "--out", str(tmp_path / "run"),
                             "--no-eval", "--weights", "none", "--image-size", "32", "--quiet"],
                            capture_output=True, text=True, cwd=Path(cli.__file__).parents[1])
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("warning: ") for line in lines), result.stderr  # no source lines


def test_predict_never_overwrites_a_heatmap(capsys, tmp_path, tiny_model):
    # "a_3.png" and two "a.png": the fallback name of a duplicate must not hit a third file.
    from PIL import Image

    paths = [tmp_path / "x" / "a_3.png", tmp_path / "d1" / "a.png", tmp_path / "d2" / "a.png"]
    for i, path in enumerate(paths):
        path.parent.mkdir()
        Image.new("RGB", (20, 20), (40 * i, 90, 30)).save(path)
    code, _, err = run(capsys, "predict", "--model", tiny_model, *paths, "--out", tmp_path / "pred", "--quiet")
    assert code == 0, err
    names = [r["heatmap"] for r in json.loads((tmp_path / "pred" / "predictions.json").read_text())["predictions"]]
    assert len(set(names)) == 3 and all((tmp_path / "pred" / n).is_file() for n in names)


def test_predict_into_the_images_own_folder_never_overwrites_an_input(capsys, tmp_path, tiny_model):
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (20, 20), (10, 90, 30)).save(imgs / "a.png")
    Image.new("RGB", (20, 20), (200, 90, 30)).save(imgs / "a_heatmap.png")  # an input, by its name
    before = (imgs / "a_heatmap.png").read_bytes()
    raw = tmp_path / "raw"  # and an input that is a link into another folder
    raw.mkdir()
    Image.new("RGB", (20, 20), (90, 90, 30)).save(raw / "x.png")
    Image.new("RGB", (20, 20), (90, 10, 30)).save(imgs / "b.png")
    (imgs / "b_heatmap.png").symlink_to(raw / "x.png")
    code, _, err = run(capsys, "predict", "--model", tiny_model, imgs / "a.png", imgs / "a_heatmap.png",
                       imgs / "b.png", imgs / "b_heatmap.png", "--out", imgs, "--quiet")
    assert code == 0, err
    assert (imgs / "a_heatmap.png").read_bytes() == before
    assert (imgs / "b_heatmap.png").is_symlink()
    names = [r["heatmap"] for r in json.loads((imgs / "predictions.json").read_text())["predictions"]]
    assert not {"a_heatmap.png", "b_heatmap.png"} & set(names)
    assert len(set(names)) == 4 and all((imgs / n).is_file() for n in names)


def test_worker_errors_show_the_original_message():
    from slsg.cli import worker_message

    text = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\n    raise DataError(msg)\n'
            "slsg.data.io.DataError: cannot read image file a.png: image file is truncated\n")
    assert worker_message(text) == "cannot read image file a.png: image file is truncated"
    assert worker_message("plain: message") == "plain: message"


def test_download_and_simulate_dispatch(capsys, tmp_path, monkeypatch):
    calls = {}

    def fake_download(dataset, category, root, url=None, progress=True):
        calls["download"] = (dataset, category, str(root), url)
        return Path(root) / category

    def fake_write_examples(data_dir, out_dir, n=16, seed=0, textures=None, preset=None, image_size=256):
        calls["simulate"] = (str(data_dir), str(out_dir), n, seed)
        return [Path(out_dir) / "000_image.png"]

    monkeypatch.setattr("slsg.data.download.download", fake_download)
    monkeypatch.setattr("slsg.data.synthesis.write_examples", fake_write_examples)
    code, out, _ = run(capsys, "download", "mvtec-ad", "bottle", "--root", tmp_path / "data")
    assert code == 0 and calls["download"] == ("mvtec-ad", "bottle", str(tmp_path / "data"), None)
    assert str(tmp_path / "data" / "bottle") in out
    source = tmp_path / "source"
    source.mkdir()
    code, _, _ = run(capsys, "simulate", "--data", source, "--out", tmp_path / "sim", "-n", 3, "--seed", 7)
    assert code == 0 and calls["simulate"] == (str(source), str(tmp_path / "sim"), 3, 7)
    # Written into the data folder, the examples (simulated defects) would be read as normal images.
    del calls["simulate"]
    code, _, err = run(capsys, "simulate", "--data", source, "--out", source / "sim")
    assert code == 2 and "lies inside the input folder" in err and "simulate" not in calls
    code, _, err = run(capsys, "simulate", "--data", tmp_path / "none", "--out", tmp_path / "sim")
    assert code == 2 and str(tmp_path / "none") in err


def _bottle_subset(bottle: Path, root: Path, n_train: int = 20, n_test: dict | None = None) -> Path:
    """A small MVTec AD layout of symbolic links to real bottle images (nothing is copied)."""
    n_test = n_test or {"good": 4, "broken_large": 2, "broken_small": 2, "contamination": 2}
    sub = root / "bottle"
    (sub / "train" / "good").mkdir(parents=True)
    for path in sorted((bottle / "train" / "good").glob("*.png"))[:n_train]:
        (sub / "train" / "good" / path.name).symlink_to(path)
    for defect, count in n_test.items():
        (sub / "test" / defect).mkdir(parents=True)
        for path in sorted((bottle / "test" / defect).glob("*.png"))[:count]:
            (sub / "test" / defect / path.name).symlink_to(path)
            if defect != "good":
                mask = bottle / "ground_truth" / defect / f"{path.stem}_mask.png"
                (sub / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                (sub / "ground_truth" / defect / mask.name).symlink_to(mask)
    return sub


def test_end_to_end_on_real_bottle_images(capsys, tmp_path, shared_data):
    bottle = shared_data / "mvtec_ad" / "bottle"
    if not bottle.is_dir():
        pytest.skip(f"{bottle} not found")
    data = _bottle_subset(bottle, tmp_path)
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "fit", "--data", data, "--out", run_dir, "--quiet", "--heatmaps", 1)
    assert code == 0, err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dataset"]["train_images"] == 20 and metrics["dataset"]["test_images"] == 10
    # 20 training images are enough to separate these clearly (chance is 0.5)
    assert metrics["image_auroc"] >= 0.8, metrics
    assert metrics["pixel_auroc"] >= 0.9, metrics
    assert metrics["fit_seconds"] > 0 and metrics["images_per_second"] > 0
    # bottle images are 900 x 900: the batch-1 speed is measured at the model input, 256 x 256
    assert metrics["batch1_input_size"] == [256, 256] and metrics["images_per_second_batch1"] > 0
    assert "image_auroc" in out
    for name in ("report.md", "roc.png", "pro.png", "split.json", "model/detector.json"):
        assert (run_dir / name).is_file(), name
    assert len(list((run_dir / "heatmaps").glob("*.png"))) == 4  # one per defect type and one good


def _synthetic_layout(root: Path, train: int = 5) -> Path:
    """A tiny MVTec AD layout of generated 40x48 images: bright squares are the defects."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def image(defect: bool) -> tuple[Image.Image, Image.Image]:
        pixels = (rng.uniform(90, 110, size=(40, 48, 3))).astype(np.uint8)
        mask = np.zeros((40, 48), dtype=np.uint8)
        if defect:
            mask[10:20, 20:30] = 255
            pixels[mask > 0] = (250, 20, 20)
        return Image.fromarray(pixels), Image.fromarray(mask)

    for split, defect, count in (("train", "good", train), ("test", "good", 3), ("test", "spot", 3)):
        (root / split / defect).mkdir(parents=True)
        for i in range(count):
            im, mask = image(defect != "good")
            im.save(root / split / defect / f"{i:03d}.png")
            if defect != "good":
                (root / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                mask.save(root / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


def test_fit_takes_the_edge_band(capsys, tmp_path):
    data = _synthetic_layout(tmp_path / "toy20", train=20)  # 2 held-out images: enough for edge levels
    code, _, err = run(capsys, "fit", "--data", data, "--out", tmp_path / "run", "--weights", "none",
                       "--image-size", 32, "--coreset-ratio", 1.0, "--quiet", "--no-eval", "--edge-band", 0)
    assert code == 0, err
    meta = json.loads((tmp_path / "run" / "model" / "detector.json").read_text())
    assert meta["config"]["edge_band"] == 0 and meta["fit_info"]["edge_levels"] is None
    code, _, err = run(capsys, "fit", "--data", data, "--out", tmp_path / "run2", "--weights", "none",
                       "--image-size", 32, "--coreset-ratio", 1.0, "--quiet", "--heatmaps", 0, "--edge-band", 2)
    assert code == 0, err
    meta = json.loads((tmp_path / "run2" / "model" / "detector.json").read_text())
    assert meta["config"]["edge_band"] == 2 and len(meta["fit_info"]["edge_levels"]) == 25
    model = json.loads((tmp_path / "run2" / "metrics.json").read_text())["model"]
    assert "edge_levels" not in model and model["edge_level_max_over_min"] >= 1
    # slsg test on the saved model (with its levels) reproduces the fit's evaluation
    first = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    code, _, err = run(capsys, "test", "--model", tmp_path / "run2", "--data", data, "--out", tmp_path / "again",
                       "--quiet", "--heatmaps", 0)
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "threshold"):
        assert again[key] == pytest.approx(first[key])
    with pytest.raises(SystemExit):
        cli.main(["fit", "--data", str(data), "--out", str(tmp_path / "bad"), "--edge-band", "-1"])
    assert "edge-band" in capsys.readouterr().err


def test_fit_then_test_reproduces_metrics(capsys, tmp_path):
    data = _synthetic_layout(tmp_path / "toy")
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "fit", "--data", data, "--out", run_dir, "--weights", "none", "--image-size", 32,
                       "--coreset-ratio", 1.0, "--quiet", "--heatmaps", 0)
    assert code == 0, err
    first = json.loads((run_dir / "metrics.json").read_text())
    assert first["dataset"]["train_images"] == 5 and first["dataset"]["test_images"] == 6
    assert first["model"]["config"]["image_size"] == 32
    code, _, err = run(capsys, "test", "--model", run_dir, "--data", data, "--out", tmp_path / "again",
                       "--quiet", "--heatmaps", 0)
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "threshold"):
        assert again[key] == pytest.approx(first[key])


def test_refit_without_evaluation_removes_the_old_metrics(capsys, tmp_path):
    data = _synthetic_layout(tmp_path / "toy")
    run_dir = tmp_path / "run"
    common = ("--weights", "none", "--image-size", 32, "--coreset-ratio", 1.0, "--quiet")
    assert run(capsys, "fit", "--data", data, "--out", run_dir, "--heatmaps", 2, *common)[0] == 0
    assert (run_dir / "metrics.json").is_file() and (run_dir / "report.md").is_file()
    assert (run_dir / "roc.png").is_file() and len(list((run_dir / "heatmaps").glob("*.png"))) >= 2
    # a report with fewer overlays leaves none of the earlier ones behind
    assert run(capsys, "test", "--model", run_dir, "--data", data, "--heatmaps", 1, "--quiet")[0] == 0
    assert len(list((run_dir / "heatmaps").glob("*.png"))) == len(list((data / "test").iterdir()))
    code, _, err = run(capsys, "fit", "--data", data, "--out", run_dir, "--no-eval", *common)
    assert code == 0, err
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "report.md").exists()
    assert not (run_dir / "roc.png").exists() and not list((run_dir / "heatmaps").glob("*.png"))


def test_out_that_is_a_file_fails_before_any_work(capsys, tmp_path, tiny_model):
    data = _synthetic_layout(tmp_path / "toy")
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for argv in (("fit", "--data", data, "--out", afile, "--weights", "none", "--image-size", 32),
                 ("test", "--model", tiny_model, "--data", data, "--out", afile),
                 ("predict", "--model", tiny_model, tmp_path, "--out", afile),
                 ("simulate", "--data", data, "--out", afile, "-n", 1)):
        code, _, err = run(capsys, *argv, "--quiet") if argv[0] != "simulate" else run(capsys, *argv)
        assert code == 2 and "exists and is not a folder" in err, (argv[0], err)
    assert afile.read_text() == "keep me"


def test_fit_on_a_plain_folder_of_normal_images(capsys, tmp_path):
    # The user's everyday case: a folder of good images (+ optionally defective ones and masks).
    import shutil

    toy = _synthetic_layout(tmp_path / "toy")
    good, bad, masks = tmp_path / "good", tmp_path / "bad" / "spot", tmp_path / "masks"
    good.mkdir()
    for i, path in enumerate(sorted((toy / "train" / "good").glob("*.png")) + sorted((toy / "test" / "good").glob("*.png"))):
        shutil.copy(path, good / f"g{i}.png")
    shutil.copytree(toy / "test" / "spot", bad)
    shutil.copytree(toy / "ground_truth" / "spot", masks)
    common = ("--weights", "none", "--image-size", 32, "--coreset-ratio", 1.0, "--quiet", "--heatmaps", 0)
    code, out, err = run(capsys, "fit", "--data", good, "--abnormal", tmp_path / "bad", "--masks", masks,
                         "--train-ratio", 0.75, "--out", tmp_path / "run", *common)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["dataset"]["layout"] == "folder" and metrics["dataset"]["train_images"] == 6
    assert metrics["dataset"]["test_images"] == 2 + 3 and metrics["dataset"]["anomalous_test_images"] == 3
    assert metrics["image_auroc"] is not None and metrics["pixel_auroc"] is not None
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["train"]["files"]) == 6 and len(split["train"]["held_out_normal_files"]) == 2
    # slsg test rebuilds the split the model was fitted on, and refuses one that would test on
    # training images.
    code, _, err = run(capsys, "fit", "--data", good, "--abnormal", tmp_path / "bad", "--masks", masks,
                       "--split-seed", 1, "--no-eval", "--out", tmp_path / "run_s1", *common)
    assert code == 0, err
    code, _, err = run(capsys, "test", "--model", tmp_path / "run_s1", "--data", good, "--abnormal", tmp_path / "bad",
                       "--masks", masks, "--quiet", "--heatmaps", 0)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run_s1" / "metrics.json").read_text())
    assert metrics["dataset"]["split_seed"] == 1 and metrics["dataset"]["train_ratio"] == 0.8
    code, _, err = run(capsys, "test", "--model", tmp_path / "run_s1", "--data", good, "--abnormal", tmp_path / "bad",
                       "--masks", masks, "--split-seed", 0, "--quiet")
    assert code == 2 and "fitted on the split --split-seed 1" in err and "--split-seed 0" in err
    # Only normal images, no evaluation: fits and saves.
    code, _, err = run(capsys, "fit", "--data", good, "--no-eval", "--out", tmp_path / "run2", *common)
    assert code == 0, err
    assert (tmp_path / "run2" / "model" / "detector.json").is_file()
    # --abnormal belongs to folder datasets only; --masks needs --abnormal; MVTec layouts come split.
    code, _, err = run(capsys, "fit", "--data", toy, "--abnormal", tmp_path / "bad", "--out", tmp_path / "run3", *common)
    assert code == 2 and "--abnormal and --masks are for a folder of normal images" in err
    code, _, err = run(capsys, "fit", "--data", good, "--masks", masks, "--out", tmp_path / "run3", *common)
    assert code == 2 and "pass --abnormal too" in err
    code, _, err = run(capsys, "fit", "--data", toy, "--train-ratio", 0.5, "--out", tmp_path / "run3", *common)
    assert code == 2 and "comes split into train and test" in err
    # Normal images kept only in sub-folders (one per day): refused as a layout, read with --layout folder,
    # which the model keeps for slsg test.
    daily = tmp_path / "daily"
    for i, path in enumerate(sorted(good.glob("*.png"))):
        (daily / f"day{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, daily / f"day{i % 2}" / path.name)
    code, _, err = run(capsys, "fit", "--data", daily, "--out", tmp_path / "run5", *common)
    assert code == 2 and "--layout folder" in err
    code, _, err = run(capsys, "fit", "--data", daily, "--layout", "folder", "--abnormal", tmp_path / "bad",
                       "--masks", masks, "--out", tmp_path / "run5", *common)
    assert code == 0, err
    code, _, err = run(capsys, "test", "--model", tmp_path / "run5", "--data", daily, "--abnormal", tmp_path / "bad",
                       "--masks", masks, "--quiet", "--heatmaps", 0)
    assert code == 0, err
    assert json.loads((tmp_path / "run5" / "metrics.json").read_text())["dataset"]["layout"] == "folder"
    # ... for that folder only: another dataset's layout is detected
    code, _, err = run(capsys, "test", "--model", tmp_path / "run5", "--data", toy, "--out", tmp_path / "run5_toy",
                       "--quiet", "--heatmaps", 0)
    assert code == 0, err
    assert json.loads((tmp_path / "run5_toy" / "metrics.json").read_text())["dataset"]["layout"] == "mvtec-ad"
    # Every normal image trains and there is no --abnormal: nothing to test on, said before the fit.
    code, _, err = run(capsys, "fit", "--data", good, "--train-ratio", 1.0, "--out", tmp_path / "run4", *common)
    assert code == 2 and "pass --no-eval to fit only" in err and not (tmp_path / "run4").exists()
    # The folder is read recursively: a run folder inside it would be read as data by the next fit.
    code, _, err = run(capsys, "fit", "--data", good, "--out", good / "run", *common)
    assert code == 2 and "lies inside the input folder" in err and not (good / "run").exists()
    # A folder changed after the fit gives another seeded split, which would test on training
    # images: refused, naming one.
    trained = json.loads((tmp_path / "run_s1" / "model" / "detector.json").read_text())["fit_info"]["train_files"]
    assert len(trained) == 6
    (good / "g0.png").unlink()
    code, _, err = run(capsys, "test", "--model", tmp_path / "run_s1", "--data", good, "--abnormal", tmp_path / "bad",
                       "--masks", masks, "--quiet", "--heatmaps", 0)
    assert code == 2 and "test images trained this model" in err and "has changed since the fit" in err
    # Another folder (another line or batch) whose files reuse the names is a fair test.
    shutil.copytree(good, tmp_path / "other_line")
    code, _, err = run(capsys, "test", "--model", tmp_path / "run_s1", "--data", tmp_path / "other_line",
                       "--abnormal", tmp_path / "bad", "--masks", masks, "--quiet", "--heatmaps", 0)
    assert code == 0, err
    # MVTec and MTD layouts read only their fixed sub-folders: a run folder inside is harmless.
    code, _, err = run(capsys, "fit", "--data", toy, "--out", toy / "run", "--no-eval", *common)
    assert code == 0, err


def test_bit_depth_is_kept_with_the_model(capsys, tmp_path):
    from PIL import Image

    from slsg.detectors import load_detector

    good = tmp_path / "good"
    good.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # a 12-bit camera's 16-bit files
        Image.fromarray(rng.integers(0, 4096, size=(32, 32), dtype=np.uint16)).save(good / f"{i}.png")
    common = ("--weights", "none", "--image-size", 32, "--coreset-ratio", 1.0, "--quiet", "--no-eval")
    code, _, err = run(capsys, "fit", "--data", good, "--bit-depth", 12, "--out", tmp_path / "run", *common)
    assert code == 0, err
    assert load_detector(tmp_path / "run").config.bit_depth == 12
    code, out, err = run(capsys, "predict", "--model", tmp_path / "run", good / "0.png")
    assert code == 0 and "0.png" in out, err
    code, _, err = run(capsys, "fit", "--data", good, "--bit-depth", 10, "--out", tmp_path / "run10", *common)
    assert code != 0 and "exceed the 10-bit range" in err
    with pytest.raises(SystemExit):
        cli.main(["fit", "--data", str(good), "--out", str(tmp_path / "r"), "--bit-depth", "7"])


def test_predict_reads_subfolders_only_when_asked(capsys, tmp_path, tiny_model):
    # A test folder of defect subfolders (MVTec AD's test/) held "no image files" before.
    from PIL import Image

    for sub in ("good", "crack"):
        (tmp_path / "test" / sub).mkdir(parents=True)
        Image.new("RGB", (20, 20), (90, 120, 30)).save(tmp_path / "test" / sub / "000.png")
    code, _, err = run(capsys, "predict", "--model", tiny_model, tmp_path / "test", "--quiet")
    assert code == 2 and "its subfolders hold 2; pass --recursive" in err
    code, out, err = run(capsys, "predict", "--model", tiny_model, tmp_path / "test", "--recursive", "--quiet")
    assert code == 0, err
    assert [Path(line.split("\t")[0]).parent.name for line in out.splitlines() if "\t" in line] == ["crack", "good"]


def test_fit_defaults_are_the_detector_defaults():
    from slsg.cli import build_parser
    from slsg.detectors import MemoryBankConfig

    args = build_parser().parse_args(["fit", "--data", "d", "--out", "o"])
    config = MemoryBankConfig()
    for flag, field in (("backbone", "backbone"), ("image_size", "image_size"), ("resize", "resize"),
                        ("coreset_ratio", "coreset_ratio"), ("edge_band", "edge_band"), ("seed", "seed"),
                        ("embed_dim", "embed_dim"), ("bit_depth", "bit_depth")):
        assert getattr(args, flag) == getattr(config, field), flag
