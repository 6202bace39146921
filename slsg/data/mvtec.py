"""MVTec AD and MVTec LOCO AD, one category folder each."""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import AnomalyDataset, Sample, check_split, list_images
from .io import DataError, load_mask_values


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what}: expected folder {path} does not exist")
    return path


def _category_hint(root: Path, marker: str) -> str:
    """When `root` holds several category folders instead of being one, say so."""
    if not root.is_dir():
        return ""
    categories = sorted(p.name for p in root.iterdir() if (p / marker).exists())
    if categories:
        return f" ({root} looks like a collection of categories: {', '.join(categories)}; pass one of them)"
    return ""


class MVTecAD(AnomalyDataset):
    """One MVTec AD category: `train/good`, `test/<defect>`, `ground_truth/<defect>/<id>_mask.png`."""

    name = "MVTec AD"

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 image_size: int | tuple[int, int] | None = 256) -> None:
        root = Path(root)
        check_split(split, ("train", "test"), self.name)
        if not (root / "train" / "good").is_dir():
            raise DataError(f"{self.name}: {root} has no train/good folder{_category_hint(root, 'train/good')}")
        samples = self._train_samples(root) if split == "train" else self._test_samples(root)
        super().__init__(samples, root, split, image_size)

    @staticmethod
    def _train_samples(root: Path) -> list[Sample]:
        return [Sample(p, 0, "good", "good") for p in _images_in(root / "train" / "good", "MVTec AD")]

    def _test_samples(self, root: Path) -> list[Sample]:
        test_dir = _require_dir(root / "test", self.name)
        gt_dir = root / "ground_truth"
        samples: list[Sample] = []
        for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            defect = defect_dir.name
            images = _images_in(defect_dir, self.name)
            if defect == "good":
                samples += [Sample(p, 0, "good", "good") for p in images]
                continue
            for image in images:
                mask = _mask_file(gt_dir / defect, f"{image.stem}_mask.png")
                if not mask.is_file():
                    raise DataError(f"{self.name}: ground-truth mask {mask} for {image} is missing")
                samples.append(Sample(image, 1, defect, "structural", (mask,)))
            self._check_orphan_masks(gt_dir / defect, {p.stem for p in images})
        if gt_dir.is_dir():
            for orphan in sorted(p for p in gt_dir.iterdir() if p.is_dir() and not (test_dir / p.name).is_dir()):
                raise DataError(f"{self.name}: ground-truth folder {orphan} has no test/{orphan.name} images")
        return samples

    @staticmethod
    def _check_orphan_masks(mask_dir: Path, image_stems: set[str]) -> None:
        if not mask_dir.is_dir():
            return
        for mask in list_images(mask_dir):
            stem = mask.stem[: -len("_mask")] if mask.stem.endswith("_mask") else mask.stem
            if stem not in image_stems:
                raise DataError(f"MVTec AD: mask {mask} has no matching test image")


def _mask_file(folder: Path, name: str) -> Path:
    """``folder / name``, or the file there whose name differs only in the case of its extension
    (NAME_mask.PNG from a tool on a case-insensitive file system). The stem must match exactly:
    A.png and a.png are two images with two masks."""
    path = folder / name
    if path.is_file() or not folder.is_dir():
        return path
    matches = [p for p in folder.iterdir() if p.stem == path.stem and p.suffix.lower() == path.suffix.lower()]
    return matches[0] if len(matches) == 1 else path


def _images_in(folder: Path, layout: str) -> list[Path]:
    """The images directly in ``folder``, as the layout has them; a warning names what it leaves
    out (images in sub-folders, an empty folder), which would otherwise vanish from the split."""
    everything = list_images(folder, recursive=True)  # one walk; the direct ones keep their order
    images = [p for p in everything if p.parent == folder]
    nested = len(everything) - len(images)
    if nested:
        warnings.warn(f"{layout}: {nested} image(s) in sub-folders of {folder} are not read (the layout keeps "
                      "images directly in it)", stacklevel=3)
    elif not images:
        warnings.warn(f"{layout}: {folder} holds no images", stacklevel=3)
    return images


@dataclass(frozen=True)
class DefectConfig:
    """One entry of MVTec LOCO's defects_config.json."""

    defect_name: str
    pixel_value: int
    saturation_threshold: float
    relative_saturation: bool

    def saturation_pixels(self, area: int) -> int:
        """Pixels a region of `area` pixels must have detected to count as fully found.

        Follows the official LOCO evaluation: relative thresholds are a fraction of the
        region's area (truncated to int), absolute ones are capped at the area. Never
        below 1 so that a tiny region cannot cause a division by zero.
        """
        if self.relative_saturation:
            pixels = int(self.saturation_threshold * area)
        else:
            pixels = min(int(self.saturation_threshold), int(area))
        return max(pixels, 1)


def parse_defects_config(path: str | os.PathLike) -> dict[int, DefectConfig]:
    """Read defects_config.json into {pixel_value: DefectConfig}."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"defects config not found: {path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot parse defects config {path}: {exc}") from exc
    if not isinstance(entries, list) or not entries:
        raise DataError(f"defects config {path} must be a non-empty JSON list of defect entries")
    configs: dict[int, DefectConfig] = {}
    for i, entry in enumerate(entries):
        try:
            name = entry["defect_name"]
            value = entry["pixel_value"]
            threshold = entry["saturation_threshold"]
            relative = entry["relative_saturation"]
        except (KeyError, TypeError) as exc:
            raise DataError(f"defects config {path}: entry {i} lacks field {exc}; each entry needs "
                            "defect_name, pixel_value, saturation_threshold, relative_saturation") from exc
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise DataError(f"defects config {path}: entry {i} ({name!r}) has invalid pixel_value {value!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise DataError(f"defects config {path}: entry {i} ({name!r}) has invalid "
                            f"saturation_threshold {threshold!r}")
        if not isinstance(relative, bool):
            raise DataError(f"defects config {path}: entry {i} ({name!r}) has non-boolean "
                            f"relative_saturation {relative!r}")
        if relative and threshold > 1:  # a share of the region's area (the official code rejects these too)
            raise DataError(f"defects config {path}: entry {i} ({name!r}) has relative saturation_threshold "
                            f"{threshold!r}; a relative threshold is a share of the region's area, in (0, 1]")
        if value in configs:
            raise DataError(f"defects config {path}: pixel_value {value} is used twice")
        configs[value] = DefectConfig(str(name), value, float(threshold), relative)
    return configs


_LOCO_KINDS = {"good": "good", "logical_anomalies": "logical", "structural_anomalies": "structural"}


class MVTecLOCO(AnomalyDataset):
    """One MVTec LOCO AD category.

    Layout: `train/good`, `validation/good`, `test/{good,logical_anomalies,structural_anomalies}`,
    `ground_truth/<kind>_anomalies/<id>/000.png, 001.png, ...` (one file per defect region; its
    nonzero pixel value names the defect type in `defects_config.json`). `defect_type` of an
    item is its test folder name ("logical_anomalies", ...); `defect_names(i)` reads the masks
    for the fine-grained names.
    """

    name = "MVTec LOCO AD"

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 image_size: int | tuple[int, int] | None = 256) -> None:
        root = Path(root)
        check_split(split, ("train", "validation", "test"), self.name)
        if not (root / "defects_config.json").is_file():
            raise DataError(f"{self.name}: {root} has no defects_config.json"
                            f"{_category_hint(root, 'defects_config.json')}")
        self.defects_config = parse_defects_config(root / "defects_config.json")
        if split == "test":
            samples = self._test_samples(root)
        else:
            samples = [Sample(p, 0, "good", "good") for p in _images_in(_require_dir(root / split / "good", self.name), self.name)]
        super().__init__(samples, root, split, image_size)

    def _test_samples(self, root: Path) -> list[Sample]:
        test_dir = _require_dir(root / "test", self.name)
        unknown = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in _LOCO_KINDS)
        if unknown:
            raise DataError(f"{self.name}: unexpected folders in {test_dir}: {unknown}; "
                            f"expected {sorted(_LOCO_KINDS)}")
        samples: list[Sample] = []
        for folder, kind in _LOCO_KINDS.items():
            if not (test_dir / folder).is_dir():
                continue
            images = _images_in(test_dir / folder, self.name)
            if kind == "good":
                samples += [Sample(p, 0, "good", "good") for p in images]
                continue
            gt_dir = root / "ground_truth" / folder
            for image in images:
                region_dir = gt_dir / image.stem
                masks = list_images(region_dir) if region_dir.is_dir() else []
                if not masks:
                    raise DataError(f"{self.name}: no ground-truth masks for {image} (expected {region_dir}/000.png)")
                samples.append(Sample(image, 1, folder, kind, tuple(masks)))
            if gt_dir.is_dir():
                stems = {p.stem for p in images}
                for orphan in sorted(p for p in gt_dir.iterdir()
                                     if p.name not in stems and not p.name.startswith(".")):  # .DS_Store
                    raise DataError(f"{self.name}: ground truth {orphan} has no matching image in {test_dir / folder}")
        return samples

    def _read_mask(self, path: Path) -> np.ndarray:
        # LOCO masks encode the defect type as the pixel value (often below 128): any nonzero is defect.
        return load_mask_values(path) != 0

    def _region(self, mask_path: Path) -> tuple[np.ndarray, DefectConfig]:
        values = load_mask_values(mask_path)
        distinct = np.unique(values[values != 0])
        if distinct.size == 0:
            raise DataError(f"{self.name}: ground-truth mask {mask_path} has no defect pixels")
        if distinct.size > 1:
            raise DataError(f"{self.name}: ground-truth mask {mask_path} mixes pixel values "
                            f"{distinct.tolist()}; one defect per file expected")
        value = int(distinct[0])
        if value not in self.defects_config:
            raise DataError(f"{self.name}: mask {mask_path} has pixel value {value}, which "
                            f"defects_config.json does not list (known: {sorted(self.defects_config)})")
        return values != 0, self.defects_config[value]

    def region_masks(self, index: int) -> list[tuple[np.ndarray, int]]:
        """Defect regions of image `index` at original resolution with their sPRO saturation
        thresholds in pixels; an empty list for good images."""
        regions = []
        for mask_path in self.samples[index].mask_paths:
            mask, config = self._region(mask_path)
            regions.append((mask, config.saturation_pixels(int(mask.sum()))))
        return regions

    def all_region_masks(self) -> list[list[tuple[np.ndarray, int]]]:
        """`region_masks(i)` for every image, the input `slsg.metrics.spro` expects."""
        return [self.region_masks(i) for i in range(len(self))]

    def defect_names(self, index: int) -> list[str]:
        """Defect type names of the regions of image `index` (from the masks' pixel values)."""
        return [self._region(p)[1].defect_name for p in self.samples[index].mask_paths]
