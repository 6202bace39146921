"""Anomaly sources for the texture (structural) branch.

Either texture photographs from a folder (DTD-like, searched recursively) or, when no
folder is given, procedural textures. Each source gets a few random colour/geometry
augmentations, as in the release (after DRAEM), so that a few hundred textures give
many distinct defects. All randomness comes from the torch.Generator passed in.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from ..base import list_images
from ..io import DataError, load_image, resize_image
from .perlin import as_size, perlin_noise
from .rng import randint, uniform
from .validation import check_generator

__all__ = [
    "TEXTURE_AUGMENTATIONS", "PROCEDURAL_TEXTURES", "TextureFolder",
    "augment_texture", "procedural_texture", "rotate_reflect",
]


def rotate_reflect(image: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate ``[C, H, W]`` about its centre, filling the corners by reflection (no black wedges)."""
    c, h, w = image.shape
    t = math.radians(degrees)
    # affine_grid works in normalised coordinates; correct for the aspect ratio.
    theta = torch.tensor(
        [[math.cos(t), -math.sin(t) * h / w, 0.0], [math.sin(t) * w / h, math.cos(t), 0.0]],
        dtype=image.dtype, device=image.device,
    )[None]
    grid = F.affine_grid(theta, [1, c, h, w], align_corners=False)
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]


# Each augmentation: (image [3, H, W] in [0, 1], generator) -> image. Parameter ranges
# follow the release's imgaug list (gamma, brightness, sharpness, hue/saturation,
# solarize, posterize, invert, autocontrast, equalize, rotate) plus flips.
def _gamma(x, g):
    return x.clamp(min=0.0).pow(uniform(g, 0.5, 2.0))


def _brightness(x, g):
    return x * uniform(g, 0.8, 1.2) + uniform(g, -30.0, 30.0) / 255.0


def _contrast(x, g):
    return TF.adjust_contrast(x, uniform(g, 0.5, 1.5))


def _sharpness(x, g):
    return TF.adjust_sharpness(x, uniform(g, 0.0, 2.0))


def _hue_saturation(x, g):
    return TF.adjust_saturation(TF.adjust_hue(x, uniform(g, -0.1, 0.1)), uniform(g, 0.5, 1.5))


def _solarize(x, g):
    return TF.solarize(x, uniform(g, 32.0, 128.0) / 255.0)


def _posterize(x, g):
    return TF.posterize(x, randint(g, 2, 5))


def _invert(x, g):
    return 1.0 - x


def _autocontrast(x, g):
    return TF.autocontrast(x)


def _equalize(x, g):
    return TF.equalize(x)


def _rotate(x, g):
    return rotate_reflect(x, uniform(g, -45.0, 45.0))


def _flip(x, g):
    return x.flip(-1) if randint(g, 0, 1) else x.flip(-2)


TEXTURE_AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "gamma": _gamma,
    "brightness": _brightness,
    "contrast": _contrast,
    "sharpness": _sharpness,
    "hue_saturation": _hue_saturation,
    "solarize": _solarize,
    "posterize": _posterize,
    "invert": _invert,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "rotate": _rotate,
    "flip": _flip,
}


def augment_texture(
    texture: torch.Tensor, generator: torch.Generator, names: Sequence[str], count: int = 3
) -> tuple[torch.Tensor, list[str]]:
    """Apply ``count`` distinct augmentations drawn from ``names``, in random order.

    Returns the augmented texture and the names applied, in order.
    """
    unknown = [n for n in names if n not in TEXTURE_AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown texture augmentations {unknown}; known: {sorted(TEXTURE_AUGMENTATIONS)}")
    if not 0 <= count <= len(names):
        raise ValueError(f"cannot pick {count} augmentations from {len(names)} names")
    order = torch.randperm(len(names), generator=generator, device=generator.device)[:count]
    chosen = [names[i] for i in order.tolist()]
    for name in chosen:
        texture = TEXTURE_AUGMENTATIONS[name](texture, generator).clamp_(0.0, 1.0)
    return texture, chosen


# ---------------------------------------------------------------- procedural textures
def _random_colours(generator: torch.Generator, k: int) -> torch.Tensor:
    """k random RGB colours [k, 3, 1, 1], pushed apart so the pattern is visible."""
    colours = torch.rand(k, 3, generator=generator, device=generator.device)
    if k >= 2 and float((colours[0] - colours[1]).abs().max()) < 0.3:
        colours[1] = 1.0 - colours[0]
    return colours.view(k, 3, 1, 1)


def _unit_grid(h: int, w: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates in [-0.5, 0.5], rotated by a random angle: (u, v) each [H, W]."""
    device = generator.device
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h - 0.5
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w - 0.5
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    t = uniform(generator, 0.0, math.pi)
    return math.cos(t) * xx - math.sin(t) * yy, math.sin(t) * xx + math.cos(t) * yy


def _perlin_colour(h: int, w: int, g: torch.Generator) -> torch.Tensor:
    # Three independent noise fields drive a random colour ramp plus per-channel tint.
    noise = perlin_noise(3, (h, w), 6, g)
    # Stretch each field to [0, 1]: a one-cell field alone would be nearly flat.
    lo, hi = noise.amin((1, 2), keepdim=True), noise.amax((1, 2), keepdim=True)
    noise = (noise - lo) / (hi - lo).clamp(min=1e-6)
    a, b = _random_colours(g, 2)
    return (a + (b - a) * noise[0:1]) * 0.7 + 0.3 * noise


def _stripes(h: int, w: int, g: torch.Generator) -> torch.Tensor:
    u, _ = _unit_grid(h, w, g)
    wave = torch.sin(2 * math.pi * uniform(g, 3.0, 24.0) * u + uniform(g, 0.0, 2 * math.pi))
    if randint(g, 0, 1):  # hard-edged bands or soft sinusoidal ones
        wave = wave.sign()
    a, b = _random_colours(g, 2)
    return a + (b - a) * (wave * 0.5 + 0.5)


def _checker(h: int, w: int, g: torch.Generator) -> torch.Tensor:
    u, v = _unit_grid(h, w, g)
    cells = uniform(g, 3.0, 20.0)
    parity = ((u * cells).floor() + (v * cells).floor()).remainder(2.0)
    a, b = _random_colours(g, 2)
    return a + (b - a) * parity


def _blobs(h: int, w: int, g: torch.Generator) -> torch.Tensor:
    # Layered thresholded noise in several colours: stains, spots, contamination.
    k = randint(g, 2, 4)
    colours = _random_colours(g, k + 1)
    out = colours[0].expand(3, h, w).clone()
    levels = perlin_noise(k, (h, w), 6, g)
    for i in range(k):
        out = torch.where(levels[i] > uniform(g, -0.2, 0.3), colours[i + 1], out)
    return out


PROCEDURAL_TEXTURES: dict[str, Callable[[int, int, torch.Generator], torch.Tensor]] = {
    "perlin_colour": _perlin_colour,
    "stripes": _stripes,
    "checker": _checker,
    "blobs": _blobs,
}


def procedural_texture(
    size: int | tuple[int, int], generator: torch.Generator, kinds: Sequence[str] = tuple(PROCEDURAL_TEXTURES)
) -> torch.Tensor:
    """A random procedural texture float ``[3, H, W]`` in [0, 1], of a kind drawn from ``kinds``."""
    check_generator(generator)
    h, w = as_size(size)
    if not kinds:
        raise ValueError("kinds must name at least one procedural texture")
    unknown = [k for k in kinds if k not in PROCEDURAL_TEXTURES]
    if unknown:
        raise ValueError(f"unknown procedural textures {unknown}; known: {sorted(PROCEDURAL_TEXTURES)}")
    kind = kinds[randint(generator, 0, len(kinds) - 1)]
    texture = PROCEDURAL_TEXTURES[kind](h, w, generator)
    # Mild grain so flat colour areas are not trivially uniform.
    grain = torch.randn(1, h, w, generator=generator, device=generator.device) * 0.02
    return (texture + grain).clamp_(0.0, 1.0)


# ---------------------------------------------------------------- texture folders
class TextureFolder:
    """Texture photographs under ``root`` (recursive), sampled as random square crops.

    Decoded images are kept in a small LRU cache (as uint8, downscaled so the shorter
    side is at most ``max_side``) because decoding a JPEG costs more than the rest of
    the synthesis. Each DataLoader worker holds its own cache.
    """

    def __init__(self, root: str | os.PathLike, cache_size: int = 64, max_side: int = 512) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"texture folder not found: {self.root}")
        self.paths = list_images(self.root, recursive=True)
        if not self.paths:
            raise DataError(f"no texture images (png/jpg/bmp/tif/webp) found under {self.root}")
        if cache_size < 0 or max_side < 8:
            raise ValueError(f"cache_size must be >= 0 and max_side >= 8, got {cache_size}, {max_side}")
        self.cache_size = cache_size
        self.max_side = max_side
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"TextureFolder({str(self.root)!r}, {len(self)} images)"

    def __getstate__(self) -> dict:
        # Do not ship a parent's cache to DataLoader workers.
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    def _load(self, index: int) -> torch.Tensor:
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        image = load_image(self.paths[index])
        short = min(image.width, image.height)
        if short > self.max_side:
            f = self.max_side / short
            image = image.resize((max(1, round(image.width * f)), max(1, round(image.height * f))))
        tensor = resize_image(image, None).mul_(255.0).round_().to(torch.uint8)
        if self.cache_size:
            self._cache[index] = tensor
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return tensor

    def sample(
        self, size: int | tuple[int, int], generator: torch.Generator, crop_scale: tuple[float, float] = (0.25, 1.0)
    ) -> torch.Tensor:
        """A random texture, float ``[3, H, W]`` in [0, 1] on the generator's device.

        A square crop whose area is a fraction ``crop_scale`` of the largest square
        that fits is taken at a random position and resized to ``size``.
        """
        check_generator(generator)
        h, w = as_size(size)
        index = randint(generator, 0, len(self.paths) - 1)
        full = self._load(index)
        _, fh, fw = full.shape
        side = max(1, round(min(fh, fw) * math.sqrt(uniform(generator, *crop_scale))))
        top = randint(generator, 0, fh - side)
        left = randint(generator, 0, fw - side)
        crop = full[:, top:top + side, left:left + side].float().div_(255.0)
        crop = F.interpolate(crop[None], size=(h, w), mode="bilinear", align_corners=False, antialias=side > max(h, w))
        return crop[0].clamp_(0.0, 1.0).to(generator.device)
