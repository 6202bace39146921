"""Generic folder layout (like anomalib's Folder) and the seeded split it shares with MTD."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, TypeVar

import numpy as np

from .base import AnomalyDataset, Sample, check_split, list_images
from .io import DataError

T = TypeVar("T")


def seeded_split(items: Sequence[T], train_ratio: float, seed: int, key=None) -> tuple[list[T], list[T]]:
    """Split `items` into (train, test) with a fixed seed.

    Items are sorted by `key` (default: themselves) first, so the result depends only on
    the set of items and the seed, never on the order a filesystem lists them in.
    round(train_ratio * n) items go to train.
    """
    if not 0.0 <= train_ratio <= 1.0:
        raise ValueError(f"train_ratio must lie in [0, 1], got {train_ratio!r}")
    ordered = sorted(items, key=key)
    order = np.random.default_rng(seed).permutation(len(ordered))
    n_train = int(round(train_ratio * len(ordered)))
    train = sorted((ordered[i] for i in order[:n_train]), key=key)
    test = sorted((ordered[i] for i in order[n_train:]), key=key)
    return train, test


def _posix(path: Path) -> str:
    return path.as_posix()


def _find_masks(mask_dir: Path, mask_suffix: str | None) -> dict[str, Path]:
    """Map image stem -> mask file; with mask_suffix=None an optional "_mask" suffix is accepted."""
    by_stem: dict[str, Path] = {}
    for mask in list_images(mask_dir, recursive=True):
        stem = mask.stem
        if mask_suffix:
            if not stem.endswith(mask_suffix):
                continue  # not a mask by the given naming rule
            stem = stem[: -len(mask_suffix)]
        elif mask_suffix is None and stem.endswith("_mask"):
            stem = stem[: -len("_mask")]
        if stem in by_stem:
            raise DataError(f"Folder: masks {by_stem[stem]} and {mask} both match images named {stem!r}")
        by_stem[stem] = mask
    return by_stem


class Folder(AnomalyDataset):
    """Images in plain folders.

    normal_dir: normal images (searched recursively); a seeded share `test_normal_ratio`
    of them is held out for the test split. abnormal_dir (optional): anomalous test images;
    images in sub-folders get the sub-folder name as defect_type, others "abnormal".
    mask_dir (optional): ground-truth masks matched to abnormal images by file stem, with
    `mask_suffix` appended (None accepts both "<stem>" and "<stem>_mask"). When mask_dir is
    given every abnormal image needs a mask, and every mask an image.
    """

    name = "Folder"

    def __init__(self, normal_dir: str | os.PathLike, abnormal_dir: str | os.PathLike | None = None,
                 mask_dir: str | os.PathLike | None = None, split: str = "train",
                 image_size: int | tuple[int, int] | None = 256, test_normal_ratio: float = 0.2,
                 seed: int = 0, mask_suffix: str | None = None, abnormal_kind: str = "structural") -> None:
        check_split(split, ("train", "test"), self.name)
        if not 0.0 <= test_normal_ratio < 1.0:
            raise ValueError(f"test_normal_ratio must lie in [0, 1), got {test_normal_ratio!r}")
        normal_dir = Path(normal_dir)
        # Every folder is searched recursively, so none may lie inside another: its images
        # would be counted twice, with two labels, or masks read as images (or as their own masks).
        named = [("normal_dir", normal_dir), ("abnormal_dir", abnormal_dir), ("mask_dir", mask_dir)]
        named = [(name, Path(path)) for name, path in named if path is not None]
        for i, (name_a, a) in enumerate(named):
            for name_b, b in named[i + 1:]:
                ra, rb = a.resolve(), b.resolve()
                if ra.is_relative_to(rb) or rb.is_relative_to(ra):
                    raise DataError(f"Folder: {name_a} {a} and {name_b} {b} overlap (one lies inside the other, "
                                    "and folders are searched recursively); use separate folders")
        normals = list_images(normal_dir, recursive=True)
        if not normals:
            raise DataError(f"Folder: no images in normal_dir {normal_dir}")
        train, held_out = seeded_split(normals, 1.0 - test_normal_ratio, seed, key=_posix)
        if not train:
            raise DataError(f"Folder: {normal_dir} has too few images ({len(normals)}) to keep any for training")
        self.seed = seed
        self.train_files = [p.relative_to(normal_dir).as_posix() for p in train]
        self.held_out_files = [p.relative_to(normal_dir).as_posix() for p in held_out]
        if split == "train":
            samples = [Sample(p, 0, "good", "good") for p in train]
        else:
            samples = [Sample(p, 0, "good", "good") for p in held_out]
            if abnormal_dir is not None:
                samples += self._abnormal_samples(Path(abnormal_dir), mask_dir, mask_suffix, abnormal_kind)
        super().__init__(samples, normal_dir, split, image_size)

    @staticmethod
    def _abnormal_samples(abnormal_dir: Path, mask_dir: str | os.PathLike | None,
                          mask_suffix: str | None, kind: str) -> list[Sample]:
        images = list_images(abnormal_dir, recursive=True)
        if not images:
            raise DataError(f"Folder: no images in abnormal_dir {abnormal_dir}")
        masks = _find_masks(Path(mask_dir), mask_suffix) if mask_dir is not None else None
        if masks is not None and not masks:
            raise DataError(f"Folder: no mask images in mask_dir {mask_dir}")
        samples = []
        seen: dict[str, Path] = {}
        for image in images:
            parent = image.parent.relative_to(abnormal_dir)
            defect = parent.parts[0] if parent.parts else "abnormal"
            mask_paths: tuple[Path, ...] = ()
            if masks is not None:
                if image.stem in seen:
                    raise DataError(f"Folder: images {seen[image.stem]} and {image} share the stem "
                                    f"{image.stem!r}, so masks cannot be matched by name")
                seen[image.stem] = image
                if image.stem not in masks:
                    raise DataError(f"Folder: no mask for {image} in {mask_dir} (looked for "
                                    f"{image.stem}{mask_suffix or ''}.*)")
                mask_paths = (masks[image.stem],)
            samples.append(Sample(image, 1, defect, kind, mask_paths))
        if masks is not None:
            for stem in sorted(set(masks) - set(seen)):
                raise DataError(f"Folder: mask {masks[stem]} has no matching image in {abnormal_dir}")
        return samples

    def split_record(self) -> dict:
        record = super().split_record()
        record.update(seed=self.seed, train_files=self.train_files, held_out_normal_files=self.held_out_files)
        return record
