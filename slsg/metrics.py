"""Anomaly detection metrics as the benchmarks define them, computed exactly.

- image_auroc / pixel_auroc: area under the ROC curve (ties count one half).
- aupro: MVTec AD per-region overlap. Regions are the 8-connected components of each
  ground-truth mask (as in the official MVTec AD evaluation); the PRO curve (mean
  region overlap versus false positive rate over all defect-free pixels of all images)
  is integrated up to `fpr_limit` and divided by it.
- spro: MVTec LOCO saturated PRO. Regions are given (one per ground-truth file) with a
  saturation threshold in pixels, capped at the region's area (as the official LOCO
  evaluation does); a region's overlap is min(TP / threshold, 1).
- f1_max: the best F1 over all thresholds.

Speed: every curve is exact, built from one value sort of the defect-free scores (numpy's
vectorised float sort) and one sort of the (few) defective scores; nothing is subsampled.
Inputs may be NumPy arrays or torch tensors; maps may be [N, H, W] (or [N, 1, H, W]) or a
list of [H_i, W_i] maps of different sizes. Higher scores mean "more anomalous".
"""
from __future__ import annotations

import numbers
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from scipy import ndimage

__all__ = ["aupro", "evaluate_splits", "f1_max", "image_auroc", "loco_splits", "pixel_auroc",
           "pixel_metrics", "pro_curve", "roc_curve", "spro", "spro_curve", "threshold_from_normal"]

# 8-connectivity, as the official MVTec AD evaluation labels its regions.
_CONNECTIVITY = np.ones((3, 3), dtype=int)


# ----------------------------------------------------------------------------- input checks

def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    try:
        return np.asarray(x)
    except Exception as exc:
        raise TypeError(f"{name}: cannot convert {type(x).__name__} to an array: {exc}") from exc


def _score_array(x: Any, name: str) -> np.ndarray:
    """Real-valued scores: float32 stays float32 (fast sort), everything else becomes float64."""
    array = _to_numpy(x, name)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    elif array.dtype != np.float32:
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise TypeError(f"{name}: expected numbers, got dtype {array.dtype}")
        if np.iscomplexobj(array):
            raise TypeError(f"{name}: complex values are not scores")
        array = array.astype(np.float64)
    if not np.isfinite(array).all():
        bad = np.count_nonzero(~np.isfinite(array))
        raise ValueError(f"{name}: {bad} value(s) are NaN or infinite")
    return array


def _binary_array(x: Any, name: str) -> np.ndarray:
    array = _to_numpy(x, name)
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"{name}: expected a binary mask, got dtype {array.dtype}")
    if not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name}: values must be 0/1 (or bool), found e.g. "
                         f"{np.unique(array[~np.isin(array, (0, 1))])[:5].tolist()}")
    return array.astype(bool)


def _map_list(maps: Any, name: str, convert) -> list[np.ndarray]:
    """[N,H,W] / [N,1,H,W] array or a sequence of [H,W] / [1,H,W] maps -> list of 2-D arrays."""
    if isinstance(maps, (torch.Tensor, np.ndarray)):
        array = convert(maps, name)
        if array.ndim == 4 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 3:
            raise ValueError(f"{name}: expected shape [N, H, W] or [N, 1, H, W], got {tuple(array.shape)}")
        items = list(array)
    elif isinstance(maps, Sequence) and not isinstance(maps, (str, bytes)):
        items = []
        for i, item in enumerate(maps):
            array = convert(item, f"{name}[{i}]")
            if array.ndim == 3 and array.shape[0] == 1:
                array = array[0]
            if array.ndim != 2:
                raise ValueError(f"{name}[{i}]: expected a 2-D map [H, W], got shape {tuple(array.shape)}")
            items.append(array)
    else:
        raise TypeError(f"{name}: expected an array, tensor or list of maps, got {type(maps).__name__}")
    if not items:
        raise ValueError(f"{name}: no maps given")
    return items


def _maps_and_masks(maps: Any, masks: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    map_list = _map_list(maps, "maps", _score_array)
    mask_list = _map_list(masks, "masks", _binary_array)
    if len(map_list) != len(mask_list):
        raise ValueError(f"got {len(map_list)} maps but {len(mask_list)} masks")
    for i, (m, g) in enumerate(zip(map_list, mask_list)):
        if m.shape != g.shape:
            raise ValueError(f"map {i} has shape {m.shape} but its mask has shape {g.shape}; "
                             "resize maps to the masks' original resolution first")
    return map_list, mask_list


def _common_dtype(arrays: Sequence[np.ndarray]) -> type:
    return np.float32 if all(a.dtype == np.float32 for a in arrays) else np.float64


def _sorted_concatenation(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    values = np.concatenate(arrays).astype(dtype, copy=False)
    values.sort()  # in place: the concatenation is ours, a second 67 M copy is not needed
    return values


def _split_pixels(map_list: list[np.ndarray], mask_list: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    dtype = _common_dtype(map_list)
    pos = np.concatenate([m[g] for m, g in zip(map_list, mask_list)]).astype(dtype, copy=False)
    neg = np.concatenate([m[~g] for m, g in zip(map_list, mask_list)]).astype(dtype, copy=False)
    return pos, neg


def _scores_and_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flatten image scores (1-D) or maps (lists / arrays of any shape) together with their labels.
    Maps must match in shape before flattening (a [W, H] map against an [H, W] mask is an error,
    not a reordering of its pixels); a singleton channel is dropped first ([N, 1, H, W] arrays,
    [1, H, W] items of a list)."""
    if isinstance(scores, Sequence) and not isinstance(scores, (str, bytes)) and len(scores) and \
            np.ndim(_to_numpy(scores[0], "scores[0]")) > 0:
        score_list = [_drop_channel(_score_array(s, f"scores[{i}]"), 3) for i, s in enumerate(scores)]
        label_list = [_drop_channel(_binary_array(t, f"labels[{i}]"), 3) for i, t in enumerate(labels)]
        if len(score_list) != len(label_list):
            raise ValueError(f"got {len(score_list)} score maps but {len(label_list)} label maps")
        for i, (s, t) in enumerate(zip(score_list, label_list)):
            # Maps must match in shape; a per-image score ([1] from a batch of one) against its label
            # ([] or [1]) only in size.
            if (s.shape != t.shape) if min(s.ndim, t.ndim) >= 2 else (s.size != t.size):
                raise ValueError(f"scores[{i}] has shape {s.shape} but labels[{i}] has shape {t.shape}")
        s = np.concatenate([x.ravel() for x in score_list]).astype(_common_dtype(score_list), copy=False)
        t = np.concatenate([x.ravel() for x in label_list])
    else:
        s = _drop_channel(_score_array(scores, "scores"), 4)
        t = _drop_channel(_binary_array(labels, "labels"), 4)
        if s.shape != t.shape:
            raise ValueError(f"scores have shape {s.shape} but labels have shape {t.shape}")
        s, t = s.ravel(), t.ravel()
    if s.size == 0:
        raise ValueError("no scores given")
    return s, t


def _drop_channel(array: np.ndarray, ndim: int) -> np.ndarray:
    """Drop the singleton channel of a map of ``ndim`` dimensions ([1, H, W] or [N, 1, H, W])."""
    axis = ndim - 3
    return array[(slice(None),) * axis + (0,)] if array.ndim == ndim and array.shape[axis] == 1 else array


def _require_both(n_pos: int, n_neg: int, what: str, unit: str = "samples") -> None:
    if n_pos == 0:
        raise ValueError(f"{what}: there are no anomalous (positive) {unit}; the metric is undefined")
    if n_neg == 0:
        raise ValueError(f"{what}: there are no normal (negative) {unit}; the metric is undefined")


# ----------------------------------------------------------------------------- core computations

def _distinct(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start indices of the runs of equal values in an ascending array, and the run lengths."""
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    return starts, np.diff(np.r_[starts, sorted_values.size])


def _argsort(values: np.ndarray) -> np.ndarray:
    """Ascending argsort (order among ties unspecified).

    For float32 the score bits and the index are packed into one uint64 whose plain sort
    (vectorised in numpy) is about twice as fast as np.argsort.
    """
    if values.dtype != np.float32 or values.size >= 2**32:
        return np.argsort(values)
    bits = values.view(np.uint32).astype(np.uint64)
    # Order-preserving integer image of IEEE floats: flip all bits of negatives, the sign bit of the rest.
    bits = np.where(bits >> np.uint64(31), bits ^ np.uint64(0xFFFFFFFF), bits | np.uint64(0x80000000))
    keys = (bits << np.uint64(32)) | np.arange(values.size, dtype=np.uint64)
    keys.sort()
    return (keys & np.uint64(0xFFFFFFFF)).astype(np.intp)


class _Sweep(NamedTuple):
    """Positive entries grouped by distinct score (ascending) and the negatives around each score."""

    values: np.ndarray  # distinct positive scores, ascending
    weight_sums: np.ndarray  # summed entry weights per distinct score
    counts: np.ndarray  # entries per distinct score
    n_below: np.ndarray  # negatives scoring below each value
    n_equal: np.ndarray  # negatives scoring exactly each value
    n_neg: int


def _sweep(entry_scores: np.ndarray, entry_weights: np.ndarray | None, neg_sorted: np.ndarray) -> _Sweep:
    if entry_weights is None:
        ordered, weights = np.sort(entry_scores), None
    else:
        order = _argsort(entry_scores)
        ordered, weights = entry_scores[order], entry_weights[order]
    starts, counts = _distinct(ordered)
    values = ordered[starts]
    weight_sums = np.add.reduceat(weights, starts) if weights is not None else counts.astype(np.float64)
    # Ascending needles keep the binary searches cache-friendly.
    below = np.searchsorted(neg_sorted, values, side="left")
    equal = np.searchsorted(neg_sorted, values, side="right") - below
    return _Sweep(values, weight_sums, counts, below, equal, neg_sorted.size)


def _auroc_of(sweep: _Sweep) -> float:
    """P(pos > neg) + 0.5 P(pos == neg), counting ties by the sweep's groups."""
    total = np.dot(sweep.counts.astype(np.float64), sweep.n_below + 0.5 * sweep.n_equal)
    return float(total / (sweep.counts.sum(dtype=np.int64) * sweep.n_neg))


def _auroc(pos: np.ndarray, neg_sorted: np.ndarray) -> float:
    return _auroc_of(_sweep(pos, None, neg_sorted))


def _overlap_curve(sweep: _Sweep, n_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact (FPR, overlap) polyline as the threshold sweeps down over all scores.

    Each positive entry carries the overlap its region gains when the threshold falls to
    or below its score; overlap(t) = sum of weights of entries with score >= t / n_regions.
    The curve changes only at the entries' distinct scores t_k; at each one it has a
    corner (FPR(> t_k), overlap(t_{k-1})) and then the point (FPR(>= t_k), overlap(t_k)),
    which is the same polyline as sweeping every distinct pixel score.
    """
    n_neg = sweep.n_neg
    overlap = np.minimum(np.cumsum(sweep.weight_sums[::-1]) / n_regions, 1.0)
    n_ge = n_neg - sweep.n_below[::-1]
    fpr_ge = n_ge / n_neg
    fpr_gt = (n_ge - sweep.n_equal[::-1]) / n_neg
    previous = np.concatenate(([0.0], overlap[:-1]))
    fpr = np.concatenate(([0.0], np.column_stack((fpr_gt, fpr_ge)).ravel(), [1.0]))
    pro = np.concatenate(([0.0], np.column_stack((previous, overlap)).ravel(), [overlap[-1]]))
    return fpr, pro


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under the polyline (x non-decreasing) from x[0] to `limit`, divided by
    `limit`; the last segment is linearly interpolated at `limit` (as the MVTec code does)."""
    inside = int(np.searchsorted(x, limit, side="right"))
    area = float(np.sum((x[1:inside] - x[: inside - 1]) * (y[1:inside] + y[: inside - 1]) / 2.0))
    if inside < x.size and x[inside - 1] < limit:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_limit) / 2.0
    return area / limit


def _check_limit(fpr_limit: float) -> float:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit!r}")
    return float(fpr_limit)


def _region_entries(scores: np.ndarray, saturation: float) -> tuple[np.ndarray, np.ndarray]:
    """Scores of one region's pixels and the overlap each adds, min(k / saturation, 1) stepwise.

    Summed over all pixels with score >= t this gives min(TP(t) / saturation, 1); only the
    order within the region matters, so ties inside it are harmless.
    """
    area = scores.size
    if saturation >= area:  # callers cap it at the area, so every pixel adds 1 / area
        return scores, np.full(area, 1.0 / saturation)
    ranked = np.sort(scores)[::-1]
    gain = np.minimum(np.arange(1, area + 1) / saturation, 1.0)
    return ranked, np.diff(gain, prepend=0.0)


def _pro_inputs(maps: Any, masks: Any) -> tuple[_Sweep, int]:
    map_list, mask_list = _maps_and_masks(maps, masks)
    dtype = _common_dtype(map_list)
    scores, weights, negatives = [], [], []
    n_regions = 0
    for m, g in zip(map_list, mask_list):
        negatives.append(m[~g])
        if not g.any():
            continue
        rows, cols = np.flatnonzero(g.any(axis=1)), np.flatnonzero(g.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))  # label only where defects are
        labels, count = ndimage.label(g[box], structure=_CONNECTIVITY)
        n_regions += count
        region_of_pixel = labels[g[box]]
        area = np.bincount(region_of_pixel, minlength=count + 1)
        scores.append(m[g])
        weights.append(1.0 / area[region_of_pixel])
    _require_both(n_regions, sum(n.size for n in negatives), "aupro", "pixels")
    negatives_all = _sorted_concatenation(negatives, dtype)
    return _sweep(np.concatenate(scores).astype(dtype, copy=False), np.concatenate(weights), negatives_all), n_regions


def _is_saturation(x: Any) -> bool:
    """Whether x can be the saturation threshold of a (mask, saturation) pair: a scalar number or None."""
    if x is None or isinstance(x, (numbers.Number, np.generic)):
        return True
    if isinstance(x, torch.Tensor):
        return x.numel() == 1
    return isinstance(x, np.ndarray) and x.size == 1  # also [1.0]-shaped, as float() took before


def _spro_inputs(maps: Any, region_masks: Any) -> tuple[_Sweep, int]:
    map_list = _map_list(maps, "maps", _score_array)
    if not isinstance(region_masks, Sequence) or len(region_masks) != len(map_list):
        raise ValueError(f"region_masks must be a list with one entry (a list of regions) per map; "
                         f"got {type(region_masks).__name__} of length "
                         f"{len(region_masks) if hasattr(region_masks, '__len__') else '?'} for {len(map_list)} maps")
    dtype = _common_dtype(map_list)
    scores, weights, negatives = [], [], []
    n_regions = 0
    for i, (m, regions) in enumerate(zip(map_list, region_masks)):
        defect = np.zeros(m.shape, dtype=bool)
        for j, region in enumerate(regions):
            where = f"region_masks[{i}][{j}]"
            # A pair only when its second item is a number (or None): a two-row mask
            # given as nested lists is a bare region, not (row, row).
            if isinstance(region, (tuple, list)) and len(region) == 2 and _is_saturation(region[1]):
                mask, saturation = region
            else:
                mask, saturation = region, None
            mask = _binary_array(mask, where)
            if mask.shape != m.shape:
                raise ValueError(f"{where} has shape {mask.shape} but map {i} has shape {m.shape}")
            area = int(mask.sum())
            if area == 0:
                raise ValueError(f"{where} is empty; every region needs at least one pixel")
            if hasattr(saturation, "reshape"):  # a one-element array or tensor
                saturation = saturation.reshape(())
            saturation = float(area if saturation is None else saturation)
            if not saturation > 0:
                raise ValueError(f"{where}: saturation threshold must be positive, got {saturation}")
            # The official LOCO evaluation caps it at the area, so every region can be fully found.
            saturation = min(saturation, float(area))
            entry_scores, entry_weights = _region_entries(m[mask], saturation)
            scores.append(entry_scores)
            weights.append(entry_weights)
            defect |= mask
            n_regions += 1
        negatives.append(m[~defect])
    _require_both(n_regions, sum(n.size for n in negatives), "spro", "pixels")
    negatives_all = _sorted_concatenation(negatives, dtype)
    return _sweep(np.concatenate(scores).astype(dtype, copy=False), np.concatenate(weights), negatives_all), n_regions


def _thin(arrays: tuple[np.ndarray, ...], max_points: int | None) -> tuple[np.ndarray, ...]:
    """Evenly keep at most `max_points` curve points (always the first and last) for plotting."""
    if max_points is None or arrays[0].size <= max_points:
        return arrays
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    keep = np.unique(np.linspace(0, arrays[0].size - 1, max_points).round().astype(np.int64))
    return tuple(a[keep] for a in arrays)


# ----------------------------------------------------------------------------- public metrics

def image_auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of image scores [N] against labels [N] (1 = anomalous)."""
    s, t = _scores_and_labels(scores, labels)
    _require_both(int(t.sum()), int((~t).sum()), "image_auroc")
    return _auroc(s[t], np.sort(s[~t]))


def pixel_auroc(maps: Any, masks: Any) -> float:
    """Area under the ROC curve over all pixels of all maps, against the ground-truth masks."""
    pos, neg = _split_pixels(*_maps_and_masks(maps, masks))
    _require_both(pos.size, neg.size, "pixel_auroc", "pixels")
    neg.sort()
    return _auroc(pos, neg)


def roc_curve(scores: Any, labels: Any, max_points: int | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for scores [N] (or maps, flattened) with thresholds descending.

    A sample is predicted anomalous when its score >= threshold; the first point is (0, 0)
    at threshold +inf. `max_points` thins the arrays evenly for plotting.
    """
    s, t = _scores_and_labels(scores, labels)
    pos, neg = s[t], s[~t]
    _require_both(pos.size, neg.size, "roc_curve")
    thresholds = np.unique(s)[::-1]
    pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)
    tpr = (pos.size - np.searchsorted(pos_sorted, thresholds, side="left")) / pos.size
    fpr = (neg.size - np.searchsorted(neg_sorted, thresholds, side="left")) / neg.size
    curve = (np.concatenate(([0.0], fpr)), np.concatenate(([0.0], tpr)),
             np.concatenate(([np.inf], thresholds.astype(np.float64))))
    return _thin(curve, max_points)


def pro_curve(maps: Any, masks: Any, max_points: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) polyline of the MVTec AD per-region overlap, fpr non-decreasing from 0 to 1."""
    fpr, pro = _overlap_curve(*_pro_inputs(maps, masks))
    return _thin((fpr, pro), max_points)


def pixel_metrics(maps: Any, masks: Any, fpr_limit: float = 0.3) -> dict[str, float]:
    """{"pixel_auroc", "aupro"} together, sharing one sort of the defect-free pixels (about
    half the time of calling both)."""
    limit = _check_limit(fpr_limit)
    sweep, n_regions = _pro_inputs(maps, masks)
    fpr, pro = _overlap_curve(sweep, n_regions)
    # AUPRO's regions partition the defect pixels, so the sweep's counts are the positive pixels.
    return {"pixel_auroc": _auroc_of(sweep), "aupro": _area_up_to(fpr, pro, limit)}


def aupro(maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to `fpr_limit`, divided by `fpr_limit` (MVTec AD AUPRO)."""
    limit = _check_limit(fpr_limit)
    fpr, pro = _overlap_curve(*_pro_inputs(maps, masks))
    return _area_up_to(fpr, pro, limit)


def spro_curve(maps: Any, region_masks: Any, max_points: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, spro) polyline of the MVTec LOCO saturated per-region overlap."""
    fpr, overlap = _overlap_curve(*_spro_inputs(maps, region_masks))
    return _thin((fpr, overlap), max_points)


def spro(maps: Any, region_masks: Any, fpr_limit: float = 0.05) -> float:
    """MVTec LOCO AU-sPRO: area under the saturated PRO curve up to `fpr_limit`, normalised.

    region_masks[i] is a list of (mask bool [H_i, W_i], saturation_threshold_pixels) for map i,
    empty for good images (as `MVTecLOCO.region_masks(i)` returns). An entry is such a pair
    when it is a 2-tuple or 2-list whose second item is a number (or None); anything else is
    a bare mask, which saturates at its area (plain per-region overlap). A saturation above
    the region's area is capped at the area, as in the official LOCO evaluation. False
    positives are pixels outside every region of their image.
    """
    limit = _check_limit(fpr_limit)
    fpr, overlap = _overlap_curve(*_spro_inputs(maps, region_masks))
    return _area_up_to(fpr, overlap, limit)


def f1_max(preds: Any, target: Any, return_threshold: bool = False) -> float | tuple[float, float]:
    """Best F1 score over all thresholds (predicted anomalous when score >= threshold).

    preds/target: image scores [N] with labels [N], or maps with masks (flattened).
    With return_threshold=True returns (f1, threshold).
    """
    s, t = _scores_and_labels(preds, target)
    pos, neg = s[t], s[~t]
    _require_both(pos.size, neg.size, "f1_max")
    neg.sort()
    # Lowering the threshold past a purely negative score only adds false positives, so the
    # best F1 is reached at one of the distinct positive scores.
    sweep = _sweep(pos, None, neg)
    tp = np.cumsum(sweep.counts[::-1])[::-1]
    fp = neg.size - sweep.n_below
    f1 = 2.0 * tp / (tp + fp + pos.size)
    best = int(np.argmax(f1))
    return (float(f1[best]), float(sweep.values[best])) if return_threshold else float(f1[best])


def threshold_from_normal(normal_scores: Any, quantile: float = 0.99) -> float:
    """A decision threshold from normal data only: the `quantile` of their scores (or pixels)."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must lie in (0, 1], got {quantile!r}")
    if isinstance(normal_scores, Sequence) and not isinstance(normal_scores, (str, bytes)) and \
            len(normal_scores) and np.ndim(_to_numpy(normal_scores[0], "normal_scores[0]")) > 0:
        values = np.concatenate([_score_array(s, f"normal_scores[{i}]").ravel()
                                 for i, s in enumerate(normal_scores)])
    else:
        values = _score_array(normal_scores, "normal_scores").ravel()
    if values.size == 0:
        raise ValueError("threshold_from_normal: no normal scores given")
    return float(np.quantile(values.astype(np.float64, copy=False), quantile))


# ----------------------------------------------------------------------------- MVTec LOCO splits

def loco_splits(kinds: Sequence[str]) -> dict[str, np.ndarray]:
    """Index sets MVTec LOCO reports on: "logical" (good + logical), "structural" (good +
    structural) and "all". A kind with no images is left out."""
    kinds_array = np.asarray(list(kinds), dtype=object)
    unknown = sorted(set(kinds_array.tolist()) - {"good", "logical", "structural"})
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; expected 'good', 'logical' or 'structural'")
    good = kinds_array == "good"
    splits = {}
    for kind in ("logical", "structural"):
        if (kinds_array == kind).any():
            splits[kind] = np.flatnonzero(good | (kinds_array == kind))
    splits["all"] = np.arange(kinds_array.size)
    return splits


def evaluate_splits(image_scores: Any, kinds: Sequence[str], maps: Any = None, region_masks: Any = None,
                    fpr_limit: float = 0.05) -> dict[str, dict[str, float | None]]:
    """Image AUROC (and AU-sPRO when maps and region_masks are given) on each LOCO split.

    Labels follow from kinds (good = 0). Image AUROC is None on a split without good or
    without anomalous images (sPRO needs only the normal pixels around the regions). Adds
    "mean": the average of the logical and structural results when both exist (None where
    either is).
    """
    scores = _score_array(image_scores, "image_scores").ravel()
    kinds = list(kinds)
    if scores.size != len(kinds):
        raise ValueError(f"got {scores.size} image scores but {len(kinds)} kinds")
    labels = np.array([k != "good" for k in kinds])
    if maps is not None:
        map_list = _map_list(maps, "maps", _score_array)
        if len(map_list) != len(kinds) or region_masks is None or len(region_masks) != len(kinds):
            raise ValueError("maps and region_masks need one entry per image score")
    results: dict[str, dict[str, float | None]] = {}
    for name, index in loco_splits(kinds).items():
        both = 0 < int(labels[index].sum()) < len(index)
        result = {"image_auroc": image_auroc(scores[index], labels[index]) if both else None}
        if maps is not None:
            result["spro"] = spro([map_list[i] for i in index], [region_masks[i] for i in index], fpr_limit)
        results[name] = result
    if "logical" in results and "structural" in results:
        logical, structural = results["logical"], results["structural"]
        results["mean"] = {key: None if logical[key] is None or structural[key] is None
                           else (logical[key] + structural[key]) / 2.0 for key in logical}
    return results
