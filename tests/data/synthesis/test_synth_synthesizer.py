import pytest
import torch

from slsg.data.synthesis import AnomalySynthesizer, SynthesisConfig

from synthesis_helpers import gen, smooth_image


def test_call_contract_and_blend_identity():
    synth = AnomalySynthesizer()
    image = smooth_image(64, 1)
    for seed in range(12):
        aug, mask = synth(image, gen(seed))
        assert aug.shape == (3, 64, 64) and mask.shape == (1, 64, 64)
        assert aug.dtype == torch.float32 and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() >= 49
        assert float(aug.min()) >= 0 and float(aug.max()) <= 1

        r = synth.sample(image, gen(seed))
        assert torch.equal(r.image, aug) and torch.equal(r.mask, mask)  # same stream, same result
        inside = r.mask[0].bool()
        # aug = I(1-M) + (1-b) S M + b I M wherever the image changed.
        expected = image + (r.source - image) * (1 - r.beta)
        changed = (r.image - image).abs().amax(0) > 0
        torch.testing.assert_close(r.image[:, changed], expected[:, changed], atol=1e-5, rtol=0)
        if r.branch == "texture":  # the texture label is the Perlin mask itself
            assert torch.equal(r.image[:, ~inside], image[:, ~inside])
        else:  # self-content labels drop invisible changes, so what is left outside is faint
            assert float((r.image - image).abs().amax(0)[~inside].mean()) < 0.04


def test_self_content_label_follows_the_change_pixel_by_pixel():
    # Thin dark lines on smooth colour: moved content changes edges and one-pixel
    # structures, where a locally averaged change mislabels pixels both ways.
    image = smooth_image(64, 2)
    image[:, ::6, :] *= 0.2
    image[:, :, 3::7] *= 0.2
    config = SynthesisConfig(self_content_prob=1.0)
    t = config.self_min_change
    synth = AnomalySynthesizer(config)
    for seed in range(12):
        r = synth.sample(image, gen(seed), other_normal=smooth_image(64, 7), branch="self")
        change = (r.image - image).abs().amax(0)
        label = r.mask[0].bool()
        assert r.branch == "self"
        assert bool((change[label] > t).all()), f"seed {seed}: unchanged pixels labelled anomalous"
        assert float(change[~label].max()) <= 2 * t, f"seed {seed}: a clearly changed pixel labelled normal"
        # What is left unlabelled above the threshold is lone specks only.
        changed = (change > t).float()[None, None]
        neighbours = torch.nn.functional.conv2d(changed, torch.ones(1, 1, 3, 3), padding=1)[0, 0] - changed[0, 0]
        assert bool((neighbours[(change > t) & ~label] == 0).all())


def test_branch_share_and_beta_ranges():
    synth = AnomalySynthesizer()
    images = [smooth_image(32, i) for i in range(3)]
    results = [synth.sample(images[s % 3], gen(s)) for s in range(200)]
    share = sum(r.branch == "self" for r in results) / len(results)
    assert abs(share - 0.58) < 0.14  # 4 standard deviations of a binomial share of 200
    assert all(0.0 <= r.beta <= 0.9 for r in results if r.branch == "texture")
    assert all(0.0 <= r.beta <= 0.25 for r in results if r.branch == "self")
    assert max(r.beta for r in results if r.branch == "texture") > 0.5
    assert {r.kind for r in results} == {"structural", "logical"}


def test_self_masks_larger_than_texture_masks():
    # Self-content uses a lower threshold (0.4) and coarser noise (s=3).
    synth = AnomalySynthesizer(SynthesisConfig(self_min_change=0.0))
    image = smooth_image(64)
    tex = torch.stack([synth.sample(image, gen(s), branch="texture").mask.mean() for s in range(40)]).mean()
    slf = torch.stack([synth.sample(image, gen(s), branch="self").mask.mean() for s in range(40)]).mean()
    assert slf > tex


def test_seeded_reproducible_and_different_seeds_differ():
    synth = AnomalySynthesizer()
    image = smooth_image(64)
    a, b = synth(image, gen(3)), synth(image, gen(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = synth(image, gen(4))
    assert not torch.equal(a[1], c[1])


def test_foreground_restriction_both_branches():
    config = SynthesisConfig(foreground_branches=("texture", "self"))
    synth = AnomalySynthesizer(config)
    fg = torch.zeros(64, 64, dtype=torch.bool)
    fg[10:50, 20:60] = True
    for seed in range(10):
        for branch in ("texture", "self"):
            r = synth.sample(smooth_image(64), gen(seed), foreground=fg, branch=branch)
            assert not bool((r.mask[0].bool() & ~fg).any())
            assert torch.equal(r.image[:, ~fg], smooth_image(64)[:, ~fg])
    with pytest.raises(ValueError, match="fewer than min_pixels"):
        synth(smooth_image(64), gen(), foreground=torch.zeros(64, 64, dtype=torch.bool))


def test_estimated_foreground_preset():
    image = torch.ones(3, 64, 64)
    image[:, 16:48, 16:48] = smooth_image(32) * 0.5
    synth = AnomalySynthesizer("object")
    for seed in range(8):
        aug, mask = synth(image, gen(seed))
        assert mask[0, :12].sum() == 0 and mask[0, 52:].sum() == 0  # nothing on the white border


def test_invisible_self_content_falls_back_to_texture():
    flat = torch.full((3, 48, 48), 0.5)
    config = SynthesisConfig(self_content_prob=1.0, self_brightness=0, self_contrast=0, self_saturation=0,
                             self_hue=0)
    r = AnomalySynthesizer(config).sample(flat, gen(0))
    assert r.branch == "texture" and r.mask.sum() >= 49


def test_grayscale_images_get_grayscale_anomalies():
    gray = smooth_image(48)[:1].expand(3, -1, -1).contiguous()
    synth = AnomalySynthesizer()
    for seed in range(6):
        aug, _ = synth(gray, gen(seed))
        assert float((aug - aug[:1]).abs().max()) < 1e-5


def test_other_normal_tensor_and_callable():
    synth = AnomalySynthesizer(SynthesisConfig(self_content_prob=1.0, self_other_prob=1.0))
    image, other = smooth_image(48, 0), smooth_image(48, 5)
    r1 = synth.sample(image, gen(1), other_normal=other)
    r2 = synth.sample(image, gen(1), other_normal=lambda: other)
    assert "other" in r1.ops and torch.equal(r1.image, r2.image)
    smaller = synth.sample(image, gen(1), other_normal=smooth_image(32, 5))  # resized to the image
    assert "other" in smaller.ops and smaller.image.shape == image.shape
    with pytest.raises(ValueError, match="other_normal"):
        synth(image, gen(), other_normal=smooth_image(32)[:1])
    with pytest.raises(TypeError, match="other_normal"):
        synth(image, gen(), other_normal="other.png")


def test_texture_folder_source(shared_data):
    dtd = shared_data / "textures" / "dtd"
    if not dtd.is_dir():
        pytest.skip(f"no DTD textures at {dtd}")
    synth = AnomalySynthesizer(textures=dtd)
    r = synth.sample(smooth_image(64), gen(0), branch="texture")
    assert r.ops[0] == "folder" and len(r.ops) == 4


def test_input_validation():
    synth = AnomalySynthesizer()
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        synth(torch.rand(64, 64, 3), gen())
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        synth(torch.rand(1, 3, 64, 64), gen())
    with pytest.raises(TypeError, match="floating-point"):
        synth(torch.zeros(3, 64, 64, dtype=torch.uint8), gen())
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        synth(torch.rand(3, 64, 64) + 1, gen())
    with pytest.raises(TypeError, match="generator"):
        synth(torch.rand(3, 64, 64), 0)
    with pytest.raises(ValueError, match="branch"):
        synth.sample(torch.rand(3, 64, 64), gen(), branch="logical")
    with pytest.raises(ValueError, match="foreground must have shape"):
        synth(torch.rand(3, 64, 64), gen(), foreground=torch.ones(32, 32, dtype=torch.bool))
    with pytest.raises(TypeError, match="config"):
        AnomalySynthesizer(config={"self_content_prob": 0.5})
    with pytest.raises(ValueError, match="unknown synthesis preset"):
        AnomalySynthesizer("nope")


def test_non_square_images():
    image = torch.rand(3, 40, 72, generator=gen(0))
    for seed in range(4):
        aug, mask = AnomalySynthesizer()(image, gen(seed))
        assert aug.shape == (3, 40, 72) and mask.shape == (1, 40, 72)


def test_other_float_dtypes_are_returned_as_given():
    image = (smooth_image(32).double() + 1e-9).clamp(0, 1)  # not exact in float32
    aug, mask = AnomalySynthesizer()(image, gen(0), other_normal=smooth_image(32, 2).double())
    assert aug.dtype == torch.float64 and mask.dtype == torch.float64
    aug32, _ = AnomalySynthesizer()(image.float(), gen(0), other_normal=smooth_image(32, 2))
    torch.testing.assert_close(aug.float(), aug32)
    outside = ~mask.bool().expand_as(image)
    assert torch.equal(aug[outside], image[outside])  # the caller's pixels, not a float32 round trip
    # The self branch changes some pixels it leaves out of the mask (changes below its threshold):
    # float64 gives the float32 result there too.
    synth = AnomalySynthesizer(SynthesisConfig(self_content_prob=1.0))
    for seed in range(6):
        r64 = synth.sample(image, gen(seed), other_normal=smooth_image(32, 2).double(), branch="self")
        r32 = synth.sample(image.float(), gen(seed), other_normal=smooth_image(32, 2), branch="self")
        torch.testing.assert_close(r64.image.float(), r32.image, rtol=0, atol=1e-7)
        kept = r32.image == image.float()
        assert torch.equal(r64.image[kept], image[kept])
