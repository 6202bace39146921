"""Builders for tiny dataset trees in tmp_path (MVTec AD, MVTec LOCO AD, MTD, plain folders)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_rgb(path: Path, size=(24, 20), seed=0, fmt=None) -> Path:
    """Random RGB image of (W, H) = size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def write_mask(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode="L").save(path)
    return path


def box_mask(size=(24, 20), box=(2, 3, 8, 9), value=255) -> np.ndarray:
    """uint8 [H, W] with `value` inside box = (x0, y0, x1, y1)."""
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = value
    return mask


def build_mvtec_ad(root: Path, n_train=3, good=2, defects=None, size=(24, 20)) -> Path:
    defects = defects or {"crack": 2, "hole": 1}
    for i in range(n_train):
        write_rgb(root / "train" / "good" / f"{i:03d}.png", size, seed=i)
    for i in range(good):
        write_rgb(root / "test" / "good" / f"{i:03d}.png", size, seed=100 + i)
    for d, (defect, count) in enumerate(defects.items()):
        for i in range(count):
            write_rgb(root / "test" / defect / f"{i:03d}.png", size, seed=200 + 10 * d + i)
            write_mask(root / "ground_truth" / defect / f"{i:03d}_mask.png",
                       box_mask(size, (1 + i, 2, 6 + i, 7 + d)))
    return root


LOCO_CONFIG = [
    {"defect_name": "missing_part", "pixel_value": 255, "saturation_threshold": 30, "relative_saturation": False},
    {"defect_name": "extra_part", "pixel_value": 254, "saturation_threshold": 0.5, "relative_saturation": True},
    {"defect_name": "scratch", "pixel_value": 10, "saturation_threshold": 1000, "relative_saturation": False},
]


def build_loco(root: Path, size=(24, 20)) -> Path:
    """LOCO tree: 2 train, 1 validation, test: 2 good, 2 logical (one with two masks), 1 structural."""
    (root / "defects_config.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "defects_config.json").write_text(json.dumps(LOCO_CONFIG))
    for i in range(2):
        write_rgb(root / "train" / "good" / f"{i:03d}.png", size, seed=i)
    write_rgb(root / "validation" / "good" / "000.png", size, seed=9)
    for i in range(2):
        write_rgb(root / "test" / "good" / f"{i:03d}.png", size, seed=10 + i)
    gt = root / "ground_truth"
    write_rgb(root / "test" / "logical_anomalies" / "000.png", size, seed=20)
    write_mask(gt / "logical_anomalies" / "000" / "000.png", box_mask(size, (0, 0, 10, 5), 255))  # 50 px
    write_mask(gt / "logical_anomalies" / "000" / "001.png", box_mask(size, (8, 4, 12, 8), 254))  # 16 px, overlaps
    write_rgb(root / "test" / "logical_anomalies" / "001.png", size, seed=21)
    write_mask(gt / "logical_anomalies" / "001" / "000.png", box_mask(size, (2, 2, 4, 4), 255))  # 4 px
    write_rgb(root / "test" / "structural_anomalies" / "000.png", size, seed=30)
    write_mask(gt / "structural_anomalies" / "000" / "000.png", box_mask(size, (5, 5, 10, 9), 10))  # 20 px
    return root


@pytest.fixture
def mvtec_tree(tmp_path: Path) -> Path:
    return build_mvtec_ad(tmp_path / "toy_category")


@pytest.fixture
def loco_tree(tmp_path: Path) -> Path:
    return build_loco(tmp_path / "toy_loco")


class _Builders:
    write_rgb = staticmethod(write_rgb)
    write_mask = staticmethod(write_mask)
    box_mask = staticmethod(box_mask)
    build_mvtec_ad = staticmethod(build_mvtec_ad)
    build_loco = staticmethod(build_loco)
    loco_config = LOCO_CONFIG


@pytest.fixture
def builders() -> type[_Builders]:
    """The tree builders above, for tests that need variations."""
    return _Builders
