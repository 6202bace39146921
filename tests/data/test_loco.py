"""MVTec LOCO AD on a synthetic tree (several masks per image, defect ids as pixel values)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from slsg.data import DataError, MVTecLOCO, open_dataset, parse_defects_config
from slsg.metrics import evaluate_splits, image_auroc, spro


def test_splits_and_kinds(loco_tree):
    assert len(MVTecLOCO(loco_tree, "train")) == 2
    assert len(MVTecLOCO(loco_tree, "validation")) == 1
    test = MVTecLOCO(loco_tree, "test", image_size=8)
    assert test.kinds == ["good", "good", "logical", "logical", "structural"]
    assert test.labels == [0, 0, 1, 1, 1]
    assert [s.defect_type for s in test.samples] == ["good", "good", "logical_anomalies", "logical_anomalies",
                                                     "structural_anomalies"]
    assert [len(s.mask_paths) for s in test.samples] == [0, 0, 2, 1, 1]
    with pytest.raises(ValueError, match="split"):
        MVTecLOCO(loco_tree, "val")


def test_defects_config_parsed(loco_tree):
    config = MVTecLOCO(loco_tree, "train").defects_config
    assert set(config) == {255, 254, 10}
    assert config[254].defect_name == "extra_part" and config[254].relative_saturation
    assert config[255].saturation_threshold == 30 and not config[255].relative_saturation


def test_full_mask_is_union_of_all_files_with_any_nonzero_value(loco_tree):
    test = MVTecLOCO(loco_tree, "test", image_size=None)
    union = test.full_mask(2)
    assert union.shape == (20, 24)
    assert union.sum() == 50 + 16 - 2  # two regions overlapping in 2 pixels
    # Pixel value 10 is far below 128 but still marks a defect in LOCO.
    assert test.full_mask(4).sum() == 20
    assert not test.full_mask(0).any()
    item = test[2]
    np.testing.assert_array_equal(item["mask"][0].numpy().astype(bool), union)


def test_region_masks_and_saturation(loco_tree):
    test = MVTecLOCO(loco_tree, "test")
    regions = test.region_masks(2)
    assert [int(m.sum()) for m, _ in regions] == [50, 16]
    # absolute 30 px capped by nothing; relative 0.5 of 16 px = 8 px
    assert [s for _, s in regions] == [30, 8]
    assert [s for _, s in test.region_masks(3)] == [4]  # absolute 30 capped at the 4-px area
    assert [s for _, s in test.region_masks(4)] == [20]
    assert test.region_masks(0) == []
    assert test.defect_names(2) == ["missing_part", "extra_part"]
    assert test.defect_names(4) == ["scratch"]
    assert len(test.all_region_masks()) == len(test)


def test_open_dataset_detects_loco(loco_tree):
    assert isinstance(open_dataset(loco_tree, "validation"), MVTecLOCO)


def test_unknown_pixel_value(loco_tree, builders):
    path = loco_tree / "ground_truth" / "structural_anomalies" / "000" / "000.png"
    builders.write_mask(path, builders.box_mask(value=77))
    test = MVTecLOCO(loco_tree, "test")
    with pytest.raises(DataError, match="77"):
        test.region_masks(4)


def test_mixed_values_and_empty_masks(loco_tree, builders):
    path = loco_tree / "ground_truth" / "structural_anomalies" / "000" / "000.png"
    mixed = builders.box_mask(value=10)
    mixed[0, 0] = 255
    builders.write_mask(path, mixed)
    test = MVTecLOCO(loco_tree, "test")
    with pytest.raises(DataError, match="mixes"):
        test.region_masks(4)
    builders.write_mask(path, np.zeros((20, 24), np.uint8))
    with pytest.raises(DataError, match="no defect pixels"):
        test.region_masks(4)


def test_ground_truth_without_image(loco_tree, builders):
    builders.write_mask(loco_tree / "ground_truth" / "logical_anomalies" / "005" / "000.png", builders.box_mask())
    with pytest.raises(DataError, match="005"):
        MVTecLOCO(loco_tree, "test")


def test_image_without_ground_truth(loco_tree, builders):
    builders.write_rgb(loco_tree / "test" / "structural_anomalies" / "001.png")
    with pytest.raises(DataError, match="001"):
        MVTecLOCO(loco_tree, "test")


def test_unexpected_test_folder(loco_tree, builders):
    builders.write_rgb(loco_tree / "test" / "weird" / "000.png")
    with pytest.raises(DataError, match="weird"):
        MVTecLOCO(loco_tree, "test")


@pytest.mark.parametrize("content, message", [
    ("not json", "cannot parse"),
    ("[]", "non-empty"),
    (json.dumps([{"defect_name": "a", "pixel_value": 1, "saturation_threshold": 3}]), "relative_saturation"),
    (json.dumps([{"defect_name": "a", "pixel_value": 1, "saturation_threshold": 3, "relative_saturation": "no"}]),
     "non-boolean"),
    (json.dumps([{"defect_name": "a", "pixel_value": 1, "saturation_threshold": 0, "relative_saturation": True}]),
     "saturation_threshold"),
    (json.dumps([{"defect_name": "a", "pixel_value": 1, "saturation_threshold": 0.5, "relative_saturation": True}] * 2),
     "twice"),
])
def test_invalid_defects_config(tmp_path, content, message):
    path = tmp_path / "defects_config.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        parse_defects_config(path)


def test_relative_saturation_above_one_is_rejected(tmp_path):
    # A share of the region's area above 1 could never be reached (the official code rejects it).
    path = tmp_path / "defects_config.json"
    entries = [{"defect_name": "ok", "pixel_value": 2, "saturation_threshold": 1, "relative_saturation": True},
               {"defect_name": "extra_part", "pixel_value": 1, "saturation_threshold": 1.5,
                "relative_saturation": True}]
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"defects_config\.json.*'extra_part'.*relative saturation_threshold 1\.5"):
        parse_defects_config(path)
    entries[1]["relative_saturation"] = False  # 1.5 pixels is a valid absolute threshold
    path.write_text(json.dumps(entries))
    assert parse_defects_config(path)[1].saturation_threshold == 1.5


def test_end_to_end_metrics_per_split(loco_tree):
    test = MVTecLOCO(loco_tree, "test")
    rng = np.random.default_rng(0)
    # Maps that find the structural defect perfectly but the logical ones not at all.
    maps = []
    for i, sample in enumerate(test.samples):
        noise = rng.random(test.original_size(i)) * 0.5
        maps.append(noise + (test.full_mask(i) if sample.kind == "structural" else 0.0))
    scores = np.array([m.max() for m in maps])
    results = evaluate_splits(scores, test.kinds, maps, test.all_region_masks())
    assert set(results) == {"logical", "structural", "all", "mean"}
    assert results["structural"]["spro"] == pytest.approx(1.0)
    assert results["structural"]["image_auroc"] == 1.0
    assert results["logical"]["spro"] < 0.2
    logical = [0, 1, 2, 3]
    assert results["logical"]["image_auroc"] == image_auroc(scores[logical], np.array(test.labels)[logical])
    assert results["all"]["spro"] == pytest.approx(spro(maps, test.all_region_masks()))
    assert results["mean"]["spro"] == pytest.approx((results["logical"]["spro"] + 1.0) / 2)


def test_hidden_files_in_ground_truth_are_ignored(loco_tree):
    (loco_tree / "ground_truth" / "logical_anomalies" / ".DS_Store").write_bytes(b"\0")
    assert len(MVTecLOCO(loco_tree, "test", image_size=8)) > 0
