import pytest
import torch

from slsg.data.synthesis import copy_rows, grid_shuffle, self_content_source
from slsg.data.synthesis.self_content import SelfContentParams

from synthesis_helpers import gen, smooth_image


def _cell_ids(rows, cols, ch, cw, extra_h=0, extra_w=0):
    """An image whose every grid cell holds a distinct constant value."""
    ids = torch.arange(rows * cols, dtype=torch.float32).view(rows, cols) / (rows * cols)
    img = ids.repeat_interleave(ch, 0).repeat_interleave(cw, 1)
    img = torch.nn.functional.pad(img, (0, extra_w, 0, extra_h), value=1.0)
    return img.expand(3, -1, -1).clone()


def test_grid_shuffle_moves_every_cell_and_keeps_them():
    img = _cell_ids(4, 8, 8, 4)
    out = grid_shuffle(img, (4, 8), gen(0))
    cells_in = img[0, ::8, ::4].flatten()
    cells_out = out[0, ::8, ::4].flatten()
    assert torch.equal(cells_in.sort().values, cells_out.sort().values)  # same cells
    assert bool((cells_in != cells_out).all())  # none left in place
    # Each output cell is constant: cells move whole.
    blocks = out[0].reshape(4, 8, 8, 4).permute(0, 2, 1, 3).reshape(4, 8, 32)
    assert float((blocks - blocks[..., :1]).abs().max()) == 0.0


def test_grid_shuffle_leaves_remainder_strip():
    img = _cell_ids(2, 3, 5, 5, extra_h=1, extra_w=2)  # 11 x 17: cells 5 x 5, grid covers 10 x 15
    out = grid_shuffle(img, (2, 3), gen(1))
    assert torch.equal(out[:, 10:], img[:, 10:]) and torch.equal(out[:, :, 15:], img[:, :, 15:])
    with pytest.raises(ValueError, match="does not fit"):
        grid_shuffle(img, (13, 1), gen())


def test_copy_rows_duplicates_one_band():
    h, band = 32, 8
    img = torch.rand(3, h, 5, generator=gen(7))
    for seed in range(5):
        out = copy_rows(img, band, gen(seed))
        # Brute force: out must be img with one band copied over another >= band/2 away.
        matches = []
        for src in range(h - band + 1):
            for dst in range(h - band + 1):
                expected = img.clone()
                expected[:, dst:dst + band] = img[:, src:src + band]
                if torch.equal(out, expected):
                    matches.append((src, dst))
        assert matches and all(abs(s - d) >= band // 2 for s, d in matches)
    with pytest.raises(ValueError, match="band height"):
        copy_rows(img, 17, gen())


def test_source_from_other_is_a_rearrangement_of_other():
    image, other = smooth_image(32, 0), smooth_image(32, 9)
    p = SelfContentParams(other_prob=1.0, flip_prob=0.0, brightness=0, contrast=0, saturation=0, hue=0,
                          grid=(4, 4), shuffle_prob=1.0, row_copy_prob=0.0)
    source, ops = self_content_source(image, gen(0), p, other)
    assert ops == ["other", "shuffle4x4"]
    assert torch.equal(source.flatten().sort().values, other.flatten().sort().values)
    assert not torch.equal(source, other)


def test_other_loader_called_only_when_drawn():
    calls = []

    def loader():
        calls.append(1)
        return smooth_image(32, 4)

    p = SelfContentParams(other_prob=0.0)
    for s in range(5):
        self_content_source(smooth_image(32), gen(s), p, loader)
    assert not calls
    self_content_source(smooth_image(32), gen(0), SelfContentParams(other_prob=1.0), loader)
    assert calls == [1]


def test_at_least_one_layout_op_and_determinism():
    p = SelfContentParams(shuffle_prob=0.0, row_copy_prob=0.0, flip_prob=0.0)
    source, ops = self_content_source(smooth_image(32), gen(2), p)
    assert any(op.startswith("shuffle") for op in ops)
    a, _ = self_content_source(smooth_image(32), gen(5))
    b, _ = self_content_source(smooth_image(32), gen(5))
    assert torch.equal(a, b)


def test_other_of_another_size_is_resized_and_other_channels_fail():
    # Normal images of a folder read at their own sizes differ in size.
    p = SelfContentParams(other_prob=1.0, flip_prob=0.0, brightness=0, contrast=0, saturation=0, hue=0,
                          grid=(1, 2), shuffle_prob=1.0, row_copy_prob=0.0)
    other = smooth_image(16, 3)
    source, ops = self_content_source(smooth_image(32), gen(), p, other)
    assert ops[0] == "other" and source.shape == (3, 32, 32)
    resized = torch.nn.functional.interpolate(other[None], size=(32, 32), mode="bilinear", antialias=True)[0]
    swapped = torch.cat([resized[..., 16:], resized[..., :16]], dim=-1)  # 1 x 2 cells, shuffled
    torch.testing.assert_close(source, swapped.clamp(0, 1))
    with pytest.raises(ValueError, match=r"other_normal must have shape \[3, H, W\]"):
        self_content_source(smooth_image(32), gen(), p, smooth_image(32)[:1])


def test_grid_larger_than_the_image_is_cut_down():
    p = SelfContentParams(grid=(8, 8), shuffle_prob=1.0, row_copy_prob=1.0)
    for seed in range(10):
        source, ops = self_content_source(torch.rand(3, 64, 5, generator=gen(seed)), gen(seed), p)
        assert source.shape == (3, 64, 5) and "shuffle8x5" in ops
