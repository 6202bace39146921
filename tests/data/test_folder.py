"""Folder: plain directories of normal / abnormal images and masks matched by name."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slsg.data import DataError, Folder, seeded_split


@pytest.fixture
def folder_tree(tmp_path, builders):
    normal = tmp_path / "normal"
    for i in range(30):
        builders.write_rgb(normal / f"n{i:02d}.png", size=(16 + i, 12 + i % 5), seed=i)
    builders.write_rgb(tmp_path / "abnormal" / "crack" / "a.png", size=(24, 20), seed=50)
    builders.write_rgb(tmp_path / "abnormal" / "b.jpg", size=(24, 20), seed=51)
    builders.write_mask(tmp_path / "masks" / "a_mask.png", builders.box_mask((24, 20), (0, 0, 4, 4)))
    builders.write_mask(tmp_path / "masks" / "b_mask.png", builders.box_mask((24, 20), (4, 4, 10, 6)))
    return tmp_path


def _folder(root, **kw):
    return Folder(root / "normal", root / "abnormal", root / "masks", **kw)


def test_split_sizes_and_labels(folder_tree):
    train = _folder(folder_tree, split="train", image_size=8)
    test = _folder(folder_tree, split="test", image_size=8)
    assert len(train) == 24 and len(test) == 6 + 2
    assert set(train.labels) == {0}
    assert test.labels.count(1) == 2
    assert {s.defect_type for s in test.samples if s.label} == {"crack", "abnormal"}
    assert not set(train.paths) & set(test.paths)
    assert sorted(train.train_files + train.held_out_files) == [f"n{i:02d}.png" for i in range(30)]
    a = next(i for i, s in enumerate(test.samples) if s.path.name == "a.png")
    assert test.full_mask(a).sum() == 16
    item = test[a]
    assert item["image"].shape == (3, 8, 8) and item["mask"].shape == (1, 8, 8) and item["kind"] == "structural"


def test_images_of_any_size_and_mode_give_equal_shapes(folder_tree):
    normal = folder_tree / "normal"
    Image.fromarray(np.zeros((40, 30), np.uint8), mode="L").save(normal / "n00.png")
    Image.fromarray(np.zeros((13, 50, 4), np.uint8), mode="RGBA").save(normal / "n01.png")
    Image.fromarray(np.zeros((9, 9), np.uint16)).save(normal / "n02.png")
    dataset = Folder(normal, split="train", image_size=16, test_normal_ratio=0.0)
    shapes = {tuple(dataset[i]["image"].shape) for i in range(3)}
    assert shapes == {(3, 16, 16)}
    assert all(dataset[i]["image"].dtype == torch.float32 for i in range(3))


def test_split_is_seeded_and_independent_of_listing_order(folder_tree, monkeypatch):
    first = _folder(folder_tree, split="train", seed=3).train_files
    again = _folder(folder_tree, split="train", seed=3).train_files
    assert first == again
    assert _folder(folder_tree, split="train", seed=4).train_files != first

    original_rglob, original_iterdir = Path.rglob, Path.iterdir

    def shuffled(generator_function):
        def wrapper(self, *args):
            items = list(generator_function(self, *args))
            random.Random(7).shuffle(items)
            return iter(items)
        return wrapper

    monkeypatch.setattr(Path, "rglob", shuffled(original_rglob))
    monkeypatch.setattr(Path, "iterdir", shuffled(original_iterdir))
    assert _folder(folder_tree, split="train", seed=3).train_files == first


def test_seeded_split_function():
    items = [f"f{i}" for i in range(20)]
    train, test = seeded_split(items, 0.75, seed=0)
    assert len(train) == 15 and len(test) == 5 and sorted(train + test) == sorted(items)
    assert seeded_split(list(reversed(items)), 0.75, seed=0) == (train, test)
    with pytest.raises(ValueError, match="train_ratio"):
        seeded_split(items, 1.5, seed=0)


@pytest.mark.parametrize("suffix, names", [(None, ["a_mask", "b"]), ("_mask", ["a_mask", "b_mask"]), ("", ["a", "b"])])
def test_mask_suffix(folder_tree, builders, suffix, names):
    masks = folder_tree / "masks2"
    for name in names:
        builders.write_mask(masks / f"{name}.png", builders.box_mask((24, 20)))
    test = Folder(folder_tree / "normal", folder_tree / "abnormal", masks, split="test", mask_suffix=suffix)
    assert sum(len(s.mask_paths) for s in test.samples) == 2


def test_missing_mask(folder_tree):
    (folder_tree / "masks" / "b_mask.png").unlink()
    with pytest.raises(DataError, match="b.jpg"):
        _folder(folder_tree, split="test")


def test_mask_without_image(folder_tree, builders):
    builders.write_mask(folder_tree / "masks" / "zzz_mask.png", builders.box_mask())
    with pytest.raises(DataError, match="zzz_mask.png"):
        _folder(folder_tree, split="test")


def test_empty_or_missing_folders(tmp_path, folder_tree):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        Folder(tmp_path / "empty")
    with pytest.raises(DataError, match="missing"):
        Folder(tmp_path / "missing")
    with pytest.raises(DataError, match="empty"):
        Folder(folder_tree / "normal", tmp_path / "empty", split="test")


def test_overlapping_folders_are_refused(folder_tree):
    # Folders are searched recursively: one inside another (either way), or the same
    # folder twice, would count images twice, with two labels, or read masks as images.
    root = folder_tree
    for args in ((root, root / "abnormal"),                       # abnormal inside normal
                 (root / "normal", root),                          # normal inside abnormal
                 (root / "normal", root / "abnormal", root / "abnormal"),  # masks = abnormal images
                 (root / "normal", root / "abnormal", root / "abnormal" / "crack")):
        with pytest.raises(DataError, match="overlap"):
            Folder(*args, split="test")


def test_no_held_out_normals(folder_tree):
    test = _folder(folder_tree, split="test", test_normal_ratio=0.0)
    assert test.labels == [1, 1]
    assert len(_folder(folder_tree, split="train", test_normal_ratio=0.0)) == 30


def test_symlinked_subfolders_are_searched_and_loops_end(folder_tree):
    # Path.rglob (Python < 3.13) skipped linked folders silently.
    normal = folder_tree / "normal"
    extra = folder_tree / "elsewhere"
    extra.mkdir()
    for i in range(3):
        (extra / f"x{i}.png").write_bytes((normal / f"n{i:02d}.png").read_bytes())
    (normal / "linked").symlink_to(extra, target_is_directory=True)
    (extra / "loop").symlink_to(extra, target_is_directory=True)  # a loop must not hang
    folder = Folder(normal, split="train", test_normal_ratio=0.0, image_size=8)
    assert len(folder) == 33
    assert sum(name.startswith("linked/x") for name in folder.train_files) == 3


@pytest.mark.parametrize("nested", [False, True])
def test_broken_image_link_is_an_error_naming_it(folder_tree, nested):
    # A link to a moved image used to be skipped as if absent, training on fewer images.
    normal = folder_tree / "normal"
    where = normal / "sub" if nested else normal
    where.mkdir(exist_ok=True)
    (where / "gone.png").symlink_to(folder_tree / "moved_away.png")
    (where / "notes.txt").symlink_to(folder_tree / "also_missing.txt")  # not an image: ignored
    with pytest.raises(DataError, match=r"broken link.*gone\.png"):
        Folder(normal, split="train", test_normal_ratio=0.0, image_size=8)
