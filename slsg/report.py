"""Reports of an evaluation run: metrics.json, report.md, ROC / PRO curves and heatmap overlays.

RUN_DIR/
    metrics.json    metrics as fractions (image_auroc, pixel_auroc, aupro, f1_max, ...), timings,
                    the dataset/split description and the model configuration
    report.md       the same as Markdown tables, linking the figures
    roc.png         image-level and pixel-level ROC curves
    pro.png         per-region overlap curve (AUPRO integrates it up to FPR 0.3)
    heatmaps/       overlays of test images: ground truth outlined (left), anomaly map with the
                    thresholded prediction outlined (right)
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from scipy import ndimage  # noqa: E402

from slsg import metrics as M  # noqa: E402
from slsg.data import load_image  # noqa: E402
from slsg.detectors.evaluation import Evaluation  # noqa: E402
from slsg.utils import atomic_path, atomic_write_text  # noqa: E402

HEADLINE = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
MAX_SIDE = 512  # heatmap overlays are drawn at most this large
PIXEL_ROC_POINTS = 2_000_000  # pixels drawn in the pixel ROC plot (the AUROC itself uses all pixels)


def build_metrics(evaluation: Evaluation, dataset: dict[str, Any], model: dict[str, Any] | None = None,
                  timings: dict[str, float] | None = None) -> dict[str, Any]:
    """The metrics.json document: headline metrics (fractions), timings, dataset and model."""
    m = dict(evaluation.metrics)
    doc: dict[str, Any] = {key: m.pop(key, None) for key in HEADLINE}
    doc["fit_seconds"] = (timings or {}).get("fit_seconds")
    doc["images_per_second"] = evaluation.images_per_second
    doc.update({k: v for k, v in (timings or {}).items() if k != "fit_seconds"})
    doc["evaluation_seconds"] = evaluation.total_seconds
    doc.update(m)
    doc["pixel_metrics_at"] = "original image resolution"
    doc["dataset"] = dataset
    if model is not None:
        doc["model"] = model
    return doc


def write_report(run_dir: str | os.PathLike, evaluation: Evaluation, dataset: dict[str, Any],
                 model: dict[str, Any] | None = None, timings: dict[str, float] | None = None,
                 heatmaps_per_type: int = 2, bit_depth: int | None = None) -> dict[str, Any]:
    """Write metrics.json, report.md, roc.png, pro.png and heatmaps/ into ``run_dir``; return the metrics.
    ``bit_depth``: how the test images were read (slsg.data.load_image), for the overlays."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    doc = build_metrics(evaluation, dataset, model, timings)
    atomic_write_text(run_dir / "metrics.json", json.dumps(_jsonable(doc), indent=2) + "\n")
    figures = []
    if plot_roc(evaluation, run_dir / "roc.png"):
        figures.append("roc.png")
    if plot_pro(evaluation, run_dir / "pro.png"):
        figures.append("pro.png")
    heatmaps = write_heatmaps(evaluation, run_dir / "heatmaps", per_type=heatmaps_per_type, bit_depth=bit_depth)
    atomic_write_text(run_dir / "report.md", markdown_report(doc, figures, [h.relative_to(run_dir) for h in heatmaps]))
    return doc


# ---------------------------------------------------------------------------------------- Markdown
def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_report(doc: dict[str, Any], figures: list[str], heatmaps: list[Path]) -> str:
    ds = doc.get("dataset", {})
    lines = [f"# Evaluation: {ds.get('name', ds.get('path', 'dataset'))}", ""]
    lines += ["| metric | value |", "|---|---|"]
    for key in HEADLINE:
        lines.append(f"| {key} | {_fmt(doc.get(key))} |")
    for key in ("fit_seconds", "images_per_second", "images_per_second_batch1", "batch1_input_size",
                "evaluation_seconds",
                "threshold", "tpr_at_threshold", "fpr_at_threshold"):
        if doc.get(key) is not None:
            lines.append(f"| {key} | {_fmt(doc[key])} |")
    lines.append("")
    lines.append("AUROC, AUPRO (integrated to FPR 0.3, normalised) and F1-max are fractions; pixel metrics "
                 "are computed at each image's original resolution. The threshold comes from held-out "
                 "normal training images only.")
    by_defect = doc.get("image_auroc_by_defect")
    if by_defect:
        lines += ["", "## Image AUROC per defect type (good + that type)", "", "| defect | image AUROC |", "|---|---|"]
        lines += [f"| {name} | {_fmt(value)} |" for name, value in by_defect.items()]
    if doc.get("loco"):
        lines += ["", "## MVTec LOCO splits", "", "| split | image AUROC | AU-sPRO (FPR 0.05) |", "|---|---|---|"]
        for name, values in doc["loco"].items():
            lines.append(f"| {name} | {_fmt(values.get('image_auroc'))} | {_fmt(values.get('spro'))} |")
    lines += ["", "## Data", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in ds.items() if not isinstance(v, (list, dict))]
    model = doc.get("model")
    if model:
        lines += ["", "## Model", "", "| key | value |", "|---|---|"]
        flat = {**{k: v for k, v in model.items() if k != "config"}, **model.get("config", {})}
        lines += [f"| {k} | {_fmt(v)} |" for k, v in flat.items() if not isinstance(v, dict)]
    if figures:
        lines += ["", "## Curves", ""] + [f"![{f}]({f})" for f in figures]
    if heatmaps:
        lines += ["", "## Heatmaps", "", "Left: ground truth outlined in green. Right: anomaly map, "
                  "prediction (map >= threshold) outlined in white.", ""]
        lines += [f"![{h.stem}]({h.as_posix()})" for h in heatmaps]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- curves
def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_roc(ev: Evaluation, path: Path) -> bool:
    """Image and pixel ROC curves; False (nothing written) if neither is defined."""
    curves = []
    if 0 < ev.labels.sum() < len(ev.labels):
        fpr, tpr, _ = M.roc_curve(ev.scores, ev.labels)
        curves.append((fpr, tpr, f"image (AUROC {ev.metrics.get('image_auroc') or float('nan'):.3f})"))
    pixel_values, pixel_labels = _pixel_sample(ev)
    if pixel_values is not None:
        fpr, tpr, _ = M.roc_curve(pixel_values, pixel_labels, max_points=2000)
        curves.append((fpr, tpr, f"pixel (AUROC {ev.metrics.get('pixel_auroc') or float('nan'):.3f})"))
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(5, 5))
    for fpr, tpr, label in curves:
        ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01), title="ROC")
    ax.legend(loc="lower right")
    _save_figure(fig, path)
    return True


def _pixel_sample(ev: Evaluation) -> tuple[np.ndarray | None, np.ndarray | None]:
    """An evenly strided subset of all pixels, enough to draw the pixel ROC curve."""
    total = sum(m.size for m in ev.maps)
    if not any(m.any() for m in ev.masks):
        return None, None
    step = max(1, math.ceil(total / PIXEL_ROC_POINTS))
    values = np.concatenate([m.ravel()[::step] for m in ev.maps])
    labels = np.concatenate([m.ravel()[::step] for m in ev.masks])
    if labels.all() or not labels.any():
        return None, None
    return values, labels


def plot_pro(ev: Evaluation, path: Path, fpr_limit: float = 0.3) -> bool:
    if not any(m.any() for m in ev.masks):
        return False
    fpr, pro = M.pro_curve(ev.maps, ev.masks, max_points=4000)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, pro, label=f"PRO (AUPRO@{fpr_limit} {ev.metrics.get('aupro') or float('nan'):.3f})")
    ax.axvline(fpr_limit, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="per-region overlap", xlim=(0, 1), ylim=(0, 1.01),
           title="PRO curve")
    ax.legend(loc="lower right")
    _save_figure(fig, path)
    return True


# ---------------------------------------------------------------------------------------- heatmaps
def heat_window(threshold: float | None, maps: list[np.ndarray] | np.ndarray) -> tuple[float, float]:
    """The map values shown from transparent-blue to red.

    With a threshold the window is [0.5, 1.5] x threshold, so the threshold sits at the middle of the
    colour scale and different images (and runs) are comparable. Without one, the range of ``maps``.
    """
    if threshold is not None and threshold > 0:
        return 0.5 * threshold, 1.5 * threshold
    lo = float(min(np.min(m) for m in maps))
    hi = float(max(np.max(m) for m in maps))
    return lo, hi if hi > lo else lo + 1.0


def _outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    edge = mask & ~ndimage.binary_erosion(mask, iterations=1, border_value=0)
    return ndimage.binary_dilation(edge, iterations=max(0, width - 1)) if width > 1 else edge


def overlay_heatmap(image: Image.Image, amap: np.ndarray, window: tuple[float, float],
                    mask: np.ndarray | None = None, threshold: float | None = None,
                    caption: str | None = None, max_side: int = MAX_SIDE) -> Image.Image:
    """Side-by-side panel: the image with the ground truth outlined (green), and the anomaly map
    blended over the image with the region map >= threshold outlined (white)."""
    scale = min(1.0, max_side / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    base = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255
    heat_map = np.asarray(Image.fromarray(np.asarray(amap, dtype=np.float32), mode="F")
                          .resize(size, Image.Resampling.BILINEAR))
    lo, hi = window
    level = np.clip((heat_map - lo) / (hi - lo), 0.0, 1.0)
    colours = matplotlib.colormaps["jet"](level)[..., :3]
    alpha = 0.25 + 0.45 * level[..., None]  # low scores let the image show through
    heat = base * (1 - alpha) + colours * alpha
    left = base.copy()
    if mask is not None and mask.any():
        small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 127
        left[_outline(small)] = (0.0, 1.0, 0.0)
    if threshold is not None:
        heat[_outline(heat_map >= threshold)] = (1.0, 1.0, 1.0)
    panel = np.concatenate([left, np.ones((size[1], 4, 3), np.float32), heat], axis=1)
    out = Image.fromarray((panel * 255).round().astype(np.uint8))
    if caption:
        bar = Image.new("RGB", (out.width, 18), "black")
        ImageDraw.Draw(bar).text((4, 3), caption, fill="white")
        framed = Image.new("RGB", (out.width, out.height + bar.height))
        framed.paste(out, (0, 0))
        framed.paste(bar, (0, out.height))
        out = framed
    return out


def save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def unique_name(name_for: Callable[[int], str], used: set[str]) -> str:
    """``name_for(1)``, or ``name_for(2)``, ``name_for(3)``, ... when taken (the same file name in
    two folders); the name returned is added to ``used``."""
    n = 1
    while name_for(n) in used:
        n += 1
    used.add(name_for(n))
    return name_for(n)


# Names of the overlays a report wrote into its heatmaps folder: the next report there removes
# those and nothing else (a user's own images there, e.g. slsg predict's, stay).
HEATMAP_MANIFEST = ".slsg-report-heatmaps.json"


def remove_report_heatmaps(directory: Path) -> None:
    """Remove the overlays an earlier report wrote into ``directory``, as its manifest names them
    (reports older than the manifest: as the run's report.md links them)."""
    manifest = directory / HEATMAP_MANIFEST
    try:
        names = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        try:
            report = (directory.parent / "report.md").read_text()
        except OSError:
            return
        names = re.findall(rf"\]\({re.escape(directory.name)}/([^/)]+\.png)\)", report)
    for name in names if isinstance(names, list) else ():
        # plain .png names inside the folder only: a tampered manifest must not reach out
        if isinstance(name, str) and name.endswith(".png") and Path(name).name == name:
            (directory / name).unlink(missing_ok=True)
    manifest.unlink(missing_ok=True)


def write_heatmaps(ev: Evaluation, directory: Path, per_type: int = 2, bit_depth: int | None = None) -> list[Path]:
    """Overlays of the first ``per_type`` test images of each defect type (and of the good ones).
    Overlays of an earlier report there are replaced; other files are left alone."""
    remove_report_heatmaps(directory)
    if per_type <= 0:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    chosen: dict[str, list[int]] = {}
    for i, defect in enumerate(ev.defect_types):
        if len(chosen.setdefault(defect or "unknown", [])) < per_type:
            chosen[defect or "unknown"].append(i)
    window = heat_window(ev.threshold, ev.maps)
    written = []
    used = {p.name for p in directory.iterdir()}  # never overwrite a file that is not the report's
    for defect, indices in chosen.items():
        for i in indices:
            path = Path(ev.paths[i])
            verdict = ""
            if ev.threshold is not None:
                verdict = " -> anomalous" if ev.scores[i] >= ev.threshold else " -> normal"
            caption = f"{defect} {path.name}: score {ev.scores[i]:.3g}{verdict}"
            panel = overlay_heatmap(load_image(path, bit_depth), ev.maps[i], window, ev.masks[i], ev.threshold, caption)
            base = f"{_safe(defect)}_{_safe(path.stem)}"
            out = directory / unique_name(lambda n: f"{base}.png" if n == 1 else f"{base}_{n}.png", used)
            save_png(panel, out)
            written.append(out)
            # After each overlay: a report stopped partway still names what it wrote.
            atomic_write_text(directory / HEATMAP_MANIFEST, json.dumps({"files": [w.name for w in written]}) + "\n")
    return written


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value
