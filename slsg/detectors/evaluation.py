"""Run a fitted detector over a labelled test split and compute the benchmark metrics.

Pixel metrics are computed at each image's ORIGINAL resolution (as the benchmarks define them):
maps predicted at the model's input size are resized up bilinearly to the size of the
ground-truth masks.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from slsg import metrics as M
from slsg.detectors.base import Detector, collate_images, dataset_method


@dataclass
class Evaluation:
    """Everything a report needs about one test run."""

    scores: np.ndarray  # [N] image scores
    labels: np.ndarray  # [N] 0 normal, 1 anomalous
    maps: list[np.ndarray]  # N maps [H0_i, W0_i] float32 at original resolution
    masks: list[np.ndarray]  # N ground-truth masks bool [H0_i, W0_i]
    paths: list[str]
    defect_types: list[str]
    kinds: list[str]
    predict_seconds: float  # model time only (no image loading)
    total_seconds: float  # wall time including loading and resizing
    threshold: float | None = None
    region_masks: list[list[tuple[np.ndarray, int]]] | None = None  # MVTec LOCO sPRO regions
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return len(self.scores) / self.predict_seconds if self.predict_seconds > 0 else float("nan")


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"image": collate_images([item["image"] for item in items]),
            "path": [item["path"] for item in items], "label": [int(item["label"]) for item in items],
            "defect_type": [item.get("defect_type", "") for item in items],
            "kind": [item.get("kind", "good" if not item["label"] else "structural") for item in items]}


def evaluate(detector: Detector, dataset, batch_size: int = 8, num_workers: int = 0,
             progress: bool = True, compute: bool = True) -> Evaluation:
    """Predict every image of ``dataset`` and (with ``compute``) fill ``Evaluation.metrics``."""
    if len(dataset) == 0:
        raise ValueError("evaluate: the test dataset is empty")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate)
    scores, labels, maps, masks = [], [], [], []
    paths, defect_types, kinds = [], [], []
    unmarked = []  # images whose mask files mark nothing
    predict_seconds = 0.0
    start = time.perf_counter()
    index = 0
    for batch in tqdm(loader, desc="test", unit="batch", disable=not progress, leave=False):
        t0 = time.perf_counter()
        batch_scores, batch_maps = detector.predict_each(batch["image"])
        predict_seconds += time.perf_counter() - t0
        for j in range(len(batch_scores)):
            mask = dataset_method(dataset, "full_mask", index)
            if mask is not None and not mask.any() and dataset_method(dataset, "has_mask_files", index):
                unmarked.append(batch["path"][j])
            size = mask.shape if mask is not None else tuple(batch_maps[j].shape[-2:])
            maps.append(resize_map(batch_maps[j], size))
            masks.append(mask if mask is not None else np.zeros(size, dtype=bool))
            index += 1
        scores += batch_scores.tolist()
        labels += batch["label"]
        paths += batch["path"]
        defect_types += batch["defect_type"]
        kinds += batch["kind"]
    if unmarked:
        warnings.warn(f"{len(unmarked)} test image(s) have ground-truth mask files with no marked pixel "
                      f"(e.g. {unmarked[0]}): their pixels all count as normal in the pixel metrics (masks "
                      "are read as white or 1 on black, or as the alpha channel of an otherwise black image)",
                      stacklevel=2)
    region_masks = None
    if dataset_method(dataset, "region_masks", None) is not None:
        region_masks = [dataset_method(dataset, "region_masks", i) for i in range(len(dataset))]
    result = Evaluation(np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64), maps, masks,
                        paths, defect_types, kinds, predict_seconds, time.perf_counter() - start,
                        threshold=detector.image_threshold, region_masks=region_masks)
    if compute:
        result.metrics = compute_metrics(result)
    return result


def resize_map(amap: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """One anomaly map [h, w] -> float32 array at ``size`` (bilinear; the benchmarks' convention)."""
    amap = amap.float()
    if tuple(amap.shape) != tuple(size):
        amap = F.interpolate(amap[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
    return amap.numpy().astype(np.float32, copy=False)


def compute_metrics(ev: Evaluation, pixel_f1: bool = False) -> dict[str, Any]:
    """Image AUROC, F1-max, pixel AUROC, AUPRO (and LOCO splits with sPRO) as fractions.

    A metric that the split cannot define (no anomalous images, no ground-truth pixels) is None.
    ``pixel_f1`` adds pixel-level F1-max (one more sort over all pixels).
    """
    out: dict[str, Any] = {"images": int(len(ev.scores)), "anomalous_images": int(ev.labels.sum())}
    both = 0 < ev.labels.sum() < len(ev.labels)
    out["image_auroc"] = M.image_auroc(ev.scores, ev.labels) if both else None
    out["f1_max"] = M.f1_max(ev.scores, ev.labels) if both else None
    has_pixels = any(m.any() for m in ev.masks) and any((~m).any() for m in ev.masks)
    out["pixel_auroc"] = M.pixel_auroc(ev.maps, ev.masks) if has_pixels else None
    out["aupro"] = M.aupro(ev.maps, ev.masks, fpr_limit=0.3) if has_pixels else None
    if pixel_f1:
        out["pixel_f1_max"] = M.f1_max(ev.maps, ev.masks) if has_pixels else None
    if ev.threshold is not None and both:
        predicted = ev.scores >= ev.threshold
        positive = ev.labels == 1
        out["threshold"] = float(ev.threshold)
        out["tpr_at_threshold"] = float(predicted[positive].mean())
        out["fpr_at_threshold"] = float(predicted[~positive].mean())
    if ev.region_masks is not None and set(ev.kinds) - {"good"}:
        out["loco"] = M.evaluate_splits(ev.scores, ev.kinds, ev.maps, ev.region_masks)
    by_type = {}
    for defect in sorted(set(ev.defect_types) - {"good"}):
        index = [i for i, d in enumerate(ev.defect_types) if d in (defect, "good")]
        sub_labels = ev.labels[index]
        if 0 < sub_labels.sum() < len(sub_labels):
            by_type[defect] = M.image_auroc(ev.scores[index], sub_labels)
    if by_type:
        out["image_auroc_by_defect"] = by_type
    return out


@torch.no_grad()
def measure_throughput(detector: Detector, images: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Images per second of the model on ``images``, a batch already at the model's input size
    (``detector.resize_to_input``'s output): ``detector.predict_input``, repeated; model time only."""
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"measure_throughput: {name} must be an int >= {low}, got {value!r}")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError("measure_throughput: images must be a non-empty batch [B, 3, H, W], got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    for _ in range(warmup):
        detector.predict_input(images)
    start = time.perf_counter()
    for _ in range(repeats):
        detector.predict_input(images)
    return repeats * len(images) / (time.perf_counter() - start)
