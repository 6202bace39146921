"""load_image / load_mask: every file mode ends up in one representation; bad files raise DataError."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from slsg.data import DataError, load_image, load_mask, load_mask_values
from slsg.data.io import resize_image, resize_mask


def _save(tmp_path, name, image):
    path = tmp_path / name
    image.save(path)
    return path


def test_rgb_roundtrip_is_exact(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    image = load_image(_save(tmp_path, "a.png", Image.fromarray(array)))
    assert image.mode == "RGB" and image.size == (5, 7)
    np.testing.assert_array_equal(np.asarray(image), array)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    rgb = np.asarray(load_image(_save(tmp_path, "g.png", Image.fromarray(gray, mode="L"))))
    assert rgb.shape == (5, 7, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray)


def test_rgba_drops_alpha(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (4, 6, 4), dtype=np.uint8)
    array[..., 3] = 0  # fully transparent: colour values must survive unchanged
    rgb = np.asarray(load_image(_save(tmp_path, "a.png", Image.fromarray(array, mode="RGBA"))))
    np.testing.assert_array_equal(rgb, array[..., :3])


def test_palette_uses_palette_colours(tmp_path):
    image = Image.new("P", (3, 2))
    image.putpalette([0, 0, 0, 200, 10, 30] + [0] * 762)
    image.putpixel((1, 1), 1)
    rgb = np.asarray(load_image(_save(tmp_path, "p.png", image)))
    assert rgb[1, 1].tolist() == [200, 10, 30] and rgb[0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_is_scaled_not_clipped(tmp_path, mode):
    values = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16)
    if mode == "I;16":
        image = Image.fromarray(values)  # PIL picks I;16 for uint16
    else:
        image = Image.fromarray(values.astype(np.int32), mode="I")
    assert image.mode == mode
    path = _save(tmp_path, f"w{mode[-2:]}.png" if mode != "I" else "w.tif", image)
    rgb = np.asarray(load_image(path))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 64, 128, 255])
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_float_image(tmp_path):
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    rgb = np.asarray(load_image(_save(tmp_path, "f.tif", Image.fromarray(values, mode="F"))))
    np.testing.assert_array_equal(rgb[0, :, 1], [0, 128, 255])


@pytest.mark.parametrize("values,match", [
    (np.array([[0.0, 30000.0, 65535.0]]), r"float image's values must lie in \[0, 1\] or \[0, 255\], these span \[0, 65535\]"),
    (np.array([[-1.0, 0.0, 1.0]]), r"span \[-1, 1\]"),
    (np.array([[0.0, 100.0, 256.0]]), r"span \[0, 256\]"),
    (np.array([[0.0, np.nan, 1.0]]), "NaN or infinite"),
])
def test_float_image_outside_an_intensity_range_is_an_error(tmp_path, values, match):
    # Clipped, a height map in millimetres became all white and one NaN made an image near black.
    path = _save(tmp_path, "f.tif", Image.fromarray(values.astype(np.float32), mode="F"))
    with pytest.raises(DataError, match=f"f.tif .*{match}"):
        load_image(path)
    assert np.asarray(load_image(_save(tmp_path, "ok.tif", Image.fromarray(
        np.array([[0.0, 127.5, 255.0]], dtype=np.float32), mode="F"))))[0, :, 0].tolist() == [0, 128, 255]
    # a processing pipeline's rounding just outside the range is clipped, not refused
    assert np.asarray(load_image(_save(tmp_path, "slack.tif", Image.fromarray(
        np.array([[-1e-7, 0.5, 1.0000005]], dtype=np.float32), mode="F"))))[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("values,match", [(np.array([[-1000, 0, 1000]]), "negative values"),
                                          (np.array([[0, 1, 1_000_000]]), "exceeds the 16-bit range")])
def test_thirty_two_bit_integer_image_outside_sixteen_bits_is_an_error(tmp_path, values, match):
    path = _save(tmp_path, "i.tif", Image.fromarray(values.astype(np.int32), mode="I"))
    with pytest.raises(DataError, match=f"i.tif .*{match}"):
        load_image(path)


@pytest.mark.parametrize("mode,compression", [("RGB", None), ("L", None), ("L", "tiff_lzw"), ("RGB", "tiff_lzw")])
def test_oriented_tiff_header_size_matches_the_loaded_image(tmp_path, mode, compression):
    # Pillow orients TIFFs itself, in its header size and (by mode and compression) in the pixels.
    from slsg.data.io import image_size_of

    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "r.tiff"
    array = np.zeros((20, 30, 3) if mode == "RGB" else (20, 30), dtype=np.uint8)
    Image.fromarray(array).save(path, exif=exif, **({"compression": compression} if compression else {}))
    assert image_size_of(path) == load_image(path).size[::-1]


def test_header_size_decodes_no_png(tmp_path, monkeypatch):
    # Reading the EXIF orientation of a PNG makes Pillow decode it (an eXIf chunk may follow the
    # pixels): that cost 40% of a fit's time on MVTec bottle.
    from PIL import PngImagePlugin

    from slsg.data.io import image_size_of

    path = _save(tmp_path, "a.png", Image.new("RGB", (30, 20)))

    def no_decoding(self):
        raise AssertionError("decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    assert image_size_of(path) == (20, 30)


def test_exif_orientation_is_applied_to_pixels_and_header_size(tmp_path):
    from slsg.data.io import image_size_of

    array = np.zeros((20, 30, 3), dtype=np.uint8)  # 30 wide, 20 high as stored
    array[:5, :5] = 255  # a marked top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(array).save(path, exif=exif, quality=100)
    image = np.asarray(load_image(path))
    assert image.shape == (30, 20, 3) and image_size_of(path) == (30, 20)
    assert image[:5, -5:].mean() > 200 and image[-5:, :5].mean() < 50  # the corner is now top-right
    plain = _save(tmp_path, "plain.jpg", Image.fromarray(array))
    assert np.asarray(load_image(plain)).shape == (20, 30, 3) and image_size_of(plain) == (20, 30)


def test_empty_file_says_so_and_large_images_are_not_refused(tmp_path, monkeypatch):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty.png: the file is empty"):
        load_image(tmp_path / "empty.png")
    # PIL refuses images over twice its MAX_IMAGE_PIXELS as decompression bombs (179 megapixels by
    # default: line-scan camera images reach that); a small limit stands in for a large image.
    from slsg.data.io import image_size_of

    path = _save(tmp_path, "big.png", Image.new("L", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_image(path).size == (100, 100) and image_size_of(path) == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000  # the limit is restored afterwards


@pytest.mark.parametrize("mode", ["1", "LA", "CMYK"])
def test_other_modes_become_rgb(tmp_path, mode):
    image = Image.new(mode, (4, 3))
    path = _save(tmp_path, "x.tif" if mode == "CMYK" else "x.png", image)
    assert load_image(path).mode == "RGB"


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.png"):
        load_image(tmp_path / "nope.png")


def test_corrupt_and_truncated_files_name_the_path(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match="garbage.png"):
        load_image(garbage)
    full = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(full.read_bytes()[:300])
    with pytest.raises(DataError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(DataError, match="truncated.png"):
        load_mask(truncated)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(DataError, match="not a regular file"):
        load_image(tmp_path)


def test_mask_8bit_threshold_at_128(tmp_path):
    values = np.array([[0, 1, 127, 128, 200, 255]], dtype=np.uint8)
    mask = load_mask(_save(tmp_path, "m.png", Image.fromarray(values, mode="L")))
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask[0], [False, False, False, True, True, True])


def test_mask_zero_one_counts_any_nonzero(tmp_path):
    values = np.array([[0, 1, 1, 0]], dtype=np.uint8)
    mask = load_mask(_save(tmp_path, "m.png", Image.fromarray(values, mode="L")))
    np.testing.assert_array_equal(mask[0], [False, True, True, False])


def test_mask_sixteen_bit(tmp_path):
    wide = np.array([[0, 32000, 32896, 65535]], dtype=np.uint16)
    np.testing.assert_array_equal(load_mask(_save(tmp_path, "w.png", Image.fromarray(wide)))[0],
                                  [False, False, True, True])
    narrow = np.array([[0, 255, 100, 128]], dtype=np.uint16)  # 8-bit values in a 16-bit file
    np.testing.assert_array_equal(load_mask(_save(tmp_path, "n.png", Image.fromarray(narrow)))[0],
                                  [False, True, False, True])


def test_mask_whose_marks_all_fall_below_the_threshold_is_an_error(tmp_path):
    # An empty mask would silently drop the defect from the pixel metrics.
    red = np.zeros((4, 4, 3), dtype=np.uint8)
    red[1:3, 1:3, 0] = 255  # luminance 76
    faint = np.where(np.eye(4, dtype=bool), 100, 0).astype(np.uint8)
    twelve_bit = np.where(np.eye(4, dtype=bool), 4095, 0).astype(np.uint16)
    for name, image in (("red.png", Image.fromarray(red)), ("faint.png", Image.fromarray(faint, mode="L")),
                        ("twelve.png", Image.fromarray(twelve_bit))):
        path = _save(tmp_path, name, image)
        with pytest.raises(DataError, match=f"mask {path} has marked pixels .* none reach the threshold"):
            load_mask(path)
    empty = _save(tmp_path, "empty.png", Image.fromarray(np.zeros((4, 4), dtype=np.uint8), mode="L"))
    assert not load_mask(empty).any()  # a truly empty mask stays allowed


def test_mask_palette_and_rgb_and_bilevel(tmp_path):
    pal = Image.fromarray(np.array([[0, 1, 0]], dtype=np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    np.testing.assert_array_equal(load_mask(_save(tmp_path, "p.png", pal))[0], [False, True, False])
    rgb = np.zeros((1, 3, 3), dtype=np.uint8)
    rgb[0, 1] = 255
    np.testing.assert_array_equal(load_mask(_save(tmp_path, "c.png", Image.fromarray(rgb)))[0], [False, True, False])
    bilevel = Image.fromarray(np.array([[0, 255, 255]], dtype=np.uint8)).convert("1")
    np.testing.assert_array_equal(load_mask(_save(tmp_path, "b.png", bilevel))[0], [False, True, True])


def test_mask_drawn_in_the_alpha_channel(tmp_path):
    # Black everywhere, the defect opaque on a transparent background: RGB alone read as empty.
    rgba = np.zeros((6, 8, 4), dtype=np.uint8)
    rgba[1:3, 2:5, 3] = 255
    mask = load_mask(_save(tmp_path, "m.png", Image.fromarray(rgba, mode="RGBA")))
    assert mask.sum() == 6 and mask[1:3, 2:5].all()
    rgba[..., :3] = 255  # white on transparent: the colour decides, as before
    rgba[1:3, 2:5, :3] = 0
    assert load_mask(_save(tmp_path, "w.png", Image.fromarray(rgba, mode="RGBA"))).sum() == 6 * 8 - 6


def test_mask_values_are_raw(tmp_path):
    values = np.array([[0, 10, 254]], dtype=np.uint8)
    np.testing.assert_array_equal(load_mask_values(_save(tmp_path, "v.png", Image.fromarray(values)))[0], [0, 10, 254])


def test_resize_helpers_shapes_and_ranges():
    image = Image.fromarray(np.full((10, 20, 3), 255, dtype=np.uint8))
    tensor = resize_image(image, 8)
    assert tensor.shape == (3, 8, 8) and tensor.dtype == torch.float32
    assert torch.allclose(tensor, torch.ones_like(tensor))
    assert resize_image(image, (4, 6)).shape == (3, 4, 6)
    assert resize_image(image, None).shape == (3, 10, 20)
    mask = np.zeros((10, 20), dtype=bool)
    mask[:, 10:] = True
    resized = resize_mask(mask, 4)
    assert resized.shape == (1, 4, 4) and set(resized.unique().tolist()) == {0.0, 1.0}
    assert resized[0, :, :2].sum() == 0 and resized[0, :, 2:].sum() == 8


def _twelve_bit_ramp(tmp_path, name="ramp12.png"):
    values = (np.arange(4096, dtype=np.uint16) // 16 * 16 + 15).reshape(64, 64)  # 0-4095, a 12-bit camera
    return _save(tmp_path, name, Image.fromarray(values)), values


def test_bit_depth_scales_a_twelve_bit_camera_to_the_full_range(tmp_path):
    import slsg.data.io as io

    path, values = _twelve_bit_ramp(tmp_path)
    rgb = np.asarray(load_image(path, bit_depth=12))[..., 0]
    np.testing.assert_array_equal(rgb, np.round(values / 4095 * 255).astype(np.uint8))
    assert len(np.unique(rgb)) == 255  # 256 camera levels 15, 31, ..., 4095: 1-255 after rounding
    # Without it: the container's 16-bit scale (16 grey levels), and one warning naming the fix.
    io._warned_wide_range = False
    with pytest.warns(UserWarning, match=r"ramp12.png: a I;16 image whose values stay below 4096 .*bit_depth=12"):
        dark = np.asarray(load_image(path))[..., 0]
    assert dark.max() == 16 and len(np.unique(dark)) == 17


def test_bit_depth_too_small_for_the_values_names_the_file(tmp_path):
    path, _ = _twelve_bit_ramp(tmp_path)
    with pytest.raises(DataError, match=r"ramp12.png .*values up to 4095 exceed the 10-bit range 0-1023"):
        load_image(path, bit_depth=10)
    for bad in (7, 17, 12.0, True):
        with pytest.raises(ValueError, match="bit_depth must be None or an int from 8 to 16"):
            load_image(path, bit_depth=bad)


def test_bit_depth_leaves_eight_bit_images_alone(tmp_path):
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = _save(tmp_path, "g.png", Image.fromarray(values))
    np.testing.assert_array_equal(np.asarray(load_image(path, bit_depth=12))[..., 1], values)


def test_open_dataset_reads_with_the_bit_depth(tmp_path):
    from slsg.data import open_dataset

    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(3):
        _twelve_bit_ramp(folder, f"{i}.png")
    items = open_dataset(folder, "train", image_size=None, bit_depth=12)
    assert items.bit_depth == 12 and float(items[0]["image"].max()) == 1.0
