"""Write simulated anomalies to PNG files so a person can look at them."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageDraw

from slsg.utils import atomic_path, atomic_write_text, fsync_path

from ..base import list_images
from ..datasets import detect_layout, open_dataset
from ..io import DataError, load_image, resize_image
from .dataset import derive_seed, item_generator
from .presets import SynthesisConfig, get_preset
from .synthesizer import AnomalySynthesizer, Synthesis

__all__ = ["write_examples", "contact_sheet"]

_THUMB = 128
_CAPTION = 16


def _normal_images(data_dir: Path, image_size: int) -> tuple[int, Callable[[int], torch.Tensor], Callable[[int], str]]:
    """(count, load(i) -> [3, S, S], name(i)) for a dataset folder or a plain folder of images."""
    if not data_dir.is_dir():
        raise DataError(f"data folder not found: {data_dir}")
    try:
        layout = detect_layout(data_dir)
        if layout == "folder":  # a plain folder of images: every image is a source, none held out
            paths = list_images(data_dir)
            return (len(paths), lambda i: resize_image(load_image(paths[i]), image_size),
                    lambda i: paths[i].as_posix())
        dataset = open_dataset(data_dir, split="train", image_size=image_size)
    except DataError as layout_error:
        raise DataError(f"no images directly in {data_dir}, and it is not a dataset: {layout_error}") from None
    if len(dataset) == 0:
        raise DataError(f"the train split of {data_dir} has no images")
    return len(dataset), lambda i: dataset[i]["image"], lambda i: str(dataset.samples[i].path)


def _to_pil(x: torch.Tensor) -> Image.Image:
    """float [C, H, W] in [0, 1] (C = 1 or 3) -> 8-bit PIL image."""
    array = (x.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy())
    return Image.fromarray(array[0], mode="L") if array.shape[0] == 1 else Image.fromarray(array.transpose(1, 2, 0))


def _save_png(image: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")  # the temp name has no .png suffix: say the format
    return path


def _overlay(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with the mask tinted red, for the contact sheet."""
    red = torch.tensor([1.0, 0.0, 0.0], dtype=image.dtype).view(3, 1, 1)
    return image * (1 - 0.45 * mask) + red * 0.45 * mask


def contact_sheet(
    rows: list[tuple[torch.Tensor, Synthesis]], captions: list[str], columns: int = 2
) -> Image.Image:
    """Tiles of [normal | source | augmented | mask overlay] with a caption above each tile."""
    tile_w, tile_h = 4 * _THUMB, _THUMB + _CAPTION
    n_rows = max(1, -(-len(rows) // columns))
    sheet = Image.new("RGB", (columns * tile_w, n_rows * tile_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, ((normal, result), caption) in enumerate(zip(rows, captions)):
        x0, y0 = (k % columns) * tile_w, (k // columns) * tile_h
        draw.text((x0 + 3, y0 + 2), caption, fill=(0, 0, 0))
        panels = [normal, result.source, result.image, _overlay(result.image, result.mask)]
        for p, panel in enumerate(panels):
            thumb = _to_pil(panel).convert("RGB").resize((_THUMB, _THUMB), Image.Resampling.BILINEAR)
            sheet.paste(thumb, (x0 + p * _THUMB, y0 + _CAPTION))
    return sheet


def write_examples(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    n: int = 16,
    seed: int = 0,
    textures: str | os.PathLike | None = None,
    preset: str | SynthesisConfig | None = None,
    image_size: int = 256,
) -> list[Path]:
    """Simulate ``n`` anomalies from the normal images of ``data_dir`` and write them as PNGs.

    data_dir: a dataset folder (``open_dataset`` layouts; its train split is used) or
    a plain folder of normal images. For each example k writes ``kkk_normal.png``,
    ``kkk_source.png`` (what was blended in), ``kkk_image.png`` (the simulated
    anomaly) and ``kkk_mask.png`` (0/255); then ``overview.png`` (a contact sheet:
    normal | source | anomaly | mask overlay) and ``examples.json`` (branch, beta,
    operations, input path per example, and the config). Returns the written paths.
    The set replaces a previous one in ``out_dir`` only once complete: a failed or
    interrupted run leaves the previous set as it was.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or not 16 <= image_size <= 8192:
        raise ValueError(f"image_size must be an int in [16, 8192], got {image_size!r}")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    config = preset if isinstance(preset, SynthesisConfig) else get_preset(preset or "default")
    synthesizer = AnomalySynthesizer(config, textures)
    count, load, name = _normal_images(data_dir, image_size)

    order = torch.randperm(count, generator=torch.Generator().manual_seed(derive_seed("examples", seed)))
    previous = _previous_examples(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The new set is written aside and moved in only once complete: a failed or
    # interrupted run leaves the previous set as it was.
    staging = Path(tempfile.mkdtemp(prefix=".slsg-examples-new-", dir=out_dir))
    try:
        names: list[str] = []
        sheet_rows: list[tuple[torch.Tensor, Synthesis]] = []
        captions: list[str] = []
        records = []
        for k in range(n):
            index = int(order[k % count])
            image = load(index)
            generator = item_generator(seed, 0, k)
            other_loader = None
            if count > 1:
                j = int(torch.randint(0, count - 1, (), generator=item_generator(derive_seed("other", seed), 0, k)))
                j += j >= index

                def other_loader(j: int = j) -> torch.Tensor:
                    return load(j)

            result = synthesizer.sample(image, generator, other_normal=other_loader)
            stem = f"{k:03d}"
            for part, picture in (("normal", image), ("source", result.source), ("image", result.image),
                                  ("mask", result.mask)):
                names.append(_save_png(_to_pil(picture), staging / f"{stem}_{part}.png").name)
            area = float(result.mask.mean())
            captions.append(f"{stem} {result.kind} b={result.beta:.2f} area={area:.1%} {'+'.join(result.ops)}")
            sheet_rows.append((image, result))
            records.append({"index": k, "input": name(index), "branch": result.branch, "kind": result.kind,
                            "beta": round(result.beta, 4), "mask_fraction": round(area, 5), "ops": list(result.ops)})
        names.append(_save_png(contact_sheet(sheet_rows, captions), staging / "overview.png").name)
        meta = {"data_dir": str(data_dir), "seed": seed, "image_size": image_size,
                "textures": None if textures is None else str(textures), "config": config.to_dict(),
                "examples": records}
        atomic_write_text(staging / "examples.json", json.dumps(meta, indent=2) + "\n")
        names.append("examples.json")
        _move_into_place(staging, out_dir, names, previous)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out_dir / name for name in names]


def _move_into_place(staging: Path, out_dir: Path, names: list[str], stale: set[Path]) -> None:
    """Move the staged files ``names`` (examples.json last) into ``out_dir``.

    The files they replace, and the ``stale`` ones of a larger previous set, first go to
    a backup folder beside them. If a move fails or is interrupted, every move is undone;
    if even that fails, the backup is kept and the error names it. examples.json goes
    first and comes back last, so it never describes a half-moved set.
    """
    backup = Path(tempfile.mkdtemp(prefix=".slsg-examples-previous-", dir=out_dir))
    old = [out_dir / "examples.json"] + sorted(({out_dir / name for name in names} | stale)
                                               - {out_dir / "examples.json"})
    done: list[tuple[Path, Path]] = []
    try:
        for path in old:
            if os.path.lexists(path):
                os.replace(path, backup / path.name)
                done.append((path, backup / path.name))
        for name in names:
            os.replace(staging / name, out_dir / name)
            done.append((staging / name, out_dir / name))
        fsync_path(out_dir, directory=True)
    except BaseException as error:
        try:
            for source, target in reversed(done):
                os.replace(target, source)
        except OSError as undo_error:
            raise OSError(f"writing the examples into {out_dir} failed ({error!r}) and the previous set "
                          f"could not be put back ({undo_error}); its files are in {backup}") from error
        shutil.rmtree(backup, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _previous_examples(out_dir: Path) -> set[Path]:
    """The example files of a set written here before, as its examples.json names them
    (empty when there is none, or it is not ours: other files are never touched)."""
    try:
        records = json.loads((out_dir / "examples.json").read_text(encoding="utf-8"))["examples"]
        stems = [f"{int(r['index']):03d}" for r in records]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {out_dir / f"{stem}_{part}.png" for stem in stems for part in ("normal", "source", "image", "mask")}
