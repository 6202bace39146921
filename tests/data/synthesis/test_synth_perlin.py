import math

import numpy as np
import pytest
import torch

from slsg.data.synthesis.perlin import perlin_masks, perlin_noise

from synthesis_helpers import gen


def reference_perlin(n, size, scale_max, seed, rotation_deg=90.0):
    """Textbook per-pixel Perlin noise in NumPy, reading the same random draws in the same order."""
    g = gen(seed)
    exps = torch.randint(0, scale_max, (n, 2), generator=g).numpy()
    theta = ((torch.rand(n, generator=g) * 2 - 1) * math.radians(rotation_deg)).numpy().astype(np.float64)
    half = math.sqrt(0.5) + 1e-4
    lattice = math.ceil(2 * half * 2 ** (scale_max - 1)) + 2
    angles = (torch.rand(n, lattice * lattice, generator=g) * 2 * math.pi).numpy().astype(np.float64)
    out = np.zeros((n, size, size))

    def fade(t):
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    for k in range(n):
        ry, rx = 2.0 ** exps[k]
        grads = np.stack([np.cos(angles[k]), np.sin(angles[k])], 1).reshape(lattice, lattice, 2)
        c, s = math.cos(theta[k]), math.sin(theta[k])
        for i in range(size):
            for j in range(size):
                x, y = (j + 0.5) / size - 0.5, (i + 0.5) / size - 0.5
                u = (c * x - s * y + half) * rx
                v = (s * x + c * y + half) * ry
                cx, cy = int(math.floor(u)), int(math.floor(v))
                fx, fy = u - cx, v - cy
                dots = {}
                for dx in (0, 1):
                    for dy in (0, 1):
                        gx, gy = grads[cy + dy, cx + dx]
                        dots[dx, dy] = gx * (fx - dx) + gy * (fy - dy)
                top = dots[0, 0] + fade(fx) * (dots[1, 0] - dots[0, 0])
                bottom = dots[0, 1] + fade(fx) * (dots[1, 1] - dots[0, 1])
                out[k, i, j] = math.sqrt(2) * (top + fade(fy) * (bottom - top))
    return out


@pytest.mark.parametrize("scale_max,rotation", [(4, 90.0), (3, 0.0), (1, 45.0)])
def test_noise_matches_textbook_reference(scale_max, rotation):
    ours = perlin_noise(3, 20, scale_max, gen(7), rotation_deg=rotation).numpy()
    ref = reference_perlin(3, 20, scale_max, 7, rotation)
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_noise_is_smooth_and_bounded():
    noise = perlin_noise(16, 256, 4, gen(1))
    assert noise.shape == (16, 256, 256) and noise.dtype == torch.float32
    assert float(noise.abs().max()) <= 1.0 + 1e-5  # sqrt(2) * |2-D Perlin| <= 1
    # No jumps at cell borders: with at most 8 cells per 256 px the largest step
    # between neighbours is about 0.08 (a wrong corner would jump by ~0.5).
    assert float(noise.diff(dim=1).abs().max()) < 0.12
    assert float(noise.diff(dim=2).abs().max()) < 0.12
    assert 0.15 < float(noise.std()) < 0.5


def test_chunking_does_not_change_results():
    a = perlin_noise(9, 32, 4, gen(3), chunk=1)
    b = perlin_noise(9, 32, 4, gen(3), chunk=4)
    c = perlin_noise(9, 32, 4, gen(3), chunk=64)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_scale_exponents_cover_range():
    # With rotation 0, a field with 2^e cells along x crosses ~2^e zero-mean cells;
    # compare the number of sign changes along rows to tell scales apart.
    noise = perlin_noise(400, 64, 4, gen(5), rotation_deg=0.0)
    crossings = (noise[:, :, 1:].sign() != noise[:, :, :-1].sign()).float().sum(2).mean(1)
    assert float(crossings.min()) < 1.0 and float(crossings.max()) > 4.0


@pytest.mark.parametrize("scale_max,threshold", [(4, 0.5), (3, 0.4)])
def test_masks_have_min_pixels_and_are_deterministic(scale_max, threshold):
    masks = perlin_masks(48, 64, scale_max, threshold, gen(11))
    assert masks.shape == (48, 64, 64) and masks.dtype == torch.bool
    assert int(masks.flatten(1).sum(1).min()) >= 49
    assert torch.equal(masks, perlin_masks(48, 64, scale_max, threshold, gen(11)))
    assert not torch.equal(masks, perlin_masks(48, 64, scale_max, threshold, gen(12)))


def test_lower_threshold_gives_larger_masks():
    big = perlin_masks(64, 64, 3, 0.4, gen(2)).float().mean()
    small = perlin_masks(64, 64, 3, 0.5, gen(2)).float().mean()
    assert big > small


def test_rotation_reaches_corners():
    # Rotating an image (as imgaug does) leaves empty corners; evaluating the field at
    # rotated coordinates does not: corner pixels must be set in some masks.
    masks = perlin_masks(256, 32, 4, 0.5, gen(4))
    corners = masks[:, 0, 0] | masks[:, 0, -1] | masks[:, -1, 0] | masks[:, -1, -1]
    assert int(corners.sum()) > 5


def test_non_square_size():
    masks = perlin_masks(4, (40, 72), 4, 0.5, gen(0))
    assert masks.shape == (4, 40, 72)


def test_foreground_restriction():
    fg = torch.zeros(64, 64, dtype=torch.bool)
    fg[16:48, 8:40] = True
    masks = perlin_masks(32, 64, 4, 0.5, gen(0), foreground=fg)
    assert not bool((masks & ~fg).any())
    assert int(masks.flatten(1).sum(1).min()) >= 49


def test_per_mask_foreground_and_tiny_foreground_fallback():
    fg = torch.zeros(3, 64, 64, dtype=torch.bool)
    fg[0, :8, :8] = True  # 64 px: rarely 49 of them exceed the threshold -> fallback
    fg[1, 20:40, 20:40] = True
    fg[2] = True
    masks = perlin_masks(3, 64, 4, 0.5, gen(9), foreground=fg, max_rounds=2)
    assert not bool((masks & ~fg).any())
    assert int(masks.flatten(1).sum(1).min()) >= 49


def test_validation_errors():
    with pytest.raises(TypeError, match="generator"):
        perlin_masks(2, 32, 4, 0.5, 0)
    with pytest.raises(ValueError, match="size"):
        perlin_masks(2, (32,), 4, 0.5, gen())
    with pytest.raises(ValueError, match="min_pixels"):
        perlin_masks(2, 4, 4, 0.5, gen())
    with pytest.raises(ValueError, match="scale_max"):
        perlin_masks(2, 32, 0, 0.5, gen())
    with pytest.raises(ValueError, match="foreground must have shape"):
        perlin_masks(2, 32, 4, 0.5, gen(), foreground=torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="fewer than min_pixels"):
        perlin_masks(2, 32, 4, 0.5, gen(), foreground=torch.zeros(32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="threshold"):
        perlin_masks(2, 32, 4, float("nan"), gen())
    assert perlin_masks(0, 32, 4, 0.5, gen()).shape == (0, 32, 32)
