"""Simulated anomalies (METHOD.md, "Simulated anomalies").

Perlin masks, a texture (structural) branch and a self-content (logical) branch,
blended into normal images. Everything random is driven by a torch.Generator passed
in; configuration is a JSON-serialisable dataclass with per-category presets.
"""
from .blend import blend
from .dataset import SimulatedAnomalyDataset, derive_seed, item_generator, worker_generator
from .examples import write_examples
from .foreground import estimate_foreground
from .perlin import perlin_masks, perlin_noise
from .presets import CATEGORY_PRESETS, PRESETS, SynthesisConfig, get_preset, preset_for_category
from .self_content import copy_rows, grid_shuffle, self_content_source
from .synthesizer import AnomalySynthesizer, Synthesis
from .textures import (PROCEDURAL_TEXTURES, TEXTURE_AUGMENTATIONS, TextureFolder, augment_texture,
                       procedural_texture)

__all__ = [
    "AnomalySynthesizer", "CATEGORY_PRESETS", "PRESETS", "PROCEDURAL_TEXTURES", "SimulatedAnomalyDataset",
    "Synthesis", "SynthesisConfig", "TEXTURE_AUGMENTATIONS", "TextureFolder", "augment_texture", "blend",
    "copy_rows", "derive_seed", "estimate_foreground", "get_preset", "grid_shuffle", "item_generator",
    "perlin_masks", "perlin_noise", "preset_for_category", "procedural_texture", "self_content_source",
    "worker_generator", "write_examples",
]
