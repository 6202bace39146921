import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from slsg.detectors.base import Detector
from slsg.detectors.evaluation import compute_metrics, evaluate, measure_throughput

SIZE = 32


class BrightnessDetector(Detector):
    """A stand-in detector whose map is the image brightness: metrics become predictable."""

    kind = "brightness"

    def __init__(self):
        super().__init__(config=None)
        self.image_threshold = 0.5

    def fit(self, dataset):
        return self

    def predict(self, images):
        maps = images.mean(1)
        return maps.flatten(1).max(1).values, maps

    def _is_fitted(self):
        return True

    def _save_weights(self, directory, token):
        return {}

    def _load_weights(self, directory, files):
        pass


class SizedDataset(torch.utils.data.Dataset):
    """Images of different original sizes (like MTD) served resized to SIZE, with full-size masks."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.sizes = [(40, 60), (50, 50), (64, 48), (40, 40), (48, 72), (36, 36)]
        self.labels = [0, 0, 1, 1, 1, 0]
        self.originals, self.masks = [], []
        for (h, w), label in zip(self.sizes, self.labels):
            image = rng.uniform(0.1, 0.4, size=(h, w)).astype(np.float32)
            mask = np.zeros((h, w), dtype=bool)
            if label:
                mask[h // 4: h // 2, w // 3: w // 2] = True
                image[mask] = 0.9
            self.originals.append(image)
            self.masks.append(mask)

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        image = torch.from_numpy(self.originals[i])[None, None]
        image = F.interpolate(image, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0].repeat(3, 1, 1)
        return {"image": image, "label": self.labels[i], "path": f"/data/img{i}.png",
                "defect_type": "spot" if self.labels[i] else "good",
                "kind": "structural" if self.labels[i] else "good"}

    def full_mask(self, i):
        return self.masks[i]


def test_maps_come_back_at_original_resolution_and_metrics_match_independent_ones():
    dataset = SizedDataset()
    ev = evaluate(BrightnessDetector(), dataset, batch_size=4, progress=False)
    assert [m.shape for m in ev.maps] == dataset.sizes
    assert [m.shape for m in ev.masks] == dataset.sizes
    assert ev.labels.tolist() == dataset.labels and ev.kinds[2] == "structural"
    assert ev.predict_seconds > 0 and ev.images_per_second > 0
    m = ev.metrics
    assert m["image_auroc"] == pytest.approx(roc_auc_score(dataset.labels, ev.scores))
    pixels = np.concatenate([x.ravel() for x in ev.maps])
    truth = np.concatenate([x.ravel() for x in dataset.masks])
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(truth, pixels))
    assert m["pixel_auroc"] > 0.9 and 0 < m["aupro"] <= 1 and 0 < m["f1_max"] <= 1
    assert m["threshold"] == 0.5 and m["tpr_at_threshold"] == 1.0
    assert m["image_auroc_by_defect"] == {"spot": m["image_auroc"]}


def test_subset_of_a_dataset_keeps_its_masks():
    dataset = SizedDataset()
    subset = torch.utils.data.Subset(dataset, [1, 2, 4])
    ev = evaluate(BrightnessDetector(), subset, batch_size=2, progress=False)
    assert [m.shape for m in ev.masks] == [dataset.sizes[i] for i in (1, 2, 4)]
    assert ev.masks[1].sum() == dataset.masks[2].sum()


def test_undefined_metrics_are_none():
    dataset = SizedDataset()
    good_only = torch.utils.data.Subset(dataset, [0, 1, 5])
    ev = evaluate(BrightnessDetector(), good_only, progress=False)
    assert ev.metrics["image_auroc"] is None and ev.metrics["pixel_auroc"] is None
    assert compute_metrics(ev)["aupro"] is None


def test_measure_throughput_is_positive():
    assert measure_throughput(BrightnessDetector(), torch.rand(1, 3, SIZE, SIZE), repeats=3, warmup=1) > 0


@pytest.mark.parametrize("kwargs,match", [(dict(repeats=0), "repeats must be an int >= 1"),
                                          (dict(repeats=-1), "repeats"), (dict(warmup=-1), "warmup")])
def test_measure_throughput_rejects_nonsense(kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure_throughput(BrightnessDetector(), torch.rand(1, 3, SIZE, SIZE), **kwargs)
    with pytest.raises(ValueError, match="non-empty batch"):
        measure_throughput(BrightnessDetector(), torch.rand(0, 3, SIZE, SIZE))


def test_mask_files_that_mark_nothing_are_reported(tmp_path):
    # An all-black mask file (a mistake in export, or MTD's four empty masks): the image's pixels
    # silently counted as normal.
    from PIL import Image

    from slsg.data import Folder

    for folder in ("good", "bad", "masks", "bad_unannotated"):
        (tmp_path / folder).mkdir()
    for i in range(3):
        Image.new("RGB", (SIZE, SIZE), (40, 40, 40)).save(tmp_path / "good" / f"g{i}.png")
    for name in ("a", "b"):
        Image.new("RGB", (SIZE, SIZE), (200, 40, 40)).save(tmp_path / "bad" / f"{name}.png")
        Image.new("RGB", (SIZE, SIZE), (200, 40, 40)).save(tmp_path / "bad_unannotated" / f"{name}.png")
    marked = np.zeros((SIZE, SIZE), dtype=np.uint8)
    marked[4:9, 4:9] = 255
    Image.fromarray(marked).save(tmp_path / "masks" / "a.png")
    Image.fromarray(np.zeros((SIZE, SIZE), dtype=np.uint8)).save(tmp_path / "masks" / "b.png")
    test = Folder(tmp_path / "good", abnormal_dir=tmp_path / "bad", mask_dir=tmp_path / "masks", split="test",
                  test_normal_ratio=0.5, image_size=None)
    with pytest.warns(UserWarning, match=r"1 test image\(s\) have ground-truth mask files with no marked pixel .*b.png"):
        evaluate(BrightnessDetector(), test, batch_size=2)
    # Without masks at all there is nothing to report.
    import warnings

    plain = Folder(tmp_path / "good", abnormal_dir=tmp_path / "bad_unannotated", split="test", test_normal_ratio=0.5,
                   image_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(BrightnessDetector(), plain, batch_size=2)
