"""The anomaly synthesizer: one normal image in, one simulated anomaly and its mask out."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F

from .blend import blend
from .foreground import estimate_foreground
from .perlin import perlin_masks
from .presets import BRANCHES, SynthesisConfig, get_preset
from .rng import chance, uniform
from .self_content import self_content_source
from .textures import TextureFolder, augment_texture, procedural_texture
from .validation import check_generator, check_image, check_mask

__all__ = ["AnomalySynthesizer", "Synthesis"]

OtherNormal = Union[torch.Tensor, Callable[[], torch.Tensor], None]

# A self-content draw whose visible change is too small is redrawn this many times
# before the sample falls back to the texture branch.
_SELF_CONTENT_ATTEMPTS = 4


@dataclass
class Synthesis:
    """One simulated anomaly with what produced it."""

    image: torch.Tensor  # float [3, H, W] in [0, 1]: the augmented image
    mask: torch.Tensor  # float [1, H, W] in {0, 1}
    source: torch.Tensor  # float [3, H, W]: what was blended in
    branch: str  # "texture" (structural) or "self" (logical)
    beta: float  # share of the original kept inside the mask
    ops: tuple[str, ...]  # operations that made the source (for logs and examples)

    @property
    def kind(self) -> str:
        """The dataset vocabulary: "structural" for texture, "logical" for self-content."""
        return "structural" if self.branch == "texture" else "logical"


def _load_once(loader: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """Wrap a loader so retries do not load the other image again."""
    cache: list[torch.Tensor] = []

    def load() -> torch.Tensor:
        if not cache:
            cache.append(loader())
        return cache[0]

    return load


def _visible_change(augmented: torch.Tensor, image: torch.Tensor, min_change: float) -> torch.Tensor:
    """bool [H, W]: pixels whose colour changed by more than ``min_change`` (max over channels).

    The label follows the change pixel by pixel: a local average here labelled unchanged
    neighbours anomalous and dropped changed edges and thin parts. Only a faint change
    (at most twice the threshold) with no changed 8-neighbour is dropped, as noise in
    moved plain background; a stronger change is always labelled.
    """
    change = (augmented - image).abs().amax(0)
    changed = change > min_change
    ring = torch.ones(1, 1, 3, 3, dtype=augmented.dtype, device=augmented.device)
    ring[0, 0, 1, 1] = 0
    neighbours = F.conv2d(changed.to(augmented.dtype)[None, None], ring, padding=1)[0, 0]
    return changed & ((change > 2 * min_change) | (neighbours > 0.5))


def _as_float32(other: OtherNormal) -> OtherNormal:
    if isinstance(other, torch.Tensor):
        return other.float()
    if callable(other):
        return lambda: other().float()
    return other


def _is_grayscale(image: torch.Tensor) -> bool:
    return bool((image.amax(0) - image.amin(0)).max() < 1e-3)


class AnomalySynthesizer:
    """Simulated anomalies (METHOD.md, "Simulated anomalies").

    config: a SynthesisConfig, or a preset name (see ``PRESETS``); None = "default".
    textures: a folder of texture images (searched recursively), or None for
    procedural textures. The synthesizer holds no random state: every call is driven
    by the torch.Generator passed in, so results are reproducible and workers never
    share a stream.
    """

    def __init__(
        self,
        config: SynthesisConfig | str | None = None,
        textures: str | os.PathLike | None = None,
        cache_size: int = 64,
    ) -> None:
        if config is None:
            config = get_preset("default")
        elif isinstance(config, str):
            config = get_preset(config)
        elif not isinstance(config, SynthesisConfig):
            raise TypeError(f"config must be a SynthesisConfig or a preset name, got {type(config).__name__}")
        self.config = config
        self.textures = TextureFolder(textures, cache_size=cache_size) if textures is not None else None

    def __repr__(self) -> str:
        source = self.textures if self.textures is not None else "procedural textures"
        return f"AnomalySynthesizer(self_content_prob={self.config.self_content_prob}, textures={source})"

    def __call__(
        self,
        image: torch.Tensor,
        generator: torch.Generator,
        other_normal: OtherNormal = None,
        foreground: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented float ``[3, H, W]``, mask float ``[1, H, W]`` in {0, 1}) for one normal image."""
        result = self.sample(image, generator, other_normal=other_normal, foreground=foreground)
        return result.image, result.mask

    # ------------------------------------------------------------------ internals
    def _foreground(self, image: torch.Tensor, foreground: torch.Tensor | None, branch: str) -> torch.Tensor | None:
        cfg = self.config
        if branch not in cfg.foreground_branches:
            return None
        if foreground is not None:
            return foreground
        if cfg.foreground == "border":
            fg = estimate_foreground(image, threshold=cfg.foreground_threshold)
            if fg is not None and int(fg.sum()) >= cfg.min_pixels:
                return fg
        return None

    def _texture_source(self, image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        cfg = self.config
        size = tuple(image.shape[-2:])
        if self.textures is not None:
            texture, ops = self.textures.sample(size, generator, cfg.texture_crop_scale), ["folder"]
        else:
            texture, ops = procedural_texture(size, generator, cfg.procedural_textures), ["procedural"]
        texture, applied = augment_texture(texture, generator, cfg.texture_augmentations,
                                           cfg.texture_num_augmentations)
        return texture.to(image.device, image.dtype), ops + applied

    def _draw(
        self, image: torch.Tensor, generator: torch.Generator, branch: str, other_normal: OtherNormal,
        fg: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, float, list[str], torch.Tensor]:
        """One (augmented, mask bool [H, W], beta, ops, source) draw of ``branch``."""
        cfg = self.config
        h, w = image.shape[-2:]
        if branch == "texture":
            scale, threshold, beta_range, min_change = (
                cfg.texture_perlin_scale, cfg.texture_threshold, cfg.texture_beta, cfg.texture_min_change)
        else:
            scale, threshold, beta_range, min_change = (
                cfg.self_perlin_scale, cfg.self_threshold, cfg.self_beta, cfg.self_min_change)
        mask = perlin_masks(1, (h, w), scale, threshold, generator, cfg.min_pixels, fg, cfg.rotation_deg)[0]
        if branch == "texture":
            source, ops = self._texture_source(image, generator)
        else:
            source, ops = self_content_source(image, generator, cfg.self_content_params, other_normal)
        if cfg.match_grayscale and _is_grayscale(image):
            source = source.mean(0, keepdim=True).expand(3, -1, -1).contiguous()
        beta = uniform(generator, *beta_range)
        augmented = blend(image, source, mask, beta)
        if min_change > 0:
            mask = mask & _visible_change(augmented, image, min_change)
        return augmented, mask, beta, ops, source

    def sample(
        self,
        image: torch.Tensor,
        generator: torch.Generator,
        other_normal: OtherNormal = None,
        foreground: torch.Tensor | None = None,
        branch: str | None = None,
    ) -> Synthesis:
        """One simulated anomaly with its provenance (see ``Synthesis``).

        image: float ``[3, H, W]`` in [0, 1]. generator: drives every random choice
        (must be on the image's device type). other_normal: another normal image of
        the same product (resized to the image's size when it differs), or a
        zero-argument callable returning one (called only when needed, to avoid
        loading images for nothing). foreground: optional
        bool ``[H, W]`` or ``[1, H, W]`` region anomalies must stay in (for the
        branches the config restricts; overrides the config's estimate).
        branch: force "texture" or "self"; None draws it (self with probability
        ``config.self_content_prob``).
        """
        cfg = self.config
        size = check_image(image)
        check_generator(generator, image.device)
        if image.dtype != torch.float32:
            # Colour ops are only reliable in float32; hand back the caller's dtype.
            result = self.sample(image.float(), generator, other_normal=_as_float32(other_normal),
                                 foreground=foreground, branch=branch)
            # Pixels the float32 run left as they were are the caller's own, not a float32 round trip
            # of them (inside the mask too: the self branch changes some pixels it does not mark).
            unchanged = result.image == image.float()
            result.image = torch.where(unchanged, image, result.image.to(image.dtype))
            result.mask, result.source = result.mask.to(image.dtype), result.source.to(image.dtype)
            return result
        if isinstance(other_normal, torch.Tensor):
            check_image(other_normal, "other_normal")  # its size may differ: resized where it is used
        elif other_normal is not None and not callable(other_normal):
            raise TypeError(f"other_normal must be a tensor, a callable or None, got {type(other_normal).__name__}")
        if foreground is not None:
            foreground = check_mask(foreground, size, "foreground").to(image.device)
            if int(foreground.sum()) < cfg.min_pixels:
                raise ValueError(f"foreground has {int(foreground.sum())} pixels, fewer than "
                                 f"min_pixels={cfg.min_pixels}")
        if branch is None:
            branch = "self" if chance(generator, cfg.self_content_prob) else "texture"
        elif branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES} or None, got {branch!r}")

        if branch == "self":
            if callable(other_normal):
                other_normal = _load_once(other_normal)
            fg = self._foreground(image, foreground, "self")
            for _ in range(_SELF_CONTENT_ATTEMPTS):
                augmented, mask, beta, ops, source = self._draw(image, generator, "self", other_normal, fg)
                if int(mask.sum()) >= cfg.min_pixels:
                    return self._result(augmented, mask, source, "self", beta, ops)
            # The image is too uniform for rearranged content to show: make it structural.
            branch = "texture"

        fg = self._foreground(image, foreground, "texture")
        for _ in range(_SELF_CONTENT_ATTEMPTS):
            augmented, mask, beta, ops, source = self._draw(image, generator, "texture", None, fg)
            if int(mask.sum()) >= cfg.min_pixels:
                break
        else:
            raise RuntimeError(
                f"could not draw a visible texture anomaly in {_SELF_CONTENT_ATTEMPTS} attempts "
                f"(texture_min_change={cfg.texture_min_change} may be too high)")
        return self._result(augmented, mask, source, "texture", beta, ops)

    @staticmethod
    def _result(augmented, mask, source, branch, beta, ops) -> Synthesis:
        return Synthesis(
            image=augmented.clamp(0.0, 1.0),
            mask=mask.to(augmented.dtype).unsqueeze(0),
            source=source,
            branch=branch,
            beta=beta,
            ops=tuple(ops),
        )
