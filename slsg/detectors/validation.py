"""Validation without test images: normal training images held out, plus simulated anomalies.

To compare detector settings honestly, the test split must stay unseen. ``simulated_validation``
holds out a seeded share of the *training* (normal) images, fits the detector on the rest, and
scores the held-out images twice: as they are (label 0) and with a simulated anomaly pasted in
(label 1, with its mask). The metrics are the usual ones. Simulated anomalies are not real
defects, so the figures rank settings; they do not predict test accuracy.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from slsg.data.synthesis import AnomalySynthesizer, item_generator
from slsg.detectors.base import Detector
from slsg.detectors.evaluation import Evaluation, evaluate


class SimulatedValidationSet(Dataset):
    """Items 0..n-1: the normal images of ``normals`` (label 0). Items n..2n-1: the same images
    with a simulated anomaly (label 1), seeded per item, so every call gives the same set."""

    def __init__(self, normals: Dataset, synthesizer: AnomalySynthesizer, seed: int = 0,
                 branch: str | None = None) -> None:
        if len(normals) == 0:
            raise ValueError("SimulatedValidationSet: no normal images to build on")
        self.normals = normals
        self.synthesizer = synthesizer
        self.seed = seed
        self.branch = branch
        # evaluate() asks for full_mask(i) right after item i: keep each mask until then
        # rather than synthesising the anomaly twice.
        self._masks: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return 2 * len(self.normals)

    def _normal(self, index: int) -> dict[str, Any]:
        item = self.normals[index]
        return item if isinstance(item, dict) else {"image": item, "path": f"normal {index}"}

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.normals)
        if not 0 <= index < 2 * n:
            raise IndexError(f"index {index} out of range for {2 * n} items")
        item = self._normal(index % n)
        image = item["image"]
        if index < n:
            return {"image": image, "mask": torch.zeros(1, *image.shape[-2:]), "label": 0,
                    "path": str(item.get("path", "")), "defect_type": "good", "kind": "good"}
        result = self.synthesizer.sample(image, item_generator(self.seed, 0, index), branch=self.branch)
        self._masks[index] = result.mask[0].numpy() > 0.5
        return {"image": result.image, "mask": result.mask, "label": 1, "path": str(item.get("path", "")),
                "defect_type": f"simulated_{result.branch}", "kind": result.kind}

    def full_mask(self, index: int) -> np.ndarray:
        if index < len(self.normals):
            return np.zeros(tuple(self._normal(index)["image"].shape[-2:]), dtype=bool)
        if index not in self._masks:  # not served by this process (DataLoader workers)
            self[index]
        return self._masks.pop(index)


def simulated_validation(make_detector: Callable[[], Detector], normals: Dataset,
                         synthesizer: AnomalySynthesizer, holdout_ratio: float = 0.2, seed: int = 0,
                         branch: str | None = None, batch_size: int = 8) -> tuple[Detector, Evaluation]:
    """Fit ``make_detector()`` on a seeded ``1 - holdout_ratio`` share of ``normals`` and evaluate it
    on the rest, each held-out image once as it is and once with a simulated anomaly."""
    n = len(normals)
    if not 0.0 < holdout_ratio < 1.0:
        raise ValueError(f"holdout_ratio must lie in (0, 1), got {holdout_ratio}")
    n_val = round(holdout_ratio * n)
    if n_val < 1 or n_val >= n:
        raise ValueError(f"holdout_ratio {holdout_ratio} of {n} normal images leaves no image to "
                         "fit on or none to validate on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held_out, fit_part = sorted(order[:n_val]), sorted(order[n_val:])
    detector = make_detector().fit(Subset(normals, fit_part))
    validation = SimulatedValidationSet(Subset(normals, held_out), synthesizer, seed=seed, branch=branch)
    return detector, evaluate(detector, validation, batch_size=batch_size, progress=False)
