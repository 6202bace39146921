"""The dataset interface every layout (MVTec AD, LOCO, Folder, MTD) shares."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from torch.utils.data import Dataset

from .io import DataError, image_size_of, is_image_file, load_image, load_mask, resize_image, resize_mask

KINDS = ("good", "structural", "logical")


@dataclass(frozen=True)
class Sample:
    """One image of a dataset and what is known about it."""

    path: Path
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good", "broken_large", ...
    kind: str  # "good" | "structural" | "logical"
    mask_paths: tuple[Path, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r} for {self.path}")
        if self.label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {self.label!r} for {self.path}")


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder`, sorted by path so results never depend on directory order."""
    if not folder.is_dir():
        raise DataError(f"folder not found: {folder}")
    candidates = _walk_files(folder) if recursive else folder.iterdir()
    images = []
    for p in candidates:
        if is_image_file(p):
            images.append(p)
        elif p.is_symlink() and not p.exists() and is_image_file(p, must_exist=False):
            # A link to a moved or deleted image: an unreadable image, not an absent one.
            raise DataError(f"broken link (its target does not exist): {p} -> {os.readlink(p)}")
    return sorted(images, key=lambda p: p.as_posix())


def _walk_files(folder: Path) -> Iterator[Path]:
    """Files under `folder`, following symlinked folders (Path.rglob does not before Python
    3.13, so linked image folders were skipped silently); each real folder once, so a link
    loop ends."""
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        for name in files:
            yield Path(root) / name


def check_split(split: str, allowed: Sequence[str], dataset: str) -> str:
    if split not in allowed:
        raise ValueError(f"{dataset}: split must be one of {tuple(allowed)}, got {split!r}")
    return split


def check_image_size(image_size: int | tuple[int, int] | None) -> int | tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        sizes: tuple[Any, ...] = (image_size,)
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        sizes = tuple(image_size)
        image_size = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(f"image_size must be an int, an (H, W) pair or None, got {image_size!r}")
    if not all(isinstance(s, (int, np.integer)) and s > 0 for s in sizes):
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return image_size


class AnomalyDataset(Dataset):
    """A list of `Sample`s served as dicts of tensors.

    Item: {"image": float32 [3,S,S] RGB in [0,1], "mask": float32 [1,S,S] in {0,1},
    "label": int, "path": str, "defect_type": str, "kind": str}. With image_size=None
    images keep their own size (then a DataLoader needs batch_size=1).
    """

    name = "dataset"
    # Bits per sample of integer images wider than 8 bits (None: their container's 16); see
    # slsg.data.io. open_dataset(..., bit_depth=12) sets it.
    bit_depth: int | None = None

    def __init__(self, samples: Sequence[Sample], root: str | os.PathLike, split: str,
                 image_size: int | tuple[int, int] | None = 256) -> None:
        self.root = Path(root)
        self.split = split
        self.image_size = check_image_size(image_size)
        self.samples: list[Sample] = list(samples)
        if not self.samples:
            raise DataError(f"{self.name}: no images found for split {split!r} under {self.root}")

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        n_anomalous = sum(s.label for s in self.samples)
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
                f"images={len(self)}, anomalous={n_anomalous}, image_size={self.image_size!r})")

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    @property
    def kinds(self) -> list[str]:
        return [s.kind for s in self.samples]

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.samples]

    def relative_paths(self) -> list[str]:
        """Sample paths relative to the dataset root, POSIX style (for recording splits)."""
        out = []
        for s in self.samples:
            try:
                out.append(s.path.relative_to(self.root).as_posix())
            except ValueError:
                out.append(s.path.as_posix())
        return out

    def split_record(self) -> dict[str, Any]:
        """JSON-serialisable description of exactly which files this split holds."""
        return {"dataset": type(self).__name__, "root": str(self.root), "split": self.split,
                "files": self.relative_paths()}

    def original_size(self, index: int) -> tuple[int, int]:
        """(H0, W0) of image `index` at its original resolution."""
        return image_size_of(self.samples[index].path)

    def _read_mask(self, path: Path) -> np.ndarray:
        return load_mask(path)

    def has_mask_files(self, index: int) -> bool:
        """Whether image `index` has ground-truth mask files (good images and unannotated ones have none)."""
        return bool(self.samples[index].mask_paths)

    def full_mask(self, index: int, size: tuple[int, int] | None = None) -> np.ndarray:
        """Union of all ground-truth masks of image `index`, bool [H0, W0]; all False for good images."""
        sample = self.samples[index]
        if size is None:
            size = self.original_size(index)
        union = np.zeros(size, dtype=bool)
        for mask_path in sample.mask_paths:
            mask = self._read_mask(mask_path)
            if mask.shape != union.shape:
                raise DataError(f"mask {mask_path} has size {mask.shape[::-1]} (W, H) but image "
                                f"{sample.path} has size {union.shape[::-1]}")
            union |= mask
        return union

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        sample = self.samples[index]
        image = load_image(sample.path, self.bit_depth)
        mask = self.full_mask(index, size=(image.height, image.width))
        return {
            "image": resize_image(image, self.image_size),
            "mask": resize_mask(mask, self.image_size),
            "label": sample.label,
            "path": str(sample.path),
            "defect_type": sample.defect_type,
            "kind": sample.kind,
        }

    def full_masks(self) -> list[np.ndarray]:
        """All ground-truth masks at original resolution (what pixel metrics compare against)."""
        return [self.full_mask(i) for i in range(len(self))]

