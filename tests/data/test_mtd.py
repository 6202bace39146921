"""MTD: the real data with its seeded split, and synthetic trees for the error cases."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slsg.data import MTD, DataError, open_dataset


@pytest.fixture(scope="module")
def mtd_root(shared_data):
    return shared_data / "mtd"


def test_real_counts_and_split(mtd_root):
    train = MTD(mtd_root, "train")
    test = MTD(mtd_root, "test")
    assert len(train) == 762  # round(0.8 * 952)
    assert len(test) == 952 - 762 + 392
    assert sum(test.labels) == 392 and set(train.labels) == {0}
    assert not set(train.paths) & set(test.paths)
    assert {s.defect_type for s in test.samples} == {"good", "blowhole", "break", "crack", "fray", "uneven"}
    assert train.train_files == test.train_files == train.relative_paths()
    assert test.test_files == test.relative_paths()
    assert all(f.startswith("MT_Free/Imgs/") and f.endswith(".jpg") for f in train.train_files)
    record = test.split_record()
    json.dumps(record)
    assert record["seed"] == 0 and record["train_ratio"] == 0.8 and len(record["test_files"]) == 582


def test_real_split_depends_on_seed_and_ratio(mtd_root):
    base = MTD(mtd_root, "train", seed=0).train_files
    assert MTD(mtd_root, "train", seed=0).train_files == base
    assert MTD(mtd_root, "train", seed=1).train_files != base
    assert len(MTD(mtd_root, "train", train_ratio=0.5)) == 476


def test_real_items_have_varying_original_sizes(mtd_root):
    test = MTD(mtd_root, "test", image_size=32)
    defective = [i for i, s in enumerate(test.samples) if s.label][:5]
    sizes = {test.original_size(i) for i in defective}
    assert len(sizes) > 1
    for i in defective:
        item = test[i]
        assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
        full = test.full_mask(i)
        assert full.shape == test.original_size(i) and full.any()
        # The soft-edged mask is thresholded at 128, not at any nonzero value.
        raw = np.asarray(Image.open(test.samples[i].mask_paths[0]))
        np.testing.assert_array_equal(full, raw >= 128)
    assert open_dataset(mtd_root, "test").test_files == test.test_files


@pytest.fixture
def mtd_tree(tmp_path, builders):
    root = tmp_path / "mtd"
    for i in range(10):
        image = root / "MT_Free" / "Imgs" / f"free_{i}.jpg"
        builders.write_rgb(image, size=(20 + i, 16), seed=i, fmt="JPEG")
        builders.write_mask(image.with_suffix(".png"), np.zeros((16, 20 + i), np.uint8))
    for d, defect in enumerate(["Crack", "Fray"]):
        image = root / f"MT_{defect}" / "Imgs" / f"{defect.lower()}_0.jpg"
        builders.write_rgb(image, size=(20, 16), seed=20 + d, fmt="JPEG")
        builders.write_mask(image.with_suffix(".png"), builders.box_mask((20, 16), (2, 2, 6, 6), 200))
    return root


def test_synthetic_tree_split(mtd_tree):
    train = MTD(mtd_tree, "train", train_ratio=0.7, seed=5)
    test = MTD(mtd_tree, "test", train_ratio=0.7, seed=5)
    assert len(train) == 7 and len(test) == 3 + 2
    assert [s.defect_type for s in test.samples[-2:]] == ["crack", "fray"]
    assert test.full_mask(len(test) - 1).sum() == 16


def test_split_independent_of_listing_order(mtd_tree, monkeypatch):
    expected = MTD(mtd_tree, "train", seed=2).train_files
    original = Path.iterdir

    def reversed_iterdir(self):
        items = list(original(self))
        random.Random(1).shuffle(items)
        return iter(items[::-1])

    monkeypatch.setattr(Path, "iterdir", reversed_iterdir)
    assert MTD(mtd_tree, "train", seed=2).train_files == expected


def test_missing_mask(mtd_tree):
    (mtd_tree / "MT_Fray" / "Imgs" / "fray_0.png").unlink()
    with pytest.raises(DataError, match="fray_0"):
        MTD(mtd_tree, "test")


def test_mask_without_image(mtd_tree, builders):
    builders.write_mask(mtd_tree / "MT_Crack" / "Imgs" / "lonely.png", builders.box_mask((20, 16)))
    with pytest.raises(DataError, match="lonely.png"):
        MTD(mtd_tree, "train")


def test_bad_layouts(tmp_path, mtd_tree):
    with pytest.raises(DataError, match="MT_Free"):
        MTD(tmp_path, "train")
    (mtd_tree / "MT_Blowhole").mkdir()
    with pytest.raises(DataError, match="Imgs"):
        MTD(mtd_tree, "train")
    with pytest.raises(ValueError, match="train_ratio"):
        MTD(mtd_tree, "train", train_ratio=0.0)
