import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from slsg.detectors.evaluation import Evaluation, compute_metrics
from slsg.report import heat_window, overlay_heatmap, write_report


def make_evaluation(tmp_path, with_masks: bool = True) -> Evaluation:
    rng = np.random.default_rng(0)
    sizes = [(60, 80), (50, 50), (70, 40), (64, 64), (48, 96), (40, 40)]
    labels = [0, 0, 1, 1, 1, 0]
    defects = ["good", "good", "crack", "crack", "hole", "good"]
    maps, masks, paths, scores = [], [], [], []
    for i, ((h, w), label) in enumerate(zip(sizes, labels)):
        path = tmp_path / "images" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(path)
        amap = rng.uniform(0, 1, size=(h, w)).astype(np.float32)
        mask = np.zeros((h, w), dtype=bool)
        if label and with_masks:
            mask[h // 4: h // 2, w // 4: w // 2] = True
            amap[mask] += 1.0
        maps.append(amap)
        masks.append(mask)
        paths.append(str(path))
        scores.append(float(amap.max()) + label)
    ev = Evaluation(np.array(scores), np.array(labels), maps, masks, paths, defects,
                    ["structural" if label else "good" for label in labels], predict_seconds=0.5,
                    total_seconds=1.0, threshold=1.5)
    ev.metrics = compute_metrics(ev)
    return ev


def test_write_report_files_and_values(tmp_path):
    ev = make_evaluation(tmp_path)
    run = tmp_path / "run"
    doc = write_report(run, ev, {"name": "toy", "path": "/data/toy", "split": "test"},
                       model={"detector": "memory_bank", "config": {"backbone": "x"}},
                       timings={"fit_seconds": 12.5, "images_per_second_batch1": 3.0}, heatmaps_per_type=1)
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == doc
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "fit_seconds", "images_per_second", "dataset"):
        assert key in on_disk
    assert on_disk["image_auroc"] == pytest.approx(roc_auc_score(ev.labels, ev.scores))
    pixels = np.concatenate([m.ravel() for m in ev.maps])
    truth = np.concatenate([m.ravel() for m in ev.masks])
    assert on_disk["pixel_auroc"] == pytest.approx(roc_auc_score(truth, pixels))
    assert 0 <= on_disk["aupro"] <= 1 and on_disk["fit_seconds"] == 12.5
    assert on_disk["images_per_second"] == pytest.approx(6 / 0.5)
    assert on_disk["dataset"]["name"] == "toy" and on_disk["model"]["config"]["backbone"] == "x"

    report = (run / "report.md").read_text()
    assert f"| image_auroc | {on_disk['image_auroc']:.4f} |" in report
    assert "![roc.png](roc.png)" in report and "heatmaps/crack_img2.png" in report
    for name in ("roc.png", "pro.png"):
        with Image.open(run / name) as im:
            assert im.format == "PNG" and im.width > 200
    heatmaps = sorted(p.name for p in (run / "heatmaps").glob("*.png"))
    assert heatmaps == ["crack_img2.png", "good_img0.png", "hole_img4.png"]  # one per defect type
    with Image.open(run / "heatmaps" / "crack_img2.png") as im:
        assert im.size == (2 * 40 + 4, 70 + 18)  # two panels at original size + caption bar
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # atomic writes left no temp files


def test_a_new_report_replaces_its_own_overlays_only(tmp_path):
    ev = make_evaluation(tmp_path)
    write_report(tmp_path / "run", ev, {"name": "toy"})
    heatmaps = tmp_path / "run" / "heatmaps"
    own = sorted(p.name for p in heatmaps.glob("*.png"))
    (heatmaps / "mine_heatmap.png").write_bytes(b"a user's file")  # e.g. slsg predict --out run/heatmaps
    (heatmaps / own[0]).write_bytes(b"stale overlay")
    write_report(tmp_path / "run", ev, {"name": "toy"})
    assert sorted(p.name for p in heatmaps.glob("*.png")) == sorted(own + ["mine_heatmap.png"])
    assert (heatmaps / "mine_heatmap.png").read_bytes() == b"a user's file"
    assert (heatmaps / own[0]).read_bytes() != b"stale overlay"  # replaced, not kept beside a new one
    write_report(tmp_path / "run", ev, {"name": "toy"}, heatmaps_per_type=0)
    assert [p.name for p in heatmaps.glob("*.png")] == ["mine_heatmap.png"]
    # A run folder written before the manifest: its report.md names the overlays.
    write_report(tmp_path / "run", ev, {"name": "toy"})
    (heatmaps / ".slsg-report-heatmaps.json").unlink()
    write_report(tmp_path / "run", ev, {"name": "toy"})
    assert sorted(p.name for p in heatmaps.glob("*.png")) == sorted(own + ["mine_heatmap.png"])  # no _2 copies


def test_report_without_ground_truth_masks(tmp_path):
    ev = make_evaluation(tmp_path, with_masks=False)
    doc = write_report(tmp_path / "run", ev, {"name": "toy"}, heatmaps_per_type=0)
    assert doc["pixel_auroc"] is None and doc["aupro"] is None and doc["image_auroc"] is not None
    assert not (tmp_path / "run" / "pro.png").exists()
    assert "| pixel_auroc | n/a |" in (tmp_path / "run" / "report.md").read_text()


def test_overlay_marks_hot_region_and_outlines():
    image = Image.new("RGB", (40, 30), (128, 128, 128))
    amap = np.zeros((30, 40), dtype=np.float32)
    amap[10:20, 25:35] = 10.0
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:15, 5:15] = True
    panel = np.asarray(overlay_heatmap(image, amap, window=(0.0, 10.0), mask=mask, threshold=5.0))
    left, right = panel[:, :40].astype(int), panel[:, 44:].astype(int)
    assert (left[5, 5:15] == [0, 255, 0]).all()  # ground-truth outline in green
    assert (left[10, 10] == 128).all()  # inside the mask the image is untouched
    hot, cold = right[15, 30], right[2, 2]
    assert hot[0] > hot[1] + 50 and hot[0] > hot[2] + 50  # red where the map is high
    assert cold[2] > cold[0]  # blue-ish where it is low
    assert (right[10, 25:35] == 255).all()  # prediction outline in white


def test_heat_window():
    assert heat_window(2.0, []) == (1.0, 3.0)
    assert heat_window(None, [np.array([1.0, 4.0]), np.array([2.0])]) == (1.0, 4.0)
    assert heat_window(None, [np.array([2.0, 2.0])]) == (2.0, 3.0)


def test_heatmaps_of_images_with_the_same_file_name_do_not_overwrite_each_other(tmp_path):
    from slsg.report import write_heatmaps

    ev = make_evaluation(tmp_path)
    for i in (0, 1):  # two good images named 3.png in different folders (a Folder dataset's sub-folders)
        moved = tmp_path / f"cam{i}" / "3.png"
        moved.parent.mkdir()
        Image.open(ev.paths[i]).save(moved)
        ev.paths[i] = str(moved)
    written = write_heatmaps(ev, tmp_path / "heatmaps", per_type=3)
    assert len(written) == len(set(written)) == 6
    assert {p.name for p in written if p.name.startswith("good_3")} == {"good_3.png", "good_3_2.png"}
