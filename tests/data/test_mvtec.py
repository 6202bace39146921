"""MVTec AD: the real bottle category and synthetic trees with defects in them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from slsg.data import DataError, MVTecAD, load_mask, open_dataset


@pytest.fixture(scope="module")
def bottle(shared_data):
    return shared_data / "mvtec_ad" / "bottle"


def test_bottle_counts(bottle):
    train = MVTecAD(bottle, "train")
    test = MVTecAD(bottle, "test")
    assert len(train) == 209 and len(test) == 83
    assert sum(test.labels) == 63
    assert sum(len(s.mask_paths) for s in test.samples) == 63
    assert {s.defect_type for s in test.samples} == {"good", "broken_large", "broken_small", "contamination"}
    assert set(train.kinds) == {"good"}
    assert set(test.kinds) == {"good", "structural"}
    assert len(set(test.paths)) == 83


def test_bottle_items(bottle):
    test = MVTecAD(bottle, "test", image_size=64)
    defective = next(i for i, s in enumerate(test.samples) if s.label == 1)
    good = next(i for i, s in enumerate(test.samples) if s.label == 0)
    item = test[defective]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["mask"].shape == (1, 64, 64) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert item["label"] == 1 and item["kind"] == "structural"
    assert test[good]["mask"].sum() == 0 and test[good]["label"] == 0

    full = test.full_mask(defective)
    assert full.shape == (900, 900) and full.dtype == bool
    np.testing.assert_array_equal(full, load_mask(test.samples[defective].mask_paths[0]))
    assert test.original_size(defective) == (900, 900)
    assert not test.full_mask(good).any()
    # The resized mask covers about the same fraction of the image as the full-size one.
    assert abs(item["mask"].mean().item() - full.mean()) < 0.01


def test_open_dataset_detects_mvtec(bottle):
    dataset = open_dataset(bottle, "train", image_size=32)
    assert isinstance(dataset, MVTecAD) and len(dataset) == 209
    with pytest.raises(DataError, match="bottle"):
        open_dataset(bottle.parent, "train")  # a collection of categories, not one


def test_synthetic_tree(mvtec_tree):
    train = MVTecAD(mvtec_tree, "train", image_size=16)
    test = MVTecAD(mvtec_tree, "test", image_size=16)
    assert len(train) == 3 and len(test) == 5
    assert [s.defect_type for s in test.samples] == ["crack", "crack", "good", "good", "hole"]
    assert test.labels == [1, 1, 0, 0, 1]
    assert test.original_size(0) == (20, 24)
    assert test.full_mask(0).sum() == 5 * 5


def test_missing_mask(mvtec_tree):
    (mvtec_tree / "ground_truth" / "hole" / "000_mask.png").unlink()
    with pytest.raises(DataError, match="000_mask.png"):
        MVTecAD(mvtec_tree, "test")


def test_mask_without_image(mvtec_tree, builders):
    builders.write_mask(mvtec_tree / "ground_truth" / "crack" / "007_mask.png", builders.box_mask())
    with pytest.raises(DataError, match="007_mask.png"):
        MVTecAD(mvtec_tree, "test")


def test_ground_truth_folder_without_test_folder(mvtec_tree, builders):
    builders.write_mask(mvtec_tree / "ground_truth" / "scratch" / "000_mask.png", builders.box_mask())
    with pytest.raises(DataError, match="scratch"):
        MVTecAD(mvtec_tree, "test")


def test_empty_train_folder(mvtec_tree):
    for path in (mvtec_tree / "train" / "good").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="no images"), pytest.warns(UserWarning, match="holds no images"):
        MVTecAD(mvtec_tree, "train")


def test_mask_extension_differing_in_case_is_found(mvtec_tree):
    mask = mvtec_tree / "ground_truth" / "hole" / "000_mask.png"
    mask.rename(mask.with_name("000_mask.PNG"))
    test = MVTecAD(mvtec_tree, "test")
    index = [s.defect_type for s in test.samples].index("hole")
    assert test.samples[index].mask_paths[0].name == "000_mask.PNG" and test.full_mask(index).any()
    # a stem in another case is another image's mask, not this one's
    (mvtec_tree / "ground_truth" / "hole" / "000_mask.PNG").rename(mask.with_name("000_MASK.png"))
    with pytest.raises(DataError, match="000_mask.png for .* is missing"):
        MVTecAD(mvtec_tree, "test")


def test_images_the_layout_does_not_read_are_named(mvtec_tree):
    # Moved into a sub-folder, an image vanished from the split without a word.
    good = mvtec_tree / "train" / "good"
    (good / "extra").mkdir()
    first = sorted(good.glob("*.png"))[0]
    first.rename(good / "extra" / first.name)
    with pytest.warns(UserWarning, match=r"1 image\(s\) in sub-folders of .*good are not read"):
        assert len(MVTecAD(mvtec_tree, "train")) == 2


def test_not_a_category(tmp_path):
    with pytest.raises(DataError, match="train/good"):
        MVTecAD(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        MVTecAD(tmp_path, "validation")


def test_corrupt_image_raises_on_access(mvtec_tree):
    (mvtec_tree / "test" / "good" / "000.png").write_bytes(b"\x89PNG broken")
    test = MVTecAD(mvtec_tree, "test")
    index = [s.path.name for s in test.samples].index("000.png", 2)
    with pytest.raises(DataError, match="000.png"):
        test[index]


def test_mask_size_mismatch(mvtec_tree, builders):
    builders.write_mask(mvtec_tree / "ground_truth" / "hole" / "000_mask.png", builders.box_mask(size=(10, 10)))
    test = MVTecAD(mvtec_tree, "test")
    with pytest.raises(DataError, match="000_mask.png"):
        test[len(test) - 1]


def test_grayscale_and_16bit_images_give_rgb_items(mvtec_tree):
    gray = np.arange(20 * 24, dtype=np.uint16).reshape(20, 24) * 100
    Image.fromarray(gray).save(mvtec_tree / "train" / "good" / "001.png")  # I;16
    Image.fromarray((gray // 257).astype(np.uint8), mode="L").save(mvtec_tree / "train" / "good" / "002.png")
    train = MVTecAD(mvtec_tree, "train", image_size=None)
    wide, narrow = train[1]["image"], train[2]["image"]
    assert wide.shape == narrow.shape == (3, 20, 24)
    assert torch.allclose(wide, narrow, atol=1.5 / 255)
    assert torch.equal(wide[0], wide[2])
