"""Datasets (MVTec AD, MVTec LOCO AD, MTD, plain folders), image/mask I/O and downloads.

The anomaly synthesis lives in the sub-package `slsg.data.synthesis` (import it directly).
"""
from .base import AnomalyDataset, Sample
from .datasets import Folder, MTD, MVTecAD, MVTecLOCO, detect_layout, open_dataset
from .folder import seeded_split
from .io import DataError, load_image, load_mask, load_mask_values
from .mvtec import DefectConfig, parse_defects_config

__all__ = [
    "AnomalyDataset", "DataError", "DefectConfig", "Folder", "MTD", "MVTecAD", "MVTecLOCO", "Sample",
    "detect_layout", "load_image", "load_mask", "load_mask_values", "open_dataset", "parse_defects_config",
    "seeded_split",
]
