"""Command line: ``slsg fit | test | predict | download | simulate``.

Bad input (missing folders, unreadable images, unknown options) is reported as one line on
stderr with exit code 2; ``--debug`` shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import glob
import json
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

EXIT_BAD_INPUT = 2


class CliError(ValueError):
    """A problem with what the user asked for."""


# ------------------------------------------------------------------------------------ helpers
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


SPLIT_DEFAULTS = {"train_ratio": 0.8, "split_seed": 0}
SEEDED_LAYOUTS = ("mtd", "folder")  # split into train and test by seed; other layouts come split


def _split_options(args: argparse.Namespace, fitted_with: dict[str, Any] | None) -> dict[str, Any]:
    """--train-ratio and --split-seed: as given, else as the model was fitted with, else the
    defaults. A model's test split must not hold its training images, so values that differ
    from the fitted ones are refused."""
    fitted_with = fitted_with or {}
    options = {}
    for key, default in SPLIT_DEFAULTS.items():
        given, fitted = getattr(args, key), fitted_with.get(key)
        if given is not None and fitted is not None and given != fitted:
            flag = "--" + key.replace("_", "-")
            raise CliError(f"the model was fitted on the split {flag} {fitted}; {flag} {given} would put some of "
                           f"its training images into the test split (leave {flag} out to use {fitted})")
        options[key] = given if given is not None else fitted if fitted is not None else default
    return options


def _dataset_kwargs(path: Path, args: argparse.Namespace, fitted_with: dict[str, Any] | None = None
                    ) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """The layout, the dataset class's kwargs and the split options (None for layouts that come
    split, which ignore them)."""
    from slsg.data import detect_layout

    # --layout, else the one the model was fitted with, else the detected one (open_dataset
    # names a missing folder either way)
    chosen = args.layout or (fitted_with or {}).get("layout")
    layout = chosen if chosen not in (None, "auto") else detect_layout(path)
    kwargs: dict[str, Any] = {}
    split = _split_options(args, fitted_with) if layout in SEEDED_LAYOUTS else None
    if layout == "mtd":
        kwargs = {"train_ratio": split["train_ratio"], "seed": split["split_seed"]}
    elif layout == "folder":
        kwargs = {"abnormal_dir": args.abnormal, "mask_dir": args.masks,
                  "test_normal_ratio": round(1.0 - split["train_ratio"], 10), "seed": split["split_seed"]}
    if layout != "folder" and (args.abnormal or args.masks):
        raise CliError(f"--abnormal and --masks are for a folder of normal images; {path} is a {layout} dataset")
    if layout == "folder" and args.masks and not args.abnormal:
        raise CliError("--masks are the ground truth of the --abnormal images: pass --abnormal too")
    if layout not in SEEDED_LAYOUTS and (args.train_ratio is not None or args.split_seed is not None):
        raise CliError(f"--train-ratio and --split-seed split MTD and folder datasets; {path} is a {layout} dataset, "
                       "which comes split into train and test")
    return layout, kwargs, split


def _dataset_description(path: Path, layout: str, kwargs: dict[str, Any], test, image_size: int,
                         train_images: int | None) -> dict[str, Any]:
    desc: dict[str, Any] = {"name": f"{layout} {path.name}", "path": str(path), "layout": layout,
                            "split": "test", "image_size": image_size, "train_images": train_images,
                            "test_images": len(test), "anomalous_test_images": int(sum(test.labels))}
    if layout == "mtd":
        desc["split_rule"] = (f"seeded {kwargs['train_ratio']:.0%} of MT_Free (seed {kwargs['seed']}) trains; "
                              "the other MT_Free images and all defective images test")
        desc.update(train_ratio=kwargs["train_ratio"], split_seed=kwargs["seed"])
    elif layout == "mvtec-ad":
        desc["split_rule"] = "MVTec AD protocol: train/good trains, test/* tests"
    elif layout == "mvtec-loco":
        desc["split_rule"] = "MVTec LOCO protocol: train/good trains, test/* tests"
    elif layout == "folder":
        desc["split_rule"] = (f"seeded {1 - kwargs['test_normal_ratio']:.0%} of the normal images (seed "
                              f"{kwargs['seed']}) train; the others and the --abnormal images test")
        desc.update(train_ratio=round(1 - kwargs["test_normal_ratio"], 10), split_seed=kwargs["seed"],
                    abnormal_dir=kwargs["abnormal_dir"], mask_dir=kwargs["mask_dir"])
    return desc


def _evaluate_and_report(detector, data: Path, layout: str, kwargs: dict[str, Any], out: Path,
                         args: argparse.Namespace, fit_seconds: float | None) -> dict[str, Any]:
    from slsg.data import open_dataset
    from slsg.detectors.base import config_to_dict
    from slsg.detectors.evaluation import evaluate, measure_throughput
    from slsg.report import write_report

    size = detector.config.image_size
    bit_depth = getattr(detector.config, "bit_depth", None)
    test = open_dataset(data, "test", image_size=detector.dataset_image_size, bit_depth=bit_depth, layout=layout,
                        **kwargs)
    # The same folder as at the fit only: another folder (another line or batch) may reuse names.
    trained_on = set(detector.fit_info.get("train_files") or ()) if _fitted_on(detector, data) else set()
    leaked = [name for name in test.relative_paths() if name in trained_on]
    if leaked:
        raise CliError(f"{len(leaked)} of the {len(test)} test images trained this model (e.g. {leaked[0]}): "
                       f"{data} has changed since the fit, so its seeded split differs; evaluate on the folder as "
                       "it was at the fit, or fit again")
    ev = evaluate(detector, test, batch_size=args.batch_size, num_workers=args.workers,
                  progress=not args.quiet)
    # Model speed at the model's input size (what benchmarks compare), not counting the
    # resizing of a full-resolution image.
    model_input = detector.resize_to_input(test[0]["image"][None])
    timings = {"fit_seconds": fit_seconds,
               "images_per_second_batch1": measure_throughput(detector, model_input, repeats=10, warmup=2),
               "batch1_input_size": list(model_input.shape[-2:])}
    fit_info = detector.fit_info
    train_images = None
    if fit_info:
        train_images = fit_info.get("train_images", 0) + fit_info.get("calibration_images", 0)
    dataset = _dataset_description(data, layout, kwargs, test, size, train_images)
    model = {"detector": detector.kind, "config": config_to_dict(detector.config),
             **{k: v for k, v in fit_info.items()
                if k not in ("fit_seconds", "calibration_indices", "edge_levels", "train_files", "train_root")},
             "threads": torch.get_num_threads()}
    levels = fit_info.get("edge_levels")
    if levels:  # the saved model keeps all of them; the report says how much the edges were discounted
        model["edge_level_max_over_min"] = max(levels) / min(levels)
    doc = write_report(out, ev, dataset, model, timings, heatmaps_per_type=args.heatmaps, bit_depth=bit_depth)
    _print_metrics(doc, out)
    return doc


def _print_metrics(doc: dict[str, Any], out: Path) -> None:
    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else (
            f"{v:.2f}" if isinstance(v, float) else str(v))

    keys = ["image_auroc", "pixel_auroc", "aupro", "f1_max", "fit_seconds", "images_per_second",
            "images_per_second_batch1", "threshold", "tpr_at_threshold", "fpr_at_threshold"]
    for key in keys:
        if key in doc and (doc[key] is not None or key in ("image_auroc", "pixel_auroc", "aupro")):
            print(f"{key:>26}: {fmt(doc[key])}")
    print(f"{'report':>26}: {out / 'report.md'}")


def _write_split(out: Path, train, test_record: dict | None = None) -> None:
    from slsg.utils import atomic_write_text

    record = {"train": train.split_record()}
    if test_record is not None:
        record["test"] = test_record
    atomic_write_text(out / "split.json", json.dumps(record, indent=1, default=str) + "\n")


def _fitted_on(detector, data: Path) -> bool:
    """Whether ``data`` is the folder the model was fitted on (as `slsg fit` records it)."""
    return detector.fit_info.get("train_root") == str(data.resolve())


def _recursive_inputs(layout: str, args: argparse.Namespace) -> tuple:
    """The input folders read with all their sub-folders (a folder of normal images, --abnormal,
    --masks); MVTec and MTD layouts read only their fixed sub-folders."""
    return (args.data, args.abnormal, args.masks) if layout == "folder" else ()


def _out_folder(path: str | Path, inputs: Sequence[str | Path | None] = (), flag: str = "--out",
                nested_ok: bool = False) -> Path:
    """--out as a Path, checked before any work (a problem there would otherwise show only at the
    end). It must not be an input folder, nor lie inside one (unless ``nested_ok``: inputs read
    without their sub-folders): a later run would read what this one writes there (overlays of
    defective images, plots) as data."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CliError(f"{flag} {out} exists and is not a folder")
    if out.is_symlink() and not out.exists():
        raise CliError(f"{flag} {out} is a link to nothing ({out.readlink()})")
    target = out.resolve()
    for item in inputs:
        folder = Path(item).resolve() if item is not None else None
        if folder is None or not folder.is_dir():
            continue
        if target == folder:
            raise CliError(f"{flag} {out} is an input folder: a later run would read the reports and heatmaps "
                           "written there as images; choose another folder")
        if not nested_ok and folder in target.parents:
            raise CliError(f"{flag} {out} lies inside the input folder {item}: a later run would read the "
                           f"reports and heatmaps written there as images; choose a folder outside it")
    # A test write into the folder, or into its nearest existing parent where it will be created
    # (created only when there is something to write).
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise CliError(f"{flag} {out} cannot be created: {existing} is a file")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".slsg-write-check-"):
            pass
    except OSError as exc:
        raise CliError(f"{flag} {out} cannot be written: {exc.strerror or exc}") from exc
    return out


# ------------------------------------------------------------------------------------ commands
def cmd_fit(args: argparse.Namespace) -> int:
    from slsg.data import DataError, open_dataset
    from slsg.detectors import MemoryBankConfig, MemoryBankDetector
    from slsg.report import remove_report_heatmaps

    data = Path(args.data)
    layout, kwargs, split = _dataset_kwargs(data, args)
    out = _out_folder(args.out, _recursive_inputs(layout, args))
    weights = None if args.weights == "none" else args.weights
    config = MemoryBankConfig(backbone=args.backbone, weights=weights, image_size=args.image_size,
                              coreset_ratio=args.coreset_ratio, seed=args.seed, batch_size=args.batch_size,
                              num_workers=args.workers, embed_dim=args.embed_dim, resize=args.resize,
                              bit_depth=args.bit_depth, edge_band=args.edge_band)
    detector = MemoryBankDetector(config, progress=not args.quiet)
    train = open_dataset(data, "train", image_size=detector.dataset_image_size, bit_depth=args.bit_depth,
                         layout=layout, **kwargs)
    # Opened before the fit, so a broken test layout fails in seconds, not after it.
    try:
        test_record = None if args.no_eval else open_dataset(data, "test", image_size=None, layout=layout,
                                                             **kwargs).split_record()
    except DataError as exc:
        if "no images found for split 'test'" not in str(exc):
            raise
        how = (" (a folder of normal images keeps 1 - --train-ratio of them for the test, with any --abnormal "
               "images)" if layout == "folder" else "")
        raise CliError(f"{exc}: nothing to evaluate on{how}; add images, or pass --no-eval to fit only") from exc
    start = time.perf_counter()
    detector.fit(train)
    fit_seconds = time.perf_counter() - start
    if split is not None:  # seeded: `slsg test` must rebuild the same split
        detector.fit_info["split"] = split
    if args.layout not in (None, "auto"):  # chosen, not detected: `slsg test` reads the folder alike
        detector.fit_info["layout"] = layout
    # `slsg test` refuses a test split that holds any of them (the folder changed since the fit).
    detector.fit_info["train_root"], detector.fit_info["train_files"] = str(data.resolve()), train.relative_paths()
    detector.save(out / "model")
    # The evaluation of a model this one replaces would no longer describe the model here.
    remove_report_heatmaps(out / "heatmaps")  # before report.md, which names them in older runs
    for stale in ("metrics.json", "report.md", "roc.png", "pro.png"):
        if (out / stale).is_file():
            (out / stale).unlink()
    print(f"fitted on {len(train)} images in {fit_seconds:.1f} s: memory bank of {len(detector.bank)} patches, "
          f"threshold {detector.image_threshold if detector.image_threshold is None else round(detector.image_threshold, 4)}; "
          f"model saved to {out / 'model'}")
    _write_split(out, train, test_record)
    if not args.no_eval:
        _evaluate_and_report(detector, data, layout, kwargs, out, args, fit_seconds)
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from slsg.detectors import load_detector
    from slsg.detectors.base import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    detector = load_detector(model_dir)
    detector.progress = not args.quiet
    data = Path(args.data)
    # A layout chosen at the fit describes the folder the model was fitted on, not another one.
    fitted_with = {**(detector.fit_info.get("split") or {}),
                   "layout": detector.fit_info.get("layout") if _fitted_on(detector, data) else None}
    layout, kwargs, _ = _dataset_kwargs(data, args, fitted_with)
    out = _out_folder(args.out if args.out else model_dir.parent if model_dir.name == "model" else model_dir,
                      _recursive_inputs(layout, args), flag="--out" if args.out else "the run folder")
    _evaluate_and_report(detector, data, layout, kwargs, out, args, detector.fit_info.get("fit_seconds"))
    return 0


def _expand_images(items: Sequence[str], recursive: bool = False) -> list[Path]:
    from slsg.data.base import list_images

    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = list_images(path, recursive=recursive)
            if not found:
                deeper = 0 if recursive else len(list_images(path, recursive=True))
                hint = f" (its subfolders hold {deeper}; pass --recursive)" if deeper else ""
                raise CliError(f"no image files in folder {path}{hint}")
            paths += found
        elif path.is_file():
            paths.append(path)
        elif any(c in item for c in "*?["):  # a pattern no shell expanded (Windows cmd, PowerShell, quotes)
            matches = sorted(Path(p) for p in glob.glob(item) if Path(p).is_file())
            if not matches:
                raise CliError(f"no file matches {item}")
            paths += matches
        else:
            raise CliError(f"image not found: {path}")
    return paths


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from slsg.data import DataError, load_image
    from slsg.data.io import resize_image
    from slsg.detectors import load_detector
    from slsg.detectors.evaluation import resize_map
    from slsg.report import heat_window, overlay_heatmap, save_png, unique_name
    from slsg.utils import atomic_write_text

    # Non-recursive reads see only a folder's own files: a sub-folder for the output is fine.
    inputs = [item for item in args.images if Path(item).is_dir()]
    out = _out_folder(args.out, inputs, nested_ok=not args.recursive) if args.out else None
    detector = load_detector(args.model)
    paths = _expand_images(args.images, args.recursive)
    size = detector.dataset_image_size
    threshold = detector.image_threshold
    bit_depth = getattr(detector.config, "bit_depth", None)
    records: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    warned_scale = False
    # Input files in the output folder itself (`imgs/*.png --out imgs`): an overlay must not take one's
    # name ("a.png" and "a_heatmap.png" given) and overwrite it.
    target = out.resolve() if out is not None else None
    used_names = {p.name for p in paths if p.parent.resolve() == target} if target is not None else set()
    for start in range(0, len(paths), args.batch_size):
        chunk, originals = [], []
        for path in paths[start:start + args.batch_size]:
            try:
                originals.append(load_image(path, bit_depth))
                chunk.append(path)
            except DataError as exc:  # one unreadable file (a half-copied camera image) must not stop the run
                failed.append({"path": str(path), "error": str(exc)})
                print(f"{path}\tskipped: {exc}", file=sys.stderr)
        if not chunk:
            continue
        warned_scale = warned_scale or _warn_if_far_larger(detector, chunk, originals)
        try:
            scores, maps = detector.predict_each([resize_image(im, size) for im in originals])
        except (RuntimeError, MemoryError) as exc:
            text = str(exc).lower()
            if not isinstance(exc, MemoryError) and not any(
                    sign in text for sign in ("out of memory", "can't allocate memory", "defaultcpuallocator")):
                raise
            largest = max(zip(chunk, originals), key=lambda pair: pair[1].width * pair[1].height)
            raise CliError(f"out of memory scoring {len(chunk)} image(s), the largest {largest[0]} "
                           f"({largest[1].width} x {largest[1].height} px, model input "
                           f"{'x'.join(map(str, detector.input_size(largest[1].height, largest[1].width)))}): "
                           + ("use --batch-size 1, or " if len(chunk) > 1 else "")
                           + "resize such images to the training images' scale") from exc
        for path, original, score, amap in zip(chunk, originals, scores.tolist(), maps):
            verdict = None if threshold is None else bool(score >= threshold)
            records.append({"path": str(path), "score": score, "anomalous": verdict})
            label = "" if verdict is None else ("\tanomalous" if verdict else "\tnormal")
            print(f"{path}\t{score:.4f}{label}")
            if out is not None:
                full = resize_map(amap, (original.height, original.width))
                window = heat_window(threshold, [np.asarray(full)])
                caption = f"{path.name}: score {score:.3g}" + ("" if verdict is None else
                                                               (" -> anomalous" if verdict else " -> normal"))
                name = unique_name(lambda n: f"{path.stem}_heatmap.png" if n == 1 else f"{path.stem}_{n}_heatmap.png",
                                   used_names)
                records[-1]["heatmap"] = name
                save_png(overlay_heatmap(original, full, window, None, threshold, caption), out / name)
    if out is not None:
        atomic_write_text(out / "predictions.json",
                          json.dumps({"model": str(args.model), "threshold": threshold, "predictions": records,
                                      "unreadable": failed}, indent=2) + "\n")
        print(f"heatmaps and predictions.json written to {out}")
    if failed:
        raise CliError(f"{len(failed)} of {len(paths)} images could not be read and were skipped "
                       f"(first: {failed[0]['path']}); the others were scored")
    return 0


def _warn_if_far_larger(detector, paths, images) -> bool:
    """Whether it warned (once per run is enough): an image whose model input has over 16 times
    the pixels of the training images' is scored at full size (keep_aspect scales every image
    alike): slow, memory hungry, and scored on patches at another scale than the memory bank's if
    it shows the product larger."""
    usual = detector.config.image_size ** 2
    for path, image in zip(paths, images):
        h, w = detector.input_size(image.height, image.width)
        if h * w > 16 * usual:
            print(f"warning: {path} becomes a {w} x {h} model input, over 16 times the pixels of the training "
                  f"images' (about {detector.config.image_size} px on the shorter side): expect slow scoring and "
                  "much memory; the model expects images taken like the training images", file=sys.stderr)
            return True
    return False


def cmd_download(args: argparse.Namespace) -> int:
    from slsg.data.download import download

    path = download(args.dataset, args.category, args.root, url=args.url, progress=not args.quiet)
    print(path)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from slsg.data.synthesis import write_examples

    data = Path(args.data)
    if not data.exists():
        raise CliError(f"data folder not found: {data}")
    written = write_examples(data, _out_folder(args.out, (data,)), n=args.n, seed=args.seed, textures=args.textures,
                             preset=args.preset, image_size=args.image_size)
    print(f"wrote {len(written)} files to {args.out}")
    return 0


# ------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    from slsg.backbones import available
    from slsg.data.datasets import LAYOUTS

    parser = argparse.ArgumentParser(prog="slsg", description="Industrial image anomaly detection (SLSG).")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for PyTorch")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    evaluation = argparse.ArgumentParser(add_help=False)
    evaluation.add_argument("--batch-size", type=_positive_int, default=8)
    evaluation.add_argument("--workers", type=_non_negative_int, default=0, help="DataLoader worker processes")
    evaluation.add_argument("--heatmaps", type=_non_negative_int, default=2, help="overlays per defect type in the report")
    evaluation.add_argument("--train-ratio", type=_ratio, default=None,
                            help="MTD or a folder of normal images: share of the normal images that trains "
                                 "(default 0.8; slsg test: the model's)")
    evaluation.add_argument("--split-seed", type=_non_negative_int, default=None,
                            help="MTD or folder: seed of the train/test split (default 0; slsg test: the model's)")
    evaluation.add_argument("--layout", choices=("auto", *LAYOUTS), default=None,
                            help="the dataset's layout instead of the detected one, e.g. 'folder' for normal "
                                 "images kept only in sub-folders (one per day); slsg test: the model's")
    evaluation.add_argument("--abnormal", default=None,
                            help="folder of normal images: a folder of anomalous test images (sub-folders = defect types)")
    evaluation.add_argument("--masks", default=None,
                            help="folder of normal images: ground-truth masks of the --abnormal images, matched by "
                                 "file name (NAME.png or NAME_mask.png)")

    fit = sub.add_parser("fit", parents=[common, evaluation],
                         help="fit the memory-bank detector on a dataset's train split and evaluate it on its test split")
    fit.add_argument("--data", required=True,
                     help="dataset folder (MVTec AD / LOCO category, MTD) or a folder of normal images")
    fit.add_argument("--out", required=True, help="run folder for the model, metrics.json and the report")
    fit.add_argument("--backbone", default="efficientnet_lite2", choices=available(),
                     help="feature extractor (default efficientnet_lite2; efficientnet_lite0 is smaller and faster)")
    fit.add_argument("--weights", default="imagenet", help="'imagenet', a state-dict file, or 'none'")
    fit.add_argument("--image-size", type=_positive_int, default=256,
                     help="model input size: the training images' median shorter side is scaled to it "
                          "(with --resize square, images become SIZE x SIZE)")
    fit.add_argument("--resize", choices=["keep_aspect", "square"], default="keep_aspect",
                     help="keep_aspect: one scale for all images, aspect ratio kept (default); "
                          "square: every image squashed to SIZE x SIZE")
    fit.add_argument("--coreset-ratio", type=_ratio, default=0.1,
                     help="share of training patches kept in the memory bank (default 0.1; 0.01 fits and "
                          "scores several times faster on large training sets)")
    fit.add_argument("--embed-dim", type=_positive_int, default=None)
    fit.add_argument("--edge-band", type=int, default=4, choices=range(0, 33), metavar="{0..32}",
                     help="patches within this many grid cells of an image edge are scored against held-out "
                          "normal images at the same offset from the edges (default 4; 0: off)")
    fit.add_argument("--bit-depth", type=int, default=None, choices=range(8, 17), metavar="{8..16}",
                     help="bits per sample of images wider than 8 bits, e.g. 12 for a 12-bit camera's 16-bit "
                          "files (default: their container's 16); kept with the model")
    fit.add_argument("--seed", type=_non_negative_int, default=0)
    fit.add_argument("--no-eval", action="store_true", help="only fit and save the model")
    fit.set_defaults(func=cmd_fit)

    test = sub.add_parser("test", parents=[common, evaluation], help="evaluate a saved model on a dataset's test split")
    test.add_argument("--model", required=True, help="run folder (or its model/ folder)")
    test.add_argument("--data", required=True)
    test.add_argument("--out", default=None, help="where to write the report (default: the run folder)")
    test.set_defaults(func=cmd_test)

    predict = sub.add_parser("predict", parents=[common], help="score images with a saved model")
    predict.add_argument("--model", required=True)
    predict.add_argument("images", nargs="+", help="image files or folders of images")
    predict.add_argument("--out", default=None, help="folder for heatmap PNGs and predictions.json")
    predict.add_argument("-r", "--recursive", action="store_true",
                         help="also score the images in subfolders of the given folders")
    predict.add_argument("--batch-size", type=_positive_int, default=8)
    predict.set_defaults(func=cmd_predict)

    download = sub.add_parser("download", parents=[common], help="download a dataset category")
    download.add_argument("dataset", choices=["mvtec-ad", "mvtec-loco"])
    download.add_argument("category", help="category name, or 'all'")
    download.add_argument("--root", default="data", help="folder to extract into (default: ./data)")
    download.add_argument("--url", default=None, help="a mirror to download from")
    download.set_defaults(func=cmd_download)

    simulate = sub.add_parser("simulate", parents=[common], help="write examples of simulated anomalies")
    simulate.add_argument("--data", required=True, help="dataset folder or folder of normal images")
    simulate.add_argument("--out", required=True)
    simulate.add_argument("-n", type=_positive_int, default=16, help="number of examples")
    simulate.add_argument("--seed", type=_non_negative_int, default=0)
    simulate.add_argument("--textures", default=None, help="folder of texture images (default: procedural)")
    simulate.add_argument("--preset", default=None, help="synthesis preset or category name")
    simulate.add_argument("--image-size", type=_positive_int, default=256)
    simulate.set_defaults(func=cmd_simulate)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    formatwarning = warnings.formatwarning
    if not args.debug:  # "warning: ..." lines for users, not a source line of slsg under each
        warnings.formatwarning = _one_line_warning
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("slsg: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from slsg.data.download import DownloadError

        if args.debug or not isinstance(exc, (ValueError, OSError, DownloadError)):
            raise
        message = " ".join(worker_message(str(exc)).split()) or type(exc).__name__
        print(f"slsg {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        warnings.formatwarning = formatwarning


def worker_message(text: str) -> str:
    """The original error of a DataLoader worker (torch re-raises it as "Caught X in
    DataLoader worker process N. Original Traceback ...": the last line is the message)."""
    if "in DataLoader worker process" in text and "Original Traceback" in text:
        last = text.strip().splitlines()[-1].strip()  # "package.module.DataError: message"
        match = re.match(r"[A-Za-z_][\w.]*: (.*)", last)
        return match.group(1) if match else last
    return text


if __name__ == "__main__":
    sys.exit(main())
