"""Synthesis configuration and per-category presets.

The release hard-codes per-category rules for MVTec LOCO (which categories restrict
anomalies to the object, which kind of anomaly dominates). Here those rules are data:
a frozen dataclass saved as JSON, and a table of named presets. The LOCO presets are
this project's reading of each category (its full text and rule table are not
available); every value is an ordinary field a user can override.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from slsg.utils import atomic_write_text

from .self_content import SelfContentParams
from .textures import PROCEDURAL_TEXTURES, TEXTURE_AUGMENTATIONS

__all__ = ["SynthesisConfig", "PRESETS", "CATEGORY_PRESETS", "get_preset", "preset_for_category"]

BRANCHES = ("texture", "self")
FOREGROUND_MODES = ("none", "border")


@dataclass(frozen=True)
class SynthesisConfig:
    """Everything that shapes the simulated anomalies. Defaults follow METHOD.md."""

    # Share of samples from the self-content (logical) branch; the rest are texture.
    self_content_prob: float = 0.58
    min_pixels: int = 49  # masks with fewer set pixels are redrawn
    rotation_deg: float = 90.0  # Perlin field rotated uniformly in +-this

    # Texture (structural) branch.
    texture_perlin_scale: int = 4  # 2^randint(0, s) lattice cells per axis (s exclusive)
    texture_threshold: float = 0.5
    texture_beta: tuple[float, float] = (0.0, 0.9)  # share of the original kept in the mask
    texture_augmentations: tuple[str, ...] = tuple(TEXTURE_AUGMENTATIONS)
    texture_num_augmentations: int = 3
    texture_crop_scale: tuple[float, float] = (0.25, 1.0)  # crop area fraction of a texture photo
    procedural_textures: tuple[str, ...] = tuple(PROCEDURAL_TEXTURES)  # used when no folder is given

    # Self-content (logical) branch.
    self_perlin_scale: int = 3
    self_threshold: float = 0.4
    self_beta: tuple[float, float] = (0.0, 0.25)
    self_other_prob: float = 0.5  # use another normal image (when one is given) instead of the image
    self_flip_prob: float = 0.5
    self_brightness: float = 0.2  # colour-jitter strengths (factor 1 +- value; hue shift +- value)
    self_contrast: float = 0.2
    self_saturation: float = 0.2
    self_hue: float = 0.03
    self_grid: tuple[int, int] = (4, 8)  # rows x cols of the grid shuffle
    self_shuffle_prob: float = 0.6
    self_row_copy_prob: float = 0.6
    # Mask pixels whose colour changed by less than this (max over channels) are
    # dropped from the label: a misplaced patch of plain background looks normal
    # and must not be taught as anomalous. So is a lone pixel (no changed
    # 8-neighbour) changed by at most twice this: noise, not a visible part. 0 disables.
    self_min_change: float = 0.04
    texture_min_change: float = 0.0

    # Foreground restriction: "none", or "border" (estimated from the border colour,
    # see foreground.estimate_foreground). A foreground passed to the synthesizer
    # call is used instead of the estimate. Applies to the listed branches only.
    foreground: str = "none"
    foreground_branches: tuple[str, ...] = ("texture", "self")
    foreground_threshold: float = 0.12
    # Grayscale images (all channels equal) get grayscale sources, otherwise colour
    # alone would give every simulated anomaly away.
    match_grayscale: bool = True

    def __post_init__(self) -> None:
        # Accept lists for the tuple fields (JSON and hand-written configs produce them).
        for f in fields(self):
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))

        def prob(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= 1.0:
                raise ValueError(f"SynthesisConfig.{name} must be a number in [0, 1], got {v!r}")

        def interval(name: str, lo: float, hi: float) -> None:
            v = getattr(self, name)
            if (not isinstance(v, tuple) or len(v) != 2
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
                    or not lo <= v[0] <= v[1] <= hi):
                raise ValueError(f"SynthesisConfig.{name} must be a pair (low, high) with "
                                 f"{lo} <= low <= high <= {hi}, got {v!r}")

        def names(name: str, known, allow_empty: bool = False) -> None:
            v = getattr(self, name)
            if not isinstance(v, tuple) or not all(isinstance(x, str) for x in v):
                raise ValueError(f"SynthesisConfig.{name} must be a tuple of names, got {v!r}")
            unknown = [x for x in v if x not in known]
            if unknown or (not v and not allow_empty) or len(set(v)) != len(v):
                raise ValueError(f"SynthesisConfig.{name} = {v!r}: names must be distinct and among {sorted(known)}")

        for name in ("self_content_prob", "self_other_prob", "self_flip_prob", "self_shuffle_prob",
                     "self_row_copy_prob", "self_min_change", "texture_min_change", "foreground_threshold",
                     "self_brightness", "self_contrast", "self_saturation"):
            prob(name)
        if not isinstance(self.self_hue, (int, float)) or not 0.0 <= self.self_hue <= 0.5:
            raise ValueError(f"SynthesisConfig.self_hue must be in [0, 0.5], got {self.self_hue!r}")
        if not isinstance(self.min_pixels, int) or isinstance(self.min_pixels, bool) or self.min_pixels < 1:
            raise ValueError(f"SynthesisConfig.min_pixels must be a positive int, got {self.min_pixels!r}")
        if not isinstance(self.rotation_deg, (int, float)) or not 0.0 <= self.rotation_deg <= 180.0:
            raise ValueError(f"SynthesisConfig.rotation_deg must be in [0, 180], got {self.rotation_deg!r}")
        for name in ("texture_perlin_scale", "self_perlin_scale"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 8:
                raise ValueError(f"SynthesisConfig.{name} must be an int in [1, 8], got {v!r}")
        for name in ("texture_threshold", "self_threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not -1.0 < v < 1.0:
                raise ValueError(f"SynthesisConfig.{name} must be in (-1, 1) (Perlin values), got {v!r}")
        interval("texture_beta", 0.0, 1.0)
        interval("self_beta", 0.0, 1.0)
        interval("texture_crop_scale", 1e-3, 1.0)
        names("texture_augmentations", TEXTURE_AUGMENTATIONS, allow_empty=True)
        names("procedural_textures", PROCEDURAL_TEXTURES)
        names("foreground_branches", BRANCHES, allow_empty=True)
        n = self.texture_num_augmentations
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(self.texture_augmentations):
            raise ValueError(f"SynthesisConfig.texture_num_augmentations must be an int in "
                             f"[0, {len(self.texture_augmentations)}], got {n!r}")
        g = self.self_grid
        if (not isinstance(g, tuple) or len(g) != 2 or not all(isinstance(x, int) and x >= 1 for x in g)
                or g[0] * g[1] < 2):
            raise ValueError(f"SynthesisConfig.self_grid must be (rows, cols) positive ints with 2+ cells, got {g!r}")
        if self.foreground not in FOREGROUND_MODES:
            raise ValueError(f"SynthesisConfig.foreground must be one of {FOREGROUND_MODES}, got {self.foreground!r}")
        if not isinstance(self.match_grayscale, bool):
            raise ValueError(f"SynthesisConfig.match_grayscale must be a bool, got {self.match_grayscale!r}")

    # ------------------------------------------------------------ views and I/O
    @property
    def self_content_params(self) -> SelfContentParams:
        return SelfContentParams(
            other_prob=self.self_other_prob, flip_prob=self.self_flip_prob, brightness=self.self_brightness,
            contrast=self.self_contrast, saturation=self.self_saturation, hue=self.self_hue,
            grid=self.self_grid, shuffle_prob=self.self_shuffle_prob, row_copy_prob=self.self_row_copy_prob,
        )

    def replace(self, **changes: Any) -> "SynthesisConfig":
        """A copy with some fields changed (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SynthesisConfig":
        """Build from a dict such as ``to_dict()`` makes; missing keys take defaults, unknown keys fail."""
        if not isinstance(data, dict):
            raise ValueError(f"SynthesisConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SynthesisConfig fields {unknown}; known fields: {sorted(known)}")
        # JSON has no tuples: sequences come back as lists.
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SynthesisConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid SynthesisConfig JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the config as JSON (atomically) and return the path."""
        path = Path(path)
        atomic_write_text(path, self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SynthesisConfig":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read SynthesisConfig from {path}: {exc}") from exc
        try:
            return cls.from_json(text)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc


_DEFAULT = SynthesisConfig()

PRESETS: dict[str, SynthesisConfig] = {
    # METHOD.md as written: 58% logical, no foreground restriction.
    "default": _DEFAULT,
    # Textures that fill the frame (MVTec carpet/grid/leather/tile/wood, MTD): there is
    # no layout to break, so self-content is rare, and no foreground to restrict to.
    "texture": _DEFAULT.replace(self_content_prob=0.2, self_grid=(8, 8)),
    # Single objects on a plain background (MVTec AD bottle, screw, ...): defects are
    # on the object, so both branches are restricted to the estimated foreground.
    "object": _DEFAULT.replace(foreground="border", foreground_branches=("texture", "self")),
    # MVTec LOCO AD. Logical anomalies dominate the test set, so the self-content
    # branch dominates; the grid follows each scene's layout.
    # Box of fruit, granola and chips filling the frame: no background to exclude.
    "breakfast_box": _DEFAULT.replace(self_content_prob=0.7, self_grid=(2, 4)),
    # One bottle on a dark background: restrict both branches to the bottle.
    "juice_bottle": _DEFAULT.replace(self_content_prob=0.6, self_grid=(4, 2),
                                     foreground="border", foreground_branches=("texture", "self")),
    # 3x5 compartments with one pin each: shuffling whole compartments moves pins.
    "pushpins": _DEFAULT.replace(self_content_prob=0.7, self_grid=(3, 5)),
    # Loose screws, nuts and washers in a bag: parts anywhere, no stable layout.
    "screw_bag": _DEFAULT.replace(self_content_prob=0.6, self_grid=(4, 4)),
    # Two connectors joined by a cable on a plain background: texture defects only on
    # the objects; self-content may move parts onto the background (misplaced cable).
    "splicing_connectors": _DEFAULT.replace(self_content_prob=0.6, self_grid=(4, 4),
                                            foreground="border", foreground_branches=("texture",)),
}

# Which preset a known category uses; unknown categories get "default".
CATEGORY_PRESETS: dict[str, str] = {
    **{c: "texture" for c in ("carpet", "grid", "leather", "tile", "wood", "mtd")},
    **{c: "object" for c in ("bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill",
                             "screw", "toothbrush", "transistor", "zipper")},
    **{c: c for c in ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")},
}


def get_preset(name: str) -> SynthesisConfig:
    """The preset called ``name`` (a preset name or a known category name)."""
    if name in PRESETS:
        return PRESETS[name]
    if name in CATEGORY_PRESETS:
        return PRESETS[CATEGORY_PRESETS[name]]
    raise ValueError(f"unknown synthesis preset {name!r}; presets: {sorted(PRESETS)}; "
                     f"categories: {sorted(CATEGORY_PRESETS)}")


def preset_for_category(category: str) -> SynthesisConfig:
    """The preset for a dataset category (folder name); "default" when the category is unknown."""
    return PRESETS[CATEGORY_PRESETS.get(category.lower(), "default")]
