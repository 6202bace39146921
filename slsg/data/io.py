"""Reading images and masks from disk into one consistent representation.

Every image, whatever its file mode (L, P, RGBA, CMYK, 16-bit I;16 / I, 32-bit F),
becomes an 8-bit RGB PIL image; every ground-truth mask becomes a bool array.
Integer images of more than 8 bits are scaled by their container's range (0-65535), or by
``2**bit_depth - 1`` when the caller says how many bits the camera delivers: a 12-bit camera
writes 16-bit files whose values stay below 4096, which the container's scale would turn
nearly black (16 grey levels after the conversion to 8 bits).
Anything unreadable raises `DataError` naming the file, never a bare PIL error.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".tif", ".tiff", ".webp",
                              ".pgm", ".ppm", ".pbm", ".pnm", ".gif"})

# PIL modes holding more than 8 bits per sample; PIL's own convert("RGB") clips
# them at 255 instead of scaling, which would turn most 16-bit images white.
_WIDE_INT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


class DataError(ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


def is_image_file(path: Path, must_exist: bool = True) -> bool:
    """Whether `path` names an image (by extension; hidden files such as macOS's ._x.png are
    not), and with `must_exist`, is a file."""
    return ((not must_exist or path.is_file()) and path.suffix.lower() in IMAGE_EXTENSIONS
            and not path.name.startswith("."))


def _open(path: str | os.PathLike) -> Image.Image:
    path = Path(path)
    if not path.exists():
        raise DataError(f"file not found: {path}")
    if not path.is_file():
        raise DataError(f"not a regular file: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"cannot read image file {path}: the file is empty")
    try:
        with _no_pixel_limit():
            image = Image.open(path)
            orientation = _header_orientation(image)
            image.load()  # decode now: truncated or corrupt files fail here, not later
            # As viewers and annotation tools show it (a camera's orientation tag), so that
            # masks drawn on the displayed image line up.
            if orientation != 1:
                image = ImageOps.exif_transpose(image)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise DataError(f"cannot read image file {path}: {type(exc).__name__}: {exc}") from exc
    if image.width == 0 or image.height == 0:
        raise DataError(f"image has zero size: {path}")
    return image


@contextlib.contextmanager
def _no_pixel_limit():
    """PIL refuses images over 179 megapixels as possible decompression bombs; line-scan and
    large-format inspection cameras deliver such images, and these files are the user's own."""
    with _PIXEL_LIMIT_LOCK:  # PIL's limit is global: threads must not restore it under each other
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = limit


_PIXEL_LIMIT_LOCK = threading.RLock()


# EXIF orientations that swap width and height (transpose, rotations by 90 or 270 degrees).
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def _header_orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened, not yet decoded image, from what precedes its pixels.
    A PNG's own getexif decodes the image to look for an eXIf chunk after the pixels (rare):
    that made every header-size read (image_size_of) decode its PNG, so PNGs are asked through
    the base class, which reads the chunks already seen (eXIf, text profiles, XMP)."""
    exif = Image.Image.getexif(image) if image.format == "PNG" else image.getexif()
    return exif.get(ExifTags.Base.Orientation, 1)


BIT_DEPTHS = range(8, 17)
_warned_wide_range = False


def check_bit_depth(bit_depth: int | None) -> int | None:
    if bit_depth is not None and (isinstance(bit_depth, bool) or not isinstance(bit_depth, int)
                                  or bit_depth not in BIT_DEPTHS):
        raise ValueError(f"bit_depth must be None or an int from 8 to 16, got {bit_depth!r}")
    return bit_depth


def _wide_to_unit(array: np.ndarray, mode: str, bit_depth: int | None = None) -> np.ndarray:
    """Scale a >8-bit grayscale array to [0, 1] floats."""
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError("it holds NaN or infinite values")
    low, peak = array.min(initial=0.0), array.max(initial=0.0)
    if mode == "F":
        # Float images carry no declared range: [0, 1] when they fit, else 8-bit values, each
        # with 0.1% of slack for rounding in processing pipelines (clipped). Others (height maps,
        # temperatures) have no meaning as intensities here: clipping them would turn them white
        # or black.
        top = 1.0 if peak <= 1.001 else 255.0
        if low < -0.001 * top or peak > 1.001 * top:
            raise ValueError(f"a float image's values must lie in [0, 1] or [0, 255], these span "
                             f"[{low:.6g}, {peak:.6g}]: scale it to one of them")
        return np.clip(array / top, 0.0, 1.0)
    if low < 0:
        raise ValueError(f"a {mode} image with negative values (down to {low:.0f}) is not an intensity "
                         "image: scale it to 0-65535")
    if bit_depth is None:
        if peak > 65535:
            raise ValueError(f"a {mode} image with values up to {peak:.0f} exceeds the 16-bit range 0-65535: "
                             "scale it to 16 bits")
        return np.clip(array / 65535.0, 0.0, 1.0)
    top = float(2 ** bit_depth - 1)
    if peak > top:
        raise ValueError(f"values up to {peak:.0f} exceed the {bit_depth}-bit range 0-{top:.0f} "
                         f"(bit_depth={bit_depth}); pass the camera's real bit depth")
    return np.clip(array / top, 0.0, 1.0)  # mode I is signed


def to_rgb(image: Image.Image, bit_depth: int | None = None) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB (alpha is dropped, not composited).
    ``bit_depth`` applies to integer images of more than 8 bits only (see the module notes)."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_INT_MODES or image.mode == "F":
        unit = _wide_to_unit(np.asarray(image), image.mode, bit_depth)
        return Image.fromarray(np.round(unit * 255.0).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids PIL's warning about palette transparency
    return image.convert("RGB")


def _warn_if_narrow(image: Image.Image, path: str | os.PathLike) -> None:
    """Once per process: a wide integer image read on the 16-bit scale whose values would fit a
    smaller camera bit depth (the usual sign of a 10/12/14-bit camera) looks almost black."""
    global _warned_wide_range
    if _warned_wide_range:
        return
    peak = int(np.asarray(image).max(initial=0))
    bits = next((b for b in (8, 10, 12, 14) if 0 < peak < 2 ** b), None)
    if bits is not None:
        _warned_wide_range = True
        warnings.warn(f"{path}: a {image.mode} image whose values stay below {2 ** bits} (up to {peak}) is read "
                      f"on the 16-bit scale 0-65535, so it looks almost black; if the camera delivers {bits} bits, "
                      f"pass bit_depth={bits} (slsg fit --bit-depth {bits})", stacklevel=3)


def load_image(path: str | os.PathLike, bit_depth: int | None = None) -> Image.Image:
    """Load any supported image file as an 8-bit RGB PIL image. ``bit_depth``: the bits per
    sample of integer images wider than 8 bits (None: their container's 16)."""
    check_bit_depth(bit_depth)
    image = _open(path)
    try:
        rgb = to_rgb(image, bit_depth)
    except Exception as exc:
        raise DataError(f"cannot convert image {path} (mode {image.mode}) to RGB: {exc}") from exc
    if bit_depth is None and image.mode in _WIDE_INT_MODES:
        _warn_if_narrow(image, path)
    return rgb


def _single_channel(image: Image.Image, path: str | os.PathLike) -> np.ndarray:
    if image.mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("L")
    elif image.mode in ("LA", "PA"):
        image = image.getchannel(0)
    array = np.asarray(image)
    if array.ndim != 2:
        raise DataError(f"mask {path} is not single-channel (mode {image.mode}, shape {array.shape})")
    return array


def load_mask_values(path: str | os.PathLike) -> np.ndarray:
    """Raw values of a single-channel mask file ([H, W]); MVTec LOCO encodes defect ids this way.

    Palette images give their palette indices, colour images their luminance.
    """
    array = _single_channel(_open(path), path)
    return array.astype(np.uint8) if array.dtype == bool else array


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Load a ground-truth mask as bool [H, W].

    8-bit masks are thresholded at 128 (MTD masks have soft edges); masks whose
    values are only 0/1 count any nonzero pixel; 16-bit masks are thresholded at
    the same relative level (128 * 257), unless all their values fit in 8 bits,
    in which case they hold 8-bit values in a wider container and use 128.
    Float masks use 0.5 when they lie in [0, 1], else 128. Palette masks use
    their palette index when it is 0/1, else their luminance.
    """
    image = _open(path)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"))
        if not rgba[..., :3].any() and rgba[..., 3].min() != rgba[..., 3].max():
            # Black everywhere, the defect drawn in the alpha channel (transparent background):
            # the alpha channel is the mask.
            return rgba[..., 3] >= 128
    if image.mode == "P":
        index = np.asarray(image)
        if index.max(initial=0) <= 1:
            return index > 0
        image = image.convert("L")
    mode = image.mode
    values = _single_channel(image, path)
    if values.dtype == bool:
        return values.copy()
    peak = values.max(initial=0)
    if mode == "F":
        threshold = 0.5 if peak <= 1.0 else 128.0
    elif peak <= 1:
        return values > 0
    elif mode in _WIDE_INT_MODES and peak > 255:
        threshold = 128 * 257
    else:
        threshold = 128
    mask = values >= threshold
    if peak > 0 and not mask.any():
        # Marked pixels that all fall below the threshold (a red mask has luminance 76, a
        # 12-bit mask in a 16-bit file peaks at 4095): an empty mask here would silently
        # drop the defect from the pixel metrics.
        raise DataError(f"mask {path} has marked pixels (up to {peak}) but none reach the threshold "
                        f"{threshold} that separates defect from background; save masks as 0/255 "
                        f"grayscale (or 0/1)")
    return mask


def resize_image(image: Image.Image, size: int | tuple[int, int] | None) -> torch.Tensor:
    """RGB PIL image -> float32 tensor [3, H, W] in [0, 1], bilinear-resized to `size` (None keeps it)."""
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        if (image.height, image.width) != (height, width):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int] | None) -> torch.Tensor:
    """bool [H, W] -> float32 tensor [1, h, w] in {0, 1}, nearest-resized to `size` (None keeps it)."""
    image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        if (image.height, image.width) != (height, width):
            image = image.resize((width, height), Image.Resampling.NEAREST)
    array = np.asarray(image) > 127
    return torch.from_numpy(array.astype(np.float32))[None]


def image_size_of(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image file, reading only its header."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        with _no_pixel_limit(), Image.open(path) as image:
            width, height = image.size
            orientation, tiff = _header_orientation(image), image.format == "TIFF"
    except Exception as exc:
        raise DataError(f"cannot read image header of {path}: {type(exc).__name__}: {exc}") from exc
    if orientation != 1 and tiff:
        # Pillow orients TIFFs itself, in its header size and, depending on the mode and the
        # compression, in the pixels: only the loaded image tells.
        width, height = _open(path).size
    elif orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width  # as _open turns it
    return height, width
