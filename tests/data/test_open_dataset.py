"""open_dataset recognises layouts and explains what it knows when it does not."""
from __future__ import annotations

import pytest

from slsg.data import MTD, DataError, MVTecAD, MVTecLOCO, detect_layout, open_dataset


def test_detects_each_layout(mvtec_tree, loco_tree, tmp_path, builders):
    assert isinstance(open_dataset(mvtec_tree, "test", image_size=8), MVTecAD)
    assert isinstance(open_dataset(loco_tree, "test", image_size=8), MVTecLOCO)
    mtd = tmp_path / "mtd"
    for i in range(2):
        builders.write_rgb(mtd / "MT_Free" / "Imgs" / f"f{i}.jpg", fmt="JPEG")
    dataset = open_dataset(mtd, "train", image_size=8, train_ratio=0.5, seed=1)  # kwargs reach MTD
    assert isinstance(dataset, MTD) and len(dataset) == 1
    assert detect_layout(mtd) == "mtd"


def test_loco_without_validation_is_still_loco(loco_tree):
    # defects_config.json marks LOCO; a missing split is then named as such, not as an
    # MVTec AD ground-truth problem.
    import shutil

    shutil.rmtree(loco_tree / "validation", ignore_errors=True)
    assert detect_layout(loco_tree) == "mvtec-loco"
    with pytest.raises(DataError, match="validation"):
        open_dataset(loco_tree, "validation", image_size=8)


def test_loco_without_its_config_is_named_as_such(loco_tree):
    (loco_tree / "defects_config.json").unlink()
    with pytest.raises(DataError, match="MVTec LOCO AD category.*no defects_config.json"):
        open_dataset(loco_tree, "test", image_size=8)


def test_unknown_layout_names_path_and_known_layouts(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError) as error:
        open_dataset(tmp_path, "train")
    message = str(error.value)
    assert str(tmp_path) in message
    for layout in ("MVTec AD", "MVTec LOCO", "MT_Free", "Folder"):
        assert layout in message


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_dataset(tmp_path / "absent", "train")


def test_layout_can_be_chosen_for_images_kept_in_sub_folders(tmp_path):
    from PIL import Image

    for day in ("2024-05-01", "2024-05-02"):
        (tmp_path / "good" / day).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (10 * i, 20, 30)).save(tmp_path / "good" / day / f"{i}.png")
    with pytest.raises(DataError, match="layout='folder'"):
        open_dataset(tmp_path / "good", "train")
    train = open_dataset(tmp_path / "good", "train", layout="folder", test_normal_ratio=0.5)
    assert len(train) == 3 and {p.split("/")[0] for p in train.relative_paths()} <= {"2024-05-01", "2024-05-02"}
    with pytest.raises(ValueError, match="layout must be one of"):
        open_dataset(tmp_path / "good", "train", layout="imagenet")
    with pytest.raises(DataError, match="dataset folder not found"):
        open_dataset(tmp_path / "nowhere", "train", layout="folder")
