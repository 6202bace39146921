"""Magnetic Tile Defects (Huang et al., The Visual Computer 2020).

Layout: `MT_Free/Imgs/*.jpg` normal, `MT_<Defect>/Imgs/*.jpg` defective, each image with a
same-name `.png` mask beside it (soft edges; thresholded at 128). There is no official
split: a seeded share `train_ratio` of MT_Free trains, the rest of MT_Free plus every
defective image is the test set. The split depends only on the file names and the seed.
"""
from __future__ import annotations

import os
from pathlib import Path

from .base import AnomalyDataset, Sample, check_split, list_images
from .folder import seeded_split
from .io import DataError

NORMAL_FOLDER = "MT_Free"


def _jpgs_and_masks(folder: Path) -> tuple[list[Path], dict[str, Path]]:
    files = list_images(folder)
    jpgs = [p for p in files if p.suffix.lower() in (".jpg", ".jpeg")]
    masks = {p.stem: p for p in files if p.suffix.lower() == ".png"}
    stems = {p.stem for p in jpgs}
    for stem in sorted(set(masks) - stems):
        raise DataError(f"MTD: mask {masks[stem]} has no matching .jpg image")
    return jpgs, masks


class MTD(AnomalyDataset):
    """MTD with a seeded one-class split; `train_files` / `test_files` record it."""

    name = "MTD"

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 image_size: int | tuple[int, int] | None = 256, train_ratio: float = 0.8,
                 seed: int = 0) -> None:
        root = Path(root)
        check_split(split, ("train", "test"), self.name)
        if not 0.0 < train_ratio <= 1.0:
            raise ValueError(f"MTD: train_ratio must lie in (0, 1], got {train_ratio!r}")
        free_dir = root / NORMAL_FOLDER / "Imgs"
        if not free_dir.is_dir():
            raise DataError(f"MTD: {root} has no {NORMAL_FOLDER}/Imgs folder")
        normals, _ = _jpgs_and_masks(free_dir)
        if not normals:
            raise DataError(f"MTD: no .jpg images in {free_dir}")
        train, held_out = seeded_split(normals, train_ratio, seed, key=lambda p: p.name)
        if not train:
            raise DataError(f"MTD: train_ratio {train_ratio} leaves no training image out of {len(normals)}")

        defective: list[Sample] = []
        defect_dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("MT_")
                             and p.name != NORMAL_FOLDER)
        for defect_dir in defect_dirs:
            jpgs, masks = _jpgs_and_masks(_imgs_dir(defect_dir))
            defect = defect_dir.name[len("MT_"):].lower()
            for jpg in jpgs:
                if jpg.stem not in masks:
                    raise DataError(f"MTD: mask {jpg.with_suffix('.png')} for {jpg} is missing")
                defective.append(Sample(jpg, 1, defect, "structural", (masks[jpg.stem],)))

        self.train_ratio = train_ratio
        self.seed = seed
        train_samples = [Sample(p, 0, "good", "good") for p in train]
        test_samples = [Sample(p, 0, "good", "good") for p in held_out] + defective
        self.train_files = [s.path.relative_to(root).as_posix() for s in train_samples]
        self.test_files = [s.path.relative_to(root).as_posix() for s in test_samples]
        super().__init__(train_samples if split == "train" else test_samples, root, split, image_size)

    def split_record(self) -> dict:
        record = super().split_record()
        record.update(train_ratio=self.train_ratio, seed=self.seed,
                      train_files=self.train_files, test_files=self.test_files)
        return record


def _imgs_dir(defect_dir: Path) -> Path:
    imgs = defect_dir / "Imgs"
    if not imgs.is_dir():
        raise DataError(f"MTD: {defect_dir} has no Imgs folder")
    return imgs
