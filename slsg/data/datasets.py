"""All dataset classes in one place, and `open_dataset`, which recognises a folder's layout."""
from __future__ import annotations

import os
from pathlib import Path

from .base import AnomalyDataset, Sample, list_images
from .folder import Folder, seeded_split
from .io import IMAGE_EXTENSIONS, DataError, check_bit_depth
from .mtd import MTD
from .mvtec import DefectConfig, MVTecAD, MVTecLOCO, parse_defects_config

__all__ = ["AnomalyDataset", "DefectConfig", "Folder", "MTD", "MVTecAD", "MVTecLOCO", "Sample",
           "detect_layout", "open_dataset", "parse_defects_config", "seeded_split"]

_LAYOUTS = {
    "mvtec-loco": (MVTecLOCO, "MVTec LOCO AD category (defects_config.json)"),
    "mvtec-ad": (MVTecAD, "MVTec AD category (train/good/)"),
    "mtd": (MTD, "Magnetic Tile Defects (MT_Free/)"),
    "folder": (Folder, "a folder with normal images directly inside (slsg.data.Folder)"),
}


def detect_layout(path: str | os.PathLike) -> str:
    """Name of the layout of `path`: "mvtec-loco", "mvtec-ad" or "mtd"; DataError otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path} is a file, not a dataset folder" if path.exists() else f"dataset folder not found: {path}")
    if (path / "defects_config.json").is_file():  # only LOCO has one (MVTecLOCO names what is missing)
        return "mvtec-loco"
    if any((path / "test" / kind).is_dir() for kind in ("logical_anomalies", "structural_anomalies")):
        # Read as MVTec AD, its test split would fail on a mask naming convention LOCO does not use.
        raise DataError(f"{path} looks like an MVTec LOCO AD category (test/logical_anomalies or "
                        f"test/structural_anomalies) but has no defects_config.json: restore that file "
                        "from the dataset's archive")
    if (path / "train" / "good").is_dir():
        return "mvtec-ad"
    if (path / "MT_Free").is_dir():
        return "mtd"
    if list_images(path):  # images directly inside: a folder of normal images
        return "folder"
    known = "; ".join(description for _, description in _LAYOUTS.values())
    categories = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "train" / "good").is_dir())
    others = sorted({p.suffix.lower() or p.name for p in path.iterdir() if p.is_file() and not p.name.startswith(".")})
    hint = (f" It holds categories ({', '.join(categories)}): pass one category folder." if categories else
            " A folder of normal images must hold images directly (images only in sub-folders, such as one"
            " per day: pass layout='folder', or slsg fit --layout folder)"
            + (f"; the files directly inside ({', '.join(others[:8])}) are not images of a supported type "
               f"({', '.join(sorted(IMAGE_EXTENSIONS))})." if others else "."))
    raise DataError(f"cannot recognise the dataset layout of {path}. Known layouts: {known}.{hint}")


LAYOUTS = tuple(_LAYOUTS)


def open_dataset(path: str | os.PathLike, split: str, image_size: int | tuple[int, int] | None = 256,
                 bit_depth: int | None = None, layout: str | None = None, **kwargs) -> AnomalyDataset:
    """Open the dataset at `path` with the class its layout calls for; extra kwargs go to that class
    (e.g. train_ratio/seed for MTD). ``bit_depth``: bits per sample of images wider than 8 bits
    (e.g. 12 for a 12-bit camera's 16-bit files; None: their container's 16). ``layout``: one of
    LAYOUTS instead of the detected one (e.g. "folder" for normal images kept only in sub-folders,
    such as one per day)."""
    check_bit_depth(bit_depth)
    if layout is not None and layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} or None, got {layout!r}")
    if layout is not None and not Path(path).is_dir():
        detect_layout(path)  # the same error as without a layout: missing, or a file
    cls, _ = _LAYOUTS[layout or detect_layout(path)]
    dataset = cls(path, split=split, image_size=image_size, **kwargs)
    dataset.bit_depth = bit_depth
    return dataset
