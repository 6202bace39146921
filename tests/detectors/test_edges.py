"""Edge levels: every patch distance divided by the held-out normal level of its offset from the edges."""
import json

import numpy as np
import pytest
import torch

from slsg.detectors import MemoryBankConfig, MemoryBankDetector, ModelError, load_detector
from slsg.detectors.edges import band_of_levels, divide_by_edge_levels, edge_classes, estimate_edge_levels

from test_memory_bank import SIZE, ListDataset, normal_image, with_defect


def brute_force_class(r: int, c: int, h: int, w: int, band: int) -> tuple[int, int]:
    """(row offset, column offset) of a cell: the distance to the nearer edge, and which edge."""
    def offset(i: int, length: int) -> int:
        to_first, to_last = i, length - 1 - i
        if min(to_first, to_last) >= band:
            return band  # interior
        if to_first <= to_last:
            return to_first  # 0 on the first edge, band - 1 just inside it
        return 2 * band - to_last  # 2 * band on the last edge, band + 1 just inside it
    return offset(r, h), offset(c, w)


def test_edge_classes_of_grids_shorter_than_twice_the_band():
    # band 4: a 6-cell side has no interior; its last three cells belong to the far edge
    assert edge_classes(1, 6, 4)[0].tolist() == [0, 1, 2, 6, 7, 8]
    assert edge_classes(1, 4, 4)[0].tolist() == [0, 1, 7, 8]
    assert edge_classes(1, 5, 4)[0].tolist() == [0, 1, 2, 7, 8]
    assert edge_classes(1, 9, 4)[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("h,w,band", [(9, 13, 2), (3, 20, 4), (1, 1, 1), (34, 16, 4), (8, 8, 4), (7, 7, 3), (6, 5, 4), (40, 33, 20)])
def test_edge_classes_match_case_by_case_offsets(h, w, band):
    classes = edge_classes(h, w, band)
    assert classes.shape == (h, w) and classes.dtype == torch.int64
    for r in range(h):
        for c in range(w):
            dy, dx = brute_force_class(r, c, h, w, band)
            assert classes[r, c] == dy * (2 * band + 1) + dx
    assert 0 <= int(classes.min()) and int(classes.max()) < (2 * band + 1) ** 2


def test_images_of_different_sizes_share_edge_classes():
    small, large = edge_classes(10, 12, 3), edge_classes(30, 50, 3)
    # the top-left corner, the last column and the interior mean the same in both
    assert small[0, 0] == large[0, 0] and small[1, -1] == large[1, -1] and small[2, -2] == large[2, -2]
    assert small[5, 6] == large[15, 25] == 3 * 7 + 3


def test_levels_are_per_class_means_with_fallbacks():
    g = torch.Generator().manual_seed(0)
    band = 2
    maps = [torch.rand(4, 9, generator=g) + 0.5, torch.rand(3, 4, generator=g) + 0.5, torch.rand(2, 7, generator=g)]
    levels = estimate_edge_levels(maps, band)
    assert levels.shape == ((2 * band + 1) ** 2,) and levels.dtype == torch.float32
    sums, counts = {}, {}
    for m in maps:
        h, w = m.shape
        for r in range(h):
            for c in range(w):
                key = brute_force_class(r, c, h, w, band)
                sums[key] = sums.get(key, 0.0) + float(m[r, c])
                counts[key] = counts.get(key, 0) + 1
    # maps of at most 4 rows have no interior row (band 2), so no interior cell: the floor is the
    # mean over all cells, and the classes of interior rows take it
    assert all(dy != band for dy, _ in counts) and len(counts) == 4 * (2 * band + 1)
    floor = sum(sums.values()) / sum(counts.values())
    raised = 0
    for dy in range(2 * band + 1):
        for dx in range(2 * band + 1):
            mean = sums[(dy, dx)] / counts[(dy, dx)] if (dy, dx) in counts else floor
            raised += mean < floor
            assert levels[dy * (2 * band + 1) + dx].item() == pytest.approx(max(mean, floor), rel=1e-6)
    assert raised > 0  # some classes' means lie below the floor: they were raised to it


def test_levels_never_fall_below_the_interior_level():
    """Calm edges (an object's plain background) keep the interior's level: the division only
    discounts edges noisier than the interior, it never amplifies calm ones."""
    dist = torch.full((12, 12), 2.0)
    dist[0, :] = 5.0   # a noisy top edge
    dist[-1, :] = 0.1  # a calm bottom edge
    levels = estimate_edge_levels([dist], 3)
    classes = edge_classes(12, 12, 3)
    assert levels[classes[0, 5]] == 5.0 and levels[classes[-1, 5]] == 2.0 and levels[classes[6, 6]] == 2.0
    assert levels[classes[0, 0]] == 5.0 and levels[classes[-1, 0]] == 2.0


def test_zero_levels_fall_back_and_all_zero_maps_give_none():
    maps = [torch.zeros(5, 5)]
    maps[0][2, 2] = 3.0  # only the interior cell (band 2) is positive: every level takes its 3
    assert (estimate_edge_levels(maps, 2) == 3.0).all()
    maps[0][2, 2] = 0.0
    maps[0][0, 0] = 3.0  # an interior level of 0 cannot be divided by
    assert estimate_edge_levels(maps, 2) is None
    assert estimate_edge_levels([torch.zeros(4, 4)], 2) is None
    assert estimate_edge_levels([], 2) is None
    with pytest.raises(ValueError, match="band"):
        estimate_edge_levels(maps, 0)
    with pytest.raises(ValueError, match=r"\[h, w\]"):
        estimate_edge_levels([torch.ones(1, 4, 4)], 2)


def test_divide_by_edge_levels_divides_each_cell_by_its_class_level():
    g = torch.Generator().manual_seed(1)
    levels = torch.rand(25, generator=g) + 0.5
    dist = torch.rand(2, 6, 11, generator=g)
    out = divide_by_edge_levels(dist, levels)  # 25 levels: band 2
    for r in range(6):
        for c in range(11):
            dy, dx = brute_force_class(r, c, 6, 11, 2)
            torch.testing.assert_close(out[:, r, c], dist[:, r, c] / levels[dy * 5 + dx])


def test_band_of_levels_needs_a_square_of_an_odd_number():
    assert band_of_levels(torch.ones(9)) == 1 and band_of_levels(torch.ones(81)) == 4
    for bad in (1, 4, 16, 80):
        with pytest.raises(ValueError, match="number"):
            band_of_levels(torch.ones(bad))


def framed_image(seed: int) -> torch.Tensor:
    """A normal image whose 8 px frame is different noise in every image (like a tile's rim cut
    at a different place in every crop): the interior is calm, the edge is not."""
    g = torch.Generator().manual_seed(10_000 + seed)
    image = normal_image(seed)
    frame = torch.ones(SIZE, SIZE, dtype=torch.bool)
    frame[8:-8, 8:-8] = False
    strength = 0.2 + 0.3 * torch.rand(1, generator=g)
    image[:, frame] = (0.5 + strength * (torch.rand(1, SIZE, SIZE, generator=g) - 0.5))[:, frame].expand(3, -1)
    return image


def fit_framed(edge_band: int) -> MemoryBankDetector:
    config = MemoryBankConfig(image_size=SIZE, coreset_ratio=None, calibration_ratio=0.4, edge_band=edge_band)
    return MemoryBankDetector(config, progress=False).fit(ListDataset([framed_image(i) for i in range(15)]))


@pytest.fixture(scope="module")
def framed_model() -> MemoryBankDetector:
    return fit_framed(3)


def test_edge_levels_keep_a_noisy_frame_from_outscoring_interior_defects():
    normals = torch.stack([framed_image(i) for i in range(100, 106)])
    defects = torch.stack([with_defect(framed_image(i), size=6)[0] for i in range(200, 206)])
    margins = {}
    for band in (0, 3):  # 3: the 8 x 8 grid of these 64 px images keeps 2 x 2 interior cells
        detector = fit_framed(band)
        assert (detector.edge_levels is None) == (band == 0)
        normal_scores, normal_maps = detector.predict(normals)
        defect_scores, _ = detector.predict(defects)
        margins[band] = float(defect_scores.min() / normal_scores.max())
        if band:
            assert detector.fit_info["edge_levels"] == detector.edge_levels.tolist()
            # the frame's cells lie further from the bank: their level is above the interior's
            assert detector.edge_levels[0] > detector.edge_levels[3 * 7 + 3]
    # without edge levels the noisy frame of some normal image outscores a small interior defect
    assert margins[0] < 1 < margins[3], margins


def test_edge_levels_are_estimated_on_the_held_out_images(tmp_path):
    detector = fit_framed(3)
    held_out = [framed_image(i) for i in detector.fit_info["calibration_indices"]]
    raw = [detector.patch_distances(x[None])[0] for x in held_out]
    # (fit scores the held-out images in batches, here one by one: float32 convolutions round differently)
    torch.testing.assert_close(detector.edge_levels, estimate_edge_levels(raw, 3), rtol=1e-5, atol=1e-4)
    # predict divides the same raw distances: a detector with levels of 1 gives the undivided map
    image = framed_image(300)[None]
    _, divided = detector.predict(image)
    levels = detector.edge_levels
    detector.edge_levels = torch.ones_like(levels)
    _, undivided = detector.predict(image)
    detector.edge_levels = levels
    assert not torch.allclose(divided, undivided)
    # save and load keep the levels; a model saved without them (older slsg) scores raw distances
    model = detector.save(tmp_path / "model")
    loaded = load_detector(model)
    torch.testing.assert_close(loaded.edge_levels, levels)
    torch.testing.assert_close(loaded.predict(image)[1], divided)
    meta = json.loads((model / "detector.json").read_text())
    del meta["fit_info"]["edge_levels"]
    (model / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="lacks edge_levels"):  # fit always writes the key
        load_detector(model)
    del meta["config"]["edge_band"]  # as slsg saved models before edge levels
    (model / "detector.json").write_text(json.dumps(meta))
    old = load_detector(model)
    assert old.edge_levels is None and old.config.edge_band == 0
    torch.testing.assert_close(old.predict(image)[1], undivided)
    resaved = load_detector(old.save(tmp_path / "resaved"))  # and a copy saved by this slsg loads
    assert resaved.edge_levels is None and resaved.config.edge_band == 0


def test_changing_edge_band_after_fit_changes_nothing_and_cannot_be_saved(framed_model, tmp_path):
    import copy
    detector = copy.deepcopy(framed_model)
    image = framed_image(301)[None]
    scores, maps = detector.predict(image)
    for band in (0, 2, 5):
        detector.config.edge_band = band  # the levels keep the band they were fitted with
        s2, m2 = detector.predict(image)
        torch.testing.assert_close(s2, scores)
        torch.testing.assert_close(m2, maps)
        with pytest.raises(RuntimeError, match=r"edge_band \(%d\) differs" % band):
            detector.save(tmp_path / "model")
    detector.config.edge_band = 3
    assert load_detector(detector.save(tmp_path / "model")).edge_levels is not None


def test_threshold_uses_leave_one_out_levels_with_mixed_sizes_and_reweighting():
    """Held-out images of several sizes (scored one by one) with PatchCore's reweighting, which
    needs the worst patch's embedding: the threshold matches scoring each held-out image with the
    levels of the others, recomputed here through predict."""
    sizes = [(64, 64), (64, 96), (80, 64)]
    images = [torch.nn.functional.interpolate(framed_image(i)[None], size=sizes[i % 3], mode="bilinear")[0]
              for i in range(15)]
    config = MemoryBankConfig(image_size=SIZE, coreset_ratio=None, calibration_ratio=0.4, edge_band=3,
                              score_reweight=3, threshold_quantile=0.8)
    detector = MemoryBankDetector(config, progress=False).fit(ListDataset(images))
    held_out = [images[i] for i in detector.fit_info["calibration_indices"]]
    assert len({x.shape for x in held_out}) > 1
    raw = [detector.patch_distances(detector.resize_to_input(x[None]))[0] for x in held_out]
    levels, scores = detector.edge_levels, []
    try:
        for i, x in enumerate(held_out):
            detector.edge_levels = estimate_edge_levels(raw[:i] + raw[i + 1:], 3)
            scores.append(float(detector.predict(x[None])[0]))
    finally:
        detector.edge_levels = levels
    assert detector.image_threshold == pytest.approx(float(np.quantile(scores, 0.8)), rel=1e-5)
    assert detector.fit_info["calibration_score_max"] == pytest.approx(max(scores), rel=1e-5)
    # scoring each image with all levels, its own included, gives lower scores: the bias avoided
    own = [float(detector.predict(x[None])[0]) for x in held_out]
    assert np.mean(own) < np.mean(scores)


def test_one_held_out_image_gives_no_edge_levels():
    config = MemoryBankConfig(image_size=SIZE, coreset_ratio=None, calibration_ratio=0.2)
    with pytest.warns(UserWarning, match=r"edge levels \(edge_band=4\) are off .* 1 of 5 were held out"):
        detector = MemoryBankDetector(config, progress=False).fit(ListDataset([framed_image(i) for i in range(5)]))
    assert detector.fit_info["calibration_images"] == 1
    assert detector.edge_levels is None and detector.fit_info["edge_levels"] is None


@pytest.mark.parametrize("levels,match", [
    ([1.0] * 48, "list of 49 numbers"),
    ("1.0", "list of 49 numbers"),
    ([1.0] * 48 + ["x"], "list of 49 numbers"),
    ([1.0] * 48 + [True], "list of 49 numbers"),
    ([1.0] * 48 + [0.0], "finite and positive"),
    ([1.0] * 48 + [-2.0], "finite and positive"),
    ([1.0] * 48 + [float("nan")], "finite and positive"),
])
def test_tampered_edge_levels_are_rejected_on_load(framed_model, tmp_path, levels, match):
    model = framed_model.save(tmp_path / "model")
    meta = json.loads((model / "detector.json").read_text())
    meta["fit_info"]["edge_levels"] = levels
    (model / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=match):
        load_detector(model)


def test_levels_with_edge_band_zero_are_rejected_on_load(framed_model, tmp_path):
    model = framed_model.save(tmp_path / "model")
    meta = json.loads((model / "detector.json").read_text())
    meta["config"]["edge_band"] = 0
    (model / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="edge_band is 0"):
        load_detector(model)


def test_edge_band_validation_and_no_levels_without_held_out_images():
    with pytest.raises(ValueError, match="edge_band"):
        MemoryBankConfig(edge_band=-1)
    config = MemoryBankConfig(image_size=SIZE, coreset_ratio=None, calibration_ratio=0.0)
    with pytest.warns(UserWarning, match="edge levels .* are off .* 0 of 4 were held out"):
        detector = MemoryBankDetector(config, progress=False).fit(ListDataset([framed_image(i) for i in range(4)]))
    assert detector.edge_levels is None and detector.fit_info["edge_levels"] is None


def test_class_maxima_hold_the_argmax_under_any_levels():
    from slsg.detectors.memory_bank import _class_maxima
    g = torch.Generator().manual_seed(3)
    for h, w, band in ((9, 13, 2), (4, 6, 4), (8, 8, 3)):
        dist = torch.randint(0, 4, (h, w), generator=g).float()  # many ties
        rows = _class_maxima(dist, band)
        classes = edge_classes(h, w, band).reshape(-1)
        assert len(rows) == len(set(classes.tolist()))  # one cell per class present
        for _ in range(20):
            levels = torch.rand((2 * band + 1) ** 2, generator=g) + 0.5
            worst = int((dist.reshape(-1) / levels[classes]).argmax())
            assert worst in rows.tolist()
        assert _class_maxima(dist, 0).tolist() == [int(dist.reshape(-1).argmax())]
    # Near ties: distances one float32 ulp apart can divide to the same value, and argmax then
    # takes the earlier cell even where it held the smaller distance.
    for _ in range(200):
        h, w, band = 6, 7, 1
        dist = torch.full((h, w), 20.0) + torch.rand(h, w, generator=g)
        classes = edge_classes(h, w, band).reshape(-1)
        flat = dist.reshape(-1)
        for c in classes.unique():  # each class: its maximum, and an earlier cell one ulp below
            cells = (classes == c).nonzero()[:, 0]
            if len(cells) > 1:
                top = flat[cells].max()
                flat[cells[-1]] = top + 1
                flat[cells[0]] = torch.nextafter(top + 1, torch.tensor(0.0))
        rows = _class_maxima(dist, band).tolist()
        levels = torch.rand((2 * band + 1) ** 2, generator=g) + 0.5
        worst = int(divide_by_edge_levels(dist[None], levels)[0].reshape(-1).argmax())
        assert worst in rows
