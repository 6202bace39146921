import pytest
import torch

from slsg.data.synthesis import blend, estimate_foreground

from synthesis_helpers import gen


def test_blend_formula_elementwise():
    g = gen(0)
    image, source = torch.rand(3, 16, 16, generator=g), torch.rand(3, 16, 16, generator=g)
    mask = torch.rand(16, 16, generator=g) > 0.5
    beta = 0.3
    out = blend(image, source, mask, beta)
    m = mask.float()
    expected = image * (1 - m) + (1 - beta) * source * m + beta * image * m
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[:, ~mask], image[:, ~mask])  # outside the mask: untouched


def test_blend_extremes_and_mask_forms():
    image, source = torch.zeros(3, 8, 8), torch.ones(3, 8, 8)
    mask = torch.zeros(1, 8, 8)
    mask[0, 2:5, 2:5] = 1
    full = blend(image, source, mask, 0.0)
    assert float(full[:, 3, 3].min()) == 1.0 and float(full[:, 0, 0].max()) == 0.0
    assert torch.equal(blend(image, source, mask, 1.0), image)
    assert torch.equal(blend(image, source, mask.bool()[0], 0.5), blend(image, source, mask, 0.5))


@pytest.mark.parametrize("bad,error,match", [
    (torch.rand(8, 8, 3), ValueError, r"\[3, H, W\]"),
    (torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8), TypeError, "floating-point"),
    (torch.rand(3, 8, 8) * 255, ValueError, "divide 8-bit images by 255"),
    (torch.full((3, 8, 8), float("nan")), ValueError, "NaN"),
    ("not a tensor", TypeError, "torch.Tensor"),
])
def test_blend_rejects_bad_images(bad, error, match):
    with pytest.raises(error, match=match):
        blend(bad, torch.rand(3, 8, 8), torch.ones(8, 8), 0.5)


def test_blend_rejects_bad_masks_and_beta():
    image = torch.rand(3, 8, 8)
    with pytest.raises(ValueError, match="mask must have shape"):
        blend(image, image, torch.ones(9, 8), 0.5)
    with pytest.raises(ValueError, match="only 0 and 1"):
        blend(image, image, torch.full((8, 8), 0.5), 0.5)
    with pytest.raises(ValueError, match="beta"):
        blend(image, image, torch.ones(8, 8), 1.5)
    with pytest.raises(ValueError, match="source has size"):
        blend(image, torch.rand(3, 4, 4), torch.ones(8, 8), 0.5)


def test_foreground_estimate_on_object_and_texture():
    image = torch.ones(3, 64, 64)  # white background
    image[:, 16:48, 20:44] = 0.2  # dark object
    fg = estimate_foreground(image)
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[16:48, 20:44] = True
    assert fg is not None and torch.equal(fg, expected)
    # A plain image has no object: no estimate, the caller uses the whole image.
    assert estimate_foreground(torch.full((3, 32, 32), 0.5)) is None
