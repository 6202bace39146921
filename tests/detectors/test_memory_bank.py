import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from slsg.detectors import MemoryBankConfig, MemoryBankDetector, ModelError, load_detector
from slsg.detectors.base import gaussian_smooth
from slsg.detectors.edges import edge_classes, estimate_edge_levels

SIZE = 64


def normal_image(seed: int) -> torch.Tensor:
    """A smooth, slightly varying 'product' image: diagonal gradient with a disc and mild noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    base = 0.3 + 0.3 * (xx + yy) / 2
    disc = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.08).float() * 0.2
    image = torch.stack([base + disc, base * 0.9 + disc, base * 0.8 + disc])
    return (image + 0.02 * torch.randn(image.shape, generator=g)).clamp(0, 1)


def with_defect(image: torch.Tensor, top: int = 26, left: int = 30, size: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    image = image.clone()
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[top:top + size, left:left + size] = True
    image[:, mask] = torch.tensor([0.05, 0.9, 0.05])[:, None]
    return image, mask


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": 0, "path": f"img{i}.png"}


@pytest.fixture(scope="module")
def fitted() -> MemoryBankDetector:
    config = MemoryBankConfig(image_size=SIZE, coreset_ratio=0.5, calibration_ratio=0.2, batch_size=4)
    return MemoryBankDetector(config, progress=False).fit(ListDataset([normal_image(i) for i in range(10)]))


def test_predict_shapes_scores_and_localisation(fitted):
    anomalous, mask = with_defect(normal_image(100))
    images = torch.stack([normal_image(101), anomalous])
    scores, maps = fitted.predict(images)
    assert scores.shape == (2,) and maps.shape == (2, SIZE, SIZE)
    assert scores.dtype == torch.float32 and maps.dtype == torch.float32
    assert scores[1] > 1.2 * scores[0]
    # image score = max of the map (score_topk=1), computed independently
    torch.testing.assert_close(scores, maps.flatten(1).max(1).values)
    # the hottest pixel lies on (or next to) the defect
    peak = np.unravel_index(int(maps[1].argmax()), (SIZE, SIZE))
    near = ndimage.binary_dilation(mask.numpy(), iterations=6)
    assert near[peak], (peak, mask.nonzero()[0])
    assert fitted.classify(scores).tolist() == [False, True]


def test_threshold_comes_from_held_out_normal_images(fitted):
    info = fitted.fit_info
    assert info["calibration_images"] == 2 and info["train_images"] == 8
    held_out = torch.stack([normal_image(i) for i in info["calibration_indices"]])
    # each held-out image is scored with the edge levels of the other held-out images only
    raw = [fitted.patch_distances(x[None])[0] for x in held_out]
    levels = fitted.edge_levels
    scores = []
    try:
        for i in range(len(held_out)):
            fitted.edge_levels = estimate_edge_levels(raw[:i] + raw[i + 1:], fitted.config.edge_band)
            scores.append(fitted.predict(held_out[i:i + 1])[0])
    finally:
        fitted.edge_levels = levels
    scores = torch.cat(scores)
    # (one image at a time here, two per batch in fit: float32 sums differ in the last bits)
    torch.testing.assert_close(levels, estimate_edge_levels(raw, fitted.config.edge_band), rtol=1e-5, atol=0)
    assert fitted.image_threshold == pytest.approx(float(np.quantile(scores.numpy().astype(np.float64), 0.99)),
                                                   rel=1e-5)
    # 8 bank images x 8x8 patches, half kept by the coreset
    assert info["bank_size"] == 8 * 8 * 8 // 2
    assert info["embedding_dim"] == fitted.backbone.channels[8] + fitted.backbone.channels[16]  # Lite2: 48 + 120


def test_embedding_is_pooled_concatenation(fitted):
    x = normal_image(3)[None]
    emb = fitted.embed(x)
    assert emb.shape == (1, SIZE // 8, SIZE // 8, fitted.backbone.channels[8] + fitted.backbone.channels[16])
    with torch.no_grad():
        feats = fitted.backbone(x, strides=(8, 16))
    # independent computation for one interior patch (row 3, col 4)
    f8 = feats[8][0, :, 2:5, 3:6].mean(dim=(1, 2))
    f16 = F.interpolate(F.avg_pool2d(feats[16], 3, 1, 1, count_include_pad=False), size=(8, 8), mode="bilinear",
                        align_corners=False)[0, :, 3, 4]
    torch.testing.assert_close(emb[0, 3, 4], torch.cat([f8, f16]), rtol=1e-4, atol=1e-4)


def test_embed_dim_pools_channels():
    config = MemoryBankConfig(image_size=SIZE, embed_dim=64, weights=None)
    detector = MemoryBankDetector(config, progress=False)
    assert detector.embed(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 8, 8, 64)


def test_other_input_sizes_are_resized_and_maps_match_input(fitted):
    scores, maps = fitted.predict(torch.rand(1, 3, 80, 96))
    assert maps.shape == (1, 80, 96) and scores.shape == (1,)


def test_save_load_round_trip(fitted, tmp_path):
    images = torch.stack([normal_image(200), with_defect(normal_image(201))[0]])
    scores, maps = fitted.predict(images)
    fitted.save(tmp_path / "run" / "model")
    first_files = set((tmp_path / "run" / "model").iterdir())
    fitted.save(tmp_path / "run" / "model")  # saving again replaces, leaving one set of weight files
    files = {p.name for p in (tmp_path / "run" / "model").iterdir()}
    assert len(files) == 3 and "detector.json" in files and len(first_files) == 3
    meta = json.loads((tmp_path / "run" / "model" / "detector.json").read_text())
    assert meta["kind"] == "memory_bank" and meta["config"]["strides"] == [8, 16]
    for path in (tmp_path / "run" / "model", tmp_path / "run"):  # the model folder or its run folder
        loaded = load_detector(path)
        assert isinstance(loaded, MemoryBankDetector)
        assert loaded.config == fitted.config and loaded.config.strides == (8, 16)
        assert loaded.image_threshold == fitted.image_threshold
        loaded.progress = False
        s2, m2 = loaded.predict(images)
        torch.testing.assert_close(s2, scores)
        torch.testing.assert_close(m2, maps)
    assert MemoryBankDetector.load(tmp_path / "run").fit_info == fitted.fit_info


class FailingDataset(ListDataset):
    def __init__(self, images, bad: int):
        super().__init__(images)
        self.bad = bad

    def original_size(self, i):  # from the file's header, as the real datasets do: readable
        return tuple(self.images[i].shape[-2:])

    def __getitem__(self, i):
        if i == self.bad:
            raise OSError(f"cannot read img{i}.png")
        return super().__getitem__(i)


@pytest.mark.parametrize("step", ["features", "calibration"])
def test_failed_refit_keeps_the_previous_model(fitted, tmp_path, step):
    import copy
    detector = copy.copy(fitted)
    # the same seed and image count hold out the same images: fail on one of the bank's or on one
    # of the held-out images (read after the bank is built)
    held_out = detector.fit_info["calibration_indices"]
    bad = held_out[0] if step == "calibration" else min(set(range(10)) - set(held_out))
    images = torch.stack([normal_image(200), with_defect(normal_image(201))[0]])
    scores, maps = detector.predict(images)
    state = (copy.deepcopy(detector.fit_info), detector.bank, detector.image_threshold, detector.edge_levels)
    # other images (a larger size, so another input scale) of which one cannot be read
    others = FailingDataset([F.interpolate(normal_image(300 + i)[None], size=2 * SIZE)[0] for i in range(10)], bad)
    with pytest.raises(OSError, match=f"img{bad}.png"):
        detector.fit(others)
    assert detector.fit_info == state[0] and detector.bank is state[1]
    assert detector.image_threshold == state[2] and detector.edge_levels is state[3]
    s2, m2 = detector.predict(images)
    torch.testing.assert_close(s2, scores)
    torch.testing.assert_close(m2, maps)
    loaded = load_detector(detector.save(tmp_path / "model"))
    torch.testing.assert_close(loaded.predict(images)[0], scores)


def test_failed_save_keeps_the_previous_model_and_leaves_no_files(fitted, tmp_path, monkeypatch):
    model = fitted.save(tmp_path / "model")
    before = {p.name: p.read_bytes() for p in model.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    # the bank is written after the backbone: the new backbone file is already there
    monkeypatch.setattr(type(fitted.bank), "save", disk_full)
    with pytest.raises(OSError, match="disk full"):
        fitted.save(model)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert load_detector(model).image_threshold == fitted.image_threshold


def test_load_errors_name_the_problem(fitted, tmp_path):
    with pytest.raises(ModelError, match="nowhere"):
        load_detector(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="empty"):
        load_detector(tmp_path / "empty")
    model = fitted.save(tmp_path / "model")
    meta = json.loads((model / "detector.json").read_text())
    (model / meta["files"]["bank"]).unlink()
    with pytest.raises(ModelError, match="does not exist"):
        load_detector(model)
    (model / "detector.json").write_text("{not json")
    with pytest.raises(ModelError, match="detector.json"):
        load_detector(model)
    meta["kind"] = "alien"
    (model / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="alien"):
        load_detector(model)


def test_model_files_must_stay_inside_the_model_folder(fitted, tmp_path):
    # save() removes the files the previous model named: a tampered name must not reach out.
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    model = fitted.save(tmp_path / "model")
    meta = json.loads((model / "detector.json").read_text())
    for bad in ("../victim", str(victim), "..", ""):
        meta["files"]["extra"] = bad
        (model / "detector.json").write_text(json.dumps(meta))
        with pytest.raises(ModelError, match="plain file name"):
            load_detector(model)
        fitted.save(model)  # overwrites the tampered model, removes nothing it names
        assert (victim / "keep.txt").read_text() == "precious"
        assert load_detector(model).image_threshold == fitted.image_threshold


@pytest.mark.parametrize("change,match", [
    (lambda m: m.update(image_threshold="high"), "image_threshold must be a finite number"),
    (lambda m: m.update(image_threshold=float("nan")), "image_threshold"),
    (lambda m: m.update(config=[1]), "'config' must be a JSON object"),
    (lambda m: m.update(files=["a"]), "'files' must be a JSON object"),
    (lambda m: m["fit_info"].update(input_scale=-1.0), "positive input_scale"),
    (lambda m: m["fit_info"].update(input_scale="1.0"), "positive input_scale"),
])
def test_tampered_values_are_rejected_on_load(fitted, tmp_path, change, match):
    model = fitted.save(tmp_path / "model")
    meta = json.loads((model / "detector.json").read_text())
    change(meta)
    (model / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=match):
        load_detector(model)


def test_broken_bank_file_is_a_model_error(fitted, tmp_path):
    model = fitted.save(tmp_path / "model")
    bank = model / json.loads((model / "detector.json").read_text())["files"]["bank"]
    bank.write_bytes(bank.read_bytes()[:100])
    with pytest.raises(ModelError, match="is not a valid memory bank"):
        load_detector(model)


def test_predict_takes_any_float_precision_and_rejects_bad_batches(fitted):
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    scores, maps = fitted.predict(images)
    for dtype in (torch.float64, torch.bfloat16):
        s2, m2 = fitted.predict(images.to(dtype))
        tol = 1e-6 if dtype == torch.float64 else 0.1  # bfloat16 rounds the pixels themselves
        torch.testing.assert_close(s2, scores, rtol=tol, atol=tol * scores.abs().max().item())
    bad = images.clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fitted.predict(bad)
    with pytest.raises(ValueError, match="empty batch"):
        fitted.predict(images[:0])
    with pytest.raises(ValueError, match="no images"):
        fitted.predict_each([])


def test_input_validation(fitted):
    with pytest.raises(ValueError, match="batch"):
        fitted.predict(torch.rand(3, SIZE, SIZE))
    with pytest.raises(ValueError, match="shape"):
        fitted.predict(torch.rand(1, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="dtype"):
        fitted.predict(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8))
    with pytest.raises(ValueError, match="255"):
        fitted.predict(torch.full((1, 3, SIZE, SIZE), 200.0))
    with pytest.raises(RuntimeError, match="fit"):
        MemoryBankDetector(MemoryBankConfig(image_size=SIZE, weights=None)).predict(torch.rand(1, 3, SIZE, SIZE))
    with pytest.raises(RuntimeError, match="fitted"):
        MemoryBankDetector(MemoryBankConfig(weights=None)).save("unused")


@pytest.mark.parametrize("kwargs", [dict(strides=(8, 12)), dict(strides=()), dict(image_size=100),
                                    dict(coreset_ratio=0.0), dict(calibration_ratio=1.0), dict(pool_size=2)])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        MemoryBankConfig(**kwargs)


def test_single_image_dataset_has_no_threshold():
    config = MemoryBankConfig(image_size=SIZE, weights=None)
    detector = MemoryBankDetector(config, progress=False).fit(ListDataset([normal_image(0)]))
    assert detector.image_threshold is None and detector.fit_info["calibration_images"] == 0
    with pytest.raises(RuntimeError, match="threshold"):
        detector.classify(torch.zeros(1))


def test_gaussian_smooth_matches_scipy():
    maps = torch.rand(2, 1, 40, 50, dtype=torch.float64)
    expected = np.stack([ndimage.gaussian_filter(m[0].numpy(), sigma=4, mode="mirror", truncate=4.0)
                         for m in maps])
    torch.testing.assert_close(gaussian_smooth(maps, 4.0)[:, 0], torch.from_numpy(expected))


def stripes(seed: int, height: int, width: int, period: int = 8) -> torch.Tensor:
    """Vertical stripes of a fixed period in pixels, whatever the image size: a texture whose scale
    must not change with the image's aspect ratio."""
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(width, dtype=torch.float32)
    row = 0.5 + 0.3 * torch.sin(2 * torch.pi * x / period)
    image = row.expand(3, height, width).clone()
    return (image + 0.02 * torch.randn(image.shape, generator=g)).clamp(0, 1)


MIXED_SIZES = [(64, 64), (64, 128), (48, 96), (64, 32), (96, 64), (64, 80)]


def test_keep_aspect_resizes_every_image_by_one_scale():
    images = [stripes(i, h, w) for i, (h, w) in enumerate(MIXED_SIZES)]
    config = MemoryBankConfig(image_size=SIZE, coreset_ratio=None, calibration_ratio=0.0, batch_size=4, weights=None)
    detector = MemoryBankDetector(config, progress=False).fit(ListDataset(images))
    shorter = sorted(min(s) for s in MIXED_SIZES)  # 32, 48, 64, 64, 64, 64: median (upper) 64
    assert detector.fit_info["input_scale"] == pytest.approx(SIZE / shorter[len(shorter) // 2])
    assert detector.dataset_image_size is None
    # scale 1 here: sizes are kept, rounded to the largest stride (16)
    assert detector.input_size(64, 128) == (64, 128) and detector.input_size(50, 70) == (48, 64)
    assert detector.input_size(4, 4) == (32, 32)  # never below two cells of the largest stride
    # every patch of every image is in the bank: no image was squashed to SIZE x SIZE
    assert detector.fit_info["bank_size"] == sum(h // 8 * w // 8 for h, w in MIXED_SIZES)


def test_keep_aspect_scale_follows_training_images():
    images = [stripes(i, 2 * h, 2 * w) for i, (h, w) in enumerate(MIXED_SIZES)]
    config = MemoryBankConfig(image_size=SIZE, coreset_ratio=0.5, calibration_ratio=0.0, weights=None)
    detector = MemoryBankDetector(config, progress=False).fit(ListDataset(images))
    assert detector.fit_info["input_scale"] == pytest.approx(0.5)
    assert detector.input_size(128, 256) == (64, 128)
    scores, maps = detector.predict(stripes(50, 128, 256)[None])
    assert maps.shape == (1, 128, 256)  # maps come back at the size of the input image


def test_predict_input_and_throughput_run_the_model_at_its_input_size(monkeypatch):
    # keep_aspect with input scale 0.5: predict() scales whatever it gets, so timing predict() on
    # an image already at the input size would run the backbone at a quarter of the pixels.
    from slsg.detectors import measure_throughput

    images = [stripes(i, 2 * h, 2 * w) for i, (h, w) in enumerate(MIXED_SIZES)]
    config = MemoryBankConfig(image_size=SIZE, coreset_ratio=0.5, calibration_ratio=0.0, weights=None)
    detector = MemoryBankDetector(config, progress=False).fit(ListDataset(images))
    original = stripes(50, 128, 256)[None]
    model_input = detector.resize_to_input(original)
    assert model_input.shape[-2:] == (64, 128)
    seen = []
    real_embed = detector.embed
    monkeypatch.setattr(detector, "embed", lambda x: seen.append(tuple(x.shape[-2:])) or real_embed(x))
    scores, maps = detector.predict_input(model_input)
    assert seen == [(64, 128)] and maps.shape == (1, 64, 128)
    full_scores, _ = detector.predict(original)
    assert seen == [(64, 128), (64, 128)]
    torch.testing.assert_close(scores, full_scores, rtol=0.05, atol=0)  # maps differ only by the final upsampling
    seen.clear()
    assert measure_throughput(detector, model_input, repeats=2, warmup=1) > 0
    assert seen == [(64, 128)] * 3


def test_stripes_of_other_aspect_ratios_look_normal_only_with_keep_aspect():
    """The reason for keep_aspect: squashing a wide image compresses its texture, which the
    memory bank then flags although nothing is wrong."""
    train = [stripes(i, 64, 64) for i in range(6)]
    wide = stripes(99, 64, 192)  # the same texture, three times wider
    scores = {}
    for resize in ("keep_aspect", "square"):
        config = MemoryBankConfig(image_size=SIZE, resize=resize, coreset_ratio=None, calibration_ratio=0.0,
                                  weights=None, seed=0)
        detector = MemoryBankDetector(config, progress=False).fit(ListDataset(train))
        normal_score = detector.predict(stripes(98, 64, 64)[None])[0]
        scores[resize] = float(detector.predict(wide[None])[0] / normal_score)
    assert scores["keep_aspect"] < 1.5 < scores["square"], scores


def test_square_and_keep_aspect_agree_on_equal_square_images():
    train = ListDataset([normal_image(i) for i in range(6)])
    test = torch.stack([normal_image(50), with_defect(normal_image(51))[0]])
    results = []
    for resize in ("keep_aspect", "square"):
        config = MemoryBankConfig(image_size=SIZE, resize=resize, coreset_ratio=0.5, calibration_ratio=0.2)
        detector = MemoryBankDetector(config, progress=False).fit(train)
        results.append(detector.predict(test))
        assert detector.input_size(SIZE, SIZE) == (SIZE, SIZE)
    torch.testing.assert_close(results[0], results[1])
    assert MemoryBankDetector(MemoryBankConfig(image_size=SIZE, resize="square")).dataset_image_size == SIZE


def test_predict_each_and_evaluate_take_images_of_mixed_sizes():
    from slsg.detectors.evaluation import evaluate

    config = MemoryBankConfig(image_size=SIZE, coreset_ratio=None, calibration_ratio=0.0, weights=None)
    detector = MemoryBankDetector(config, progress=False).fit(
        ListDataset([stripes(i, h, w) for i, (h, w) in enumerate(MIXED_SIZES)]))
    images = [stripes(60, 64, 64), stripes(61, 64, 64), stripes(62, 48, 96), stripes(63, 64, 64)]
    scores, maps = detector.predict_each(images)
    assert [tuple(m.shape) for m in maps] == [(64, 64), (64, 64), (48, 96), (64, 64)]
    for image, score, amap in zip(images, scores, maps):
        s, m = detector.predict(image[None])
        torch.testing.assert_close(score, s[0])
        torch.testing.assert_close(amap, m[0])
    ev = evaluate(detector, ListDataset(images), batch_size=3, progress=False, compute=False)
    np.testing.assert_allclose(ev.scores, scores.double().numpy(), rtol=1e-6)
    assert [m.shape for m in ev.maps] == [(64, 64), (64, 64), (48, 96), (64, 64)]


def test_keep_aspect_model_without_input_scale_is_rejected(tmp_path):
    config = MemoryBankConfig(image_size=SIZE, coreset_ratio=None, calibration_ratio=0.0, weights=None)
    detector = MemoryBankDetector(config, progress=False).fit(ListDataset([normal_image(0), normal_image(1)]))
    detector.save(tmp_path)
    meta = json.loads((tmp_path / "detector.json").read_text())
    assert load_detector(tmp_path).input_size(SIZE, 2 * SIZE) == (SIZE, 2 * SIZE)
    del meta["fit_info"]["input_scale"]
    (tmp_path / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="input_scale"):
        load_detector(tmp_path)


def test_score_reweighting_matches_patchcore_formula(fitted):
    """score_reweight=b scales the map maximum by PatchCore's weight, computed here by brute force
    from the embeddings and the whole bank (cdist, argsort) rather than through the bank search."""
    import copy
    detector = copy.copy(fitted)
    detector.config = MemoryBankConfig(**{**fitted.config.__dict__, "score_reweight": 4})
    anomalous, _ = with_defect(normal_image(200))
    images = torch.stack([normal_image(201), anomalous])
    plain, maps = fitted.predict(images)
    weighted, maps_w = detector.predict(images)
    torch.testing.assert_close(maps_w, maps)  # the map is unchanged
    bank = fitted.bank.features
    emb = fitted.embed(images).flatten(1, 2)  # [B, P, D]
    for b in range(2):
        d_all = torch.cdist(emb[b].double(), bank.double())  # [P, N]
        # the most anomalous patch: the largest nearest distance over its edge class's level
        levels = fitted.edge_levels[edge_classes(SIZE // 8, SIZE // 8, fitted.config.edge_band)].flatten()
        worst = (d_all.min(1).values / levels.double()).argmax()
        m_star = d_all[worst].argmin()
        support = torch.cdist(bank[m_star][None].double(), bank.double())[0].argsort()[:4]
        assert support[0] == m_star
        d = d_all[worst, support]
        weight = 1 - torch.softmax(d, 0)[0]
        assert 0 < weight < 1
        torch.testing.assert_close(weighted[b].double(), plain[b].double() * weight, rtol=1e-4, atol=1e-6)


def test_score_reweight_rejects_one_neighbour():
    with pytest.raises(ValueError, match="score_reweight"):
        MemoryBankConfig(score_reweight=1)


def test_bad_threshold_quantile_fails_before_any_work():
    with pytest.raises(ValueError, match=r"threshold_quantile must lie in \(0, 1\], got 1.5"):
        MemoryBankConfig(threshold_quantile=1.5)


def test_threshold_from_very_few_normal_images_warns():
    config = MemoryBankConfig(image_size=SIZE, coreset_ratio=0.5, calibration_ratio=0.2, weights=None)
    with pytest.warns(UserWarning, match=r"threshold comes from only 2 held-out normal image\(s\) of 10"):
        MemoryBankDetector(config, progress=False).fit(ListDataset([normal_image(i) for i in range(10)]))
