import numpy as np
import pytest
import torch
from PIL import Image

from slsg.data.io import DataError
from slsg.data.synthesis import (PROCEDURAL_TEXTURES, TEXTURE_AUGMENTATIONS, TextureFolder, augment_texture,
                                 procedural_texture)
from slsg.data.synthesis.textures import rotate_reflect

from synthesis_helpers import gen, smooth_image


@pytest.mark.parametrize("name", sorted(TEXTURE_AUGMENTATIONS))
def test_each_augmentation_keeps_shape_range_and_is_seeded(name):
    x = smooth_image(48, 1)
    a = TEXTURE_AUGMENTATIONS[name](x, gen(3)).clamp(0, 1)
    b = TEXTURE_AUGMENTATIONS[name](x, gen(3)).clamp(0, 1)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_invert_and_flip_are_exact():
    x = smooth_image(32, 2)
    torch.testing.assert_close(TEXTURE_AUGMENTATIONS["invert"](x, gen()), 1 - x)
    flipped = TEXTURE_AUGMENTATIONS["flip"](x, gen())
    assert torch.equal(flipped, x.flip(-1)) or torch.equal(flipped, x.flip(-2))


def test_rotate_reflect_matches_rot90_and_identity():
    x = torch.rand(3, 17, 17, generator=gen(0))
    torch.testing.assert_close(rotate_reflect(x, 0.0), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate_reflect(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    # Reflection padding: no black corners after an oblique rotation of a bright image.
    assert float(rotate_reflect(torch.full((3, 32, 32), 0.8), 30.0).min()) > 0.79


def test_augment_texture_applies_distinct_names():
    x = smooth_image(32, 3)
    out, names = augment_texture(x, gen(1), list(TEXTURE_AUGMENTATIONS), 3)
    assert len(names) == 3 == len(set(names))
    assert out.shape == x.shape and not torch.equal(out, x)
    with pytest.raises(ValueError, match="unknown texture augmentations"):
        augment_texture(x, gen(), ["blur"], 1)
    with pytest.raises(ValueError, match="cannot pick"):
        augment_texture(x, gen(), ["invert"], 2)


@pytest.mark.parametrize("kind", sorted(PROCEDURAL_TEXTURES))
def test_procedural_textures(kind):
    t = procedural_texture((40, 56), gen(5), kinds=[kind])
    assert t.shape == (3, 40, 56) and float(t.min()) >= 0 and float(t.max()) <= 1
    assert float(t.std()) > 0.05  # a visible pattern, not a flat colour
    assert torch.equal(t, procedural_texture((40, 56), gen(5), kinds=[kind]))
    assert not torch.equal(t, procedural_texture((40, 56), gen(6), kinds=[kind]))
    with pytest.raises(ValueError, match="unknown procedural"):
        procedural_texture(32, gen(), kinds=["plaid"])


def _write(path, seed, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_texture_folder_recursive_sampling(tmp_path):
    _write(tmp_path / "a" / "one.png", 0)
    _write(tmp_path / "b" / "deeper" / "two.jpg", 1)
    (tmp_path / "notes.txt").write_text("not an image")
    folder = TextureFolder(tmp_path, cache_size=1)
    assert len(folder) == 2
    t = folder.sample(24, gen(2))
    assert t.shape == (3, 24, 24) and float(t.min()) >= 0 and float(t.max()) <= 1
    assert torch.equal(t, folder.sample(24, gen(2)))  # the cache does not change results
    seen = {float(folder.sample(8, gen(s)).sum()) for s in range(10)}
    assert len(seen) > 5


def test_texture_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        TextureFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no texture images"):
        TextureFolder(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG not really")
    folder = TextureFolder(bad)
    with pytest.raises(DataError, match="broken.png"):
        folder.sample(16, gen())


def test_real_dtd_textures(shared_data):
    dtd = shared_data / "textures" / "dtd"
    if not dtd.is_dir():
        pytest.skip(f"no DTD textures at {dtd}")
    folder = TextureFolder(dtd)
    assert len(folder) == 600
    t = folder.sample(64, gen(0))
    assert t.shape == (3, 64, 64) and float(t.std()) > 0.02
