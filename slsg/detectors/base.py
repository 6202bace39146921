"""The interface every detector shares: fit, predict, save, load, and a threshold from normal data.

A saved detector is a folder:
    detector.json        kind, config (a dataclass as JSON), thresholds, fit information, and the
                         names of the weight files below; written last, atomically
    <files>-<token>...   weights (backbone, memory bank, ...) under names unique to this save
Because the JSON is replaced atomically and names only files of its own save, a crash while saving
leaves either the previous model or the new one, never a mix. Files of the previous save are
removed after the new JSON is in place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import shutil
import types
import typing
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from slsg.utils import atomic_write_text

DETECTOR_FILE = "detector.json"
FORMAT_VERSION = 1

_REGISTRY: dict[str, type["Detector"]] = {}


class ModelError(ValueError):
    """A saved model folder that is missing, incomplete or from an incompatible version."""


def register(kind: str):
    """Class decorator: make a detector loadable by ``load_detector`` under ``kind``."""
    def decorate(cls: type["Detector"]) -> type["Detector"]:
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls
    return decorate


def config_to_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls: type, data: dict[str, Any], source: str) -> Any:
    """Rebuild a config dataclass from JSON, restoring tuples; unknown keys are an error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ModelError(f"{source}: unknown configuration keys {unknown} (saved by a newer slsg?)")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        hint = hints.get(name)
        if isinstance(value, list) and _is_tuple_hint(hint):
            value = tuple(value)
        values[name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{source}: invalid configuration: {exc}") from exc


def _is_tuple_hint(hint: Any) -> bool:
    if typing.get_origin(hint) is tuple:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_tuple_hint(a) for a in typing.get_args(hint))
    return False


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of maps [B, 1, H, W], truncated at 4 sigma, mirror-padded.

    Same result as scipy.ndimage.gaussian_filter(mode="mirror") and torchvision's gaussian_blur,
    at a fraction of the cost (2 x 33 taps instead of 33 x 33 for sigma 4).
    """
    if sigma <= 0:
        return maps
    radius = min(math.ceil(4 * sigma), maps.shape[-2] - 1, maps.shape[-1] - 1)
    taps = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(maps, (radius,) * 4, mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return F.conv2d(x, kernel.view(1, 1, -1, 1))


def check_image_batch(images: Any) -> torch.Tensor:
    """Validate a batch for ``predict``: float tensor [B, 3, H, W] with values in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
    if images.ndim == 3:
        raise ValueError(f"images must be a batch [B, 3, H, W], got {tuple(images.shape)} "
                         f"(use images[None] for a single image)")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"images is an empty batch (shape {tuple(images.shape)})")
    images = images.float()  # the model computes in float32, whatever the input precision
    if images.numel():
        low, high = torch.aminmax(images)  # one pass: NaN and Inf carry into these (as in all_finite)
        if not (torch.isfinite(low) and torch.isfinite(high)):
            raise ValueError("images contain NaN or Inf")
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(f"images must lie in [0, 1], got values in [{low:.3g}, {high:.3g}] "
                             f"(divide 8-bit images by 255)")
    return images


def collate_images(images: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """Images [3, H_i, W_i] -> one batch [B, 3, H, W] when all sizes agree, else the list itself
    (datasets opened with image_size=None keep each image's own size)."""
    if not all(isinstance(x, torch.Tensor) for x in images):
        raise TypeError("dataset items must be tensors or dicts with an 'image' tensor")
    if len({tuple(x.shape) for x in images}) == 1:
        return torch.stack(images)
    return list(images)


def dataset_method(dataset, method: str, index: int | None = None):
    """Call ``dataset.<method>(index)``, looking through torch Subsets; None if the dataset lacks it.

    With index None only tells whether the method exists (returns True or None).
    """
    while isinstance(dataset, Subset):
        if index is not None:
            index = dataset.indices[index]
        dataset = dataset.dataset
    if not hasattr(dataset, method):
        return None
    return True if index is None else getattr(dataset, method)(int(index))


def image_sizes(dataset) -> list[tuple[int, int]]:
    """(H, W) of every image tensor ``dataset`` yields, read from file headers where possible."""
    base = dataset
    while isinstance(base, Subset):
        base = base.dataset
    fixed = getattr(base, "image_size", None)
    if fixed is not None:
        size = (fixed, fixed) if isinstance(fixed, int) else tuple(fixed)
        return [size] * len(dataset)
    if dataset_method(dataset, "original_size") is not None:
        return [tuple(dataset_method(dataset, "original_size", i)) for i in range(len(dataset))]
    sizes = []
    for i in range(len(dataset)):
        item = dataset[i]
        image = item["image"] if isinstance(item, dict) else item
        sizes.append(tuple(image.shape[-2:]))
    return sizes


class Detector(ABC):
    """Base class: subclasses implement fit/predict and the weight (de)serialisation hooks."""

    kind: ClassVar[str] = "detector"
    config_class: ClassVar[type]

    def __init__(self, config: Any) -> None:
        self.config = config
        # Decision threshold on image scores (a pixel whose map value reaches it is anomalous too).
        # Computed from normal images only by fit(); None until then.
        self.image_threshold: float | None = None
        self.fit_info: dict[str, Any] = {}
        # The configuration keys a loaded model was saved with (empty when not loaded): models
        # of older versions lack newer keys, and _load_weights may need to tell them apart.
        self.saved_config_keys: frozenset[str] = frozenset()

    @abstractmethod
    def fit(self, dataset) -> "Detector":
        """Train on a dataset of normal images (items are dicts with an "image" [3, S, S] in [0, 1])."""

    @abstractmethod
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [B] and anomaly maps [B, H, W] for images [B, 3, H, W] in [0, 1]; higher = more anomalous."""

    def predict_input(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``predict`` for images already at the model's input size (``resize_to_input``'s output):
        no resizing, maps at that size. ``predict`` on such images would scale them again."""
        return self.predict(images)

    @property
    def dataset_image_size(self) -> int | None:
        """The ``image_size`` to open datasets with: an int when the model takes square images of
        that size, None when it wants each image at its own size and resizes it itself."""
        return None

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The size ``predict`` resizes an image of ``height`` x ``width`` pixels to (its model input)."""
        return height, width

    def resize_to_input(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] resized (bilinear, antialiased when shrinking) to ``input_size``."""
        size = self.input_size(*images.shape[-2:])
        if images.shape[-2:] == size:
            return images
        shrinking = images.shape[-2] > size[0] or images.shape[-1] > size[1]
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                             antialias=shrinking).clamp_(0, 1)

    def predict_each(self, images: torch.Tensor | list[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
        """``predict`` for a batch [B, 3, H, W], or for a list of images [3, H_i, W_i] of possibly
        different sizes (one call per run of equal sizes; then one map [H_i, W_i] per image)."""
        if isinstance(images, torch.Tensor):
            return self.predict(images)
        if len(images) == 0:
            raise ValueError("predict_each: no images (an empty list)")
        scores: list[torch.Tensor] = []
        maps: list[torch.Tensor] = []
        start = 0
        while start < len(images):
            end = start + 1
            while end < len(images) and images[end].shape == images[start].shape:
                end += 1
            group_scores, group_maps = self.predict(torch.stack(images[start:end]))
            scores.append(group_scores)
            maps.extend(group_maps)
            start = end
        return torch.cat(scores), maps

    @property
    def is_fitted(self) -> bool:
        return self._is_fitted()

    @abstractmethod
    def _is_fitted(self) -> bool: ...

    @abstractmethod
    def _save_weights(self, directory: Path, token: str) -> dict[str, str]:
        """Write weight files into ``directory`` under names containing ``token``; return {role: file name}."""

    @abstractmethod
    def _load_weights(self, directory: Path, files: dict[str, str]) -> None: ...

    def classify(self, scores: torch.Tensor) -> torch.Tensor:
        """Boolean decisions for image scores, using the threshold stored with the model."""
        if self.image_threshold is None:
            raise RuntimeError("this detector has no image threshold: fit it first, holding out normal "
                               "images to set one (calibration_ratio > 0 and at least 2 training images)")
        return scores >= self.image_threshold

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        if not self.is_fitted:
            raise RuntimeError("cannot save a detector that has not been fitted")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        try:  # the files of a model saved here before, removed once the new one is in place
            previous = _read_meta(directory) if (directory / DETECTOR_FILE).is_file() else None
        except ModelError:
            previous = None  # unreadable: overwrite it, but remove nothing it names
        token = secrets.token_hex(4)
        present = {p.name for p in directory.iterdir()}
        try:
            files = self._save_weights(directory, token)
            meta = {
                "format_version": FORMAT_VERSION,
                "kind": self.kind,
                "config": config_to_dict(self.config),
                "image_threshold": self.image_threshold,
                "fit_info": self.fit_info,
                "files": files,
            }
            atomic_write_text(directory / DETECTOR_FILE, json.dumps(meta, indent=2) + "\n")
        except BaseException:
            # The previous model stays as it was; the new weight files written before the failure
            # (named with this save's token) would otherwise stay behind, named by no model.
            for path in directory.iterdir():
                if path.name not in present and token in path.name:
                    with contextlib.suppress(OSError):  # the save's own error is the one to report
                        _remove(path)
            raise
        if previous:
            for name in set(previous["files"].values()) - set(files.values()):
                _remove(directory / name)  # plain names inside `directory` only (_read_meta checks)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Detector":
        """Load a saved detector; ``directory`` may also be a run folder holding ``model/``."""
        directory = resolve_model_dir(directory)
        meta = _read_meta(directory)
        source = str(directory / DETECTOR_FILE)
        kind = meta.get("kind")
        target = _REGISTRY.get(kind)
        if target is None:
            raise ModelError(f"{source}: unknown detector kind {kind!r}; known: {sorted(_REGISTRY)}")
        if cls is not Detector and not issubclass(target, cls):
            raise ModelError(f"{source}: holds a {kind!r} detector, not a {cls.kind!r} one")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ModelError(f"{source}: format version {meta.get('format_version')} not supported "
                             f"(this slsg reads version {FORMAT_VERSION})")
        detector = target(config_from_dict(target.config_class, meta.get("config", {}), source))
        detector.image_threshold = meta.get("image_threshold")
        detector.fit_info = meta.get("fit_info", {})
        detector.saved_config_keys = frozenset(meta["config"])
        files = meta.get("files", {})
        for name in files.values():
            if not (directory / name).exists():
                raise ModelError(f"{source}: refers to {directory / name}, which does not exist")
        detector._load_weights(directory, files)
        return detector


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The folder holding detector.json: ``path`` itself or ``path/model`` (a run folder)."""
    path = Path(path)
    if path.name == DETECTOR_FILE and path.is_file():  # the file itself
        return path.parent
    if (path / DETECTOR_FILE).is_file():
        return path
    if (path / "model" / DETECTOR_FILE).is_file():
        return path / "model"
    if not path.exists():
        raise ModelError(f"model folder not found: {path}")
    raise ModelError(f"no saved detector in {path} (expected {path / DETECTOR_FILE} or "
                     f"{path / 'model' / DETECTOR_FILE})")


def load_detector(path: str | os.PathLike) -> Detector:
    """Load any registered detector saved with ``Detector.save``."""
    return Detector.load(path)


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / DETECTOR_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"no saved detector: {path} not found") from exc
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    if not isinstance(meta, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    for key in ("config", "fit_info", "files"):
        if not isinstance(meta.setdefault(key, {}), dict):
            raise ModelError(f"{path}: {key!r} must be a JSON object, got {type(meta[key]).__name__}")
    for role, name in meta["files"].items():
        # Plain names only: save() removes the files a previous model named, and a name
        # such as "../x" or "/x" would reach outside the model folder.
        if not isinstance(name, str) or not _is_plain_name(name):
            raise ModelError(f"{path}: file {role!r} must be a plain file name inside {directory}, got {name!r}")
    threshold = meta.get("image_threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not math.isfinite(threshold)):
        raise ModelError(f"{path}: image_threshold must be a finite number or null, got {threshold!r}")
    return meta


def _is_plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and Path(name).name == name


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
        return
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
