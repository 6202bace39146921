import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from slsg.data.synthesis import (AnomalySynthesizer, SimulatedAnomalyDataset, derive_seed, item_generator,
                                 worker_generator)

from synthesis_helpers import smooth_image


class Normals(torch.utils.data.Dataset):
    """A tiny dataset of normal images in the slsg item format."""

    def __init__(self, n=6, size=48):
        self.images = [smooth_image(size, i) for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "mask": torch.zeros(1, 48, 48), "label": 0, "path": f"img{i}.png"}


def test_derive_seed_is_stable_and_separates_parts():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    assert len({derive_seed(1, 2, 3), derive_seed(1, 2, 4), derive_seed(1, 3, 2), derive_seed(12, 3),
                derive_seed(1, 23), derive_seed("item", 1, 2, 3)}) == 6
    assert 0 <= derive_seed(0) < 2**63
    with pytest.raises(TypeError):
        derive_seed(1.5)


def test_generators_reproduce_and_differ():
    def draw(g):
        return torch.rand(8, generator=g)

    assert torch.equal(draw(item_generator(0, 0, 5)), draw(item_generator(0, 0, 5)))
    assert not torch.equal(draw(item_generator(0, 0, 5)), draw(item_generator(0, 0, 6)))
    assert not torch.equal(draw(item_generator(0, 0, 5)), draw(item_generator(0, 1, 5)))
    assert not torch.equal(draw(item_generator(0, 0, 5)), draw(item_generator(1, 0, 5)))
    assert torch.equal(draw(worker_generator(7, 1, 2)), draw(worker_generator(7, 1, 2)))
    assert not torch.equal(draw(worker_generator(7, 0)), draw(worker_generator(7, 1)))
    assert not torch.equal(draw(worker_generator(7, 0, 0)), draw(worker_generator(7, 0, 1)))


def test_items_reproducible_distinct_and_epoch_dependent():
    ds = SimulatedAnomalyDataset(Normals(), AnomalySynthesizer(), seed=3)
    a, b = ds[2], ds[2]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert a["label"] == 1 and a["path"] == "img2.png" and a["kind"] in ("structural", "logical")
    assert a["defect_type"] == f"simulated_{a['branch']}"
    assert torch.equal(a["normal_image"], smooth_image(48, 2))
    masks = [ds[i]["mask"] for i in range(len(ds))]
    assert all(not torch.equal(masks[i], masks[j]) for i in range(6) for j in range(i))
    ds.set_epoch(1)
    assert not torch.equal(ds[2]["mask"], a["mask"])
    other_seed = SimulatedAnomalyDataset(Normals(), AnomalySynthesizer(), seed=4)
    assert not torch.equal(other_seed[2]["mask"], a["mask"])


def test_workers_do_not_change_or_repeat_results():
    ds = SimulatedAnomalyDataset(Normals(), AnomalySynthesizer(), seed=0)
    serial = list(DataLoader(ds, batch_size=2, num_workers=0))
    parallel = list(DataLoader(ds, batch_size=2, num_workers=2))
    for s, p in zip(serial, parallel):
        assert torch.equal(s["image"], p["image"]) and torch.equal(s["mask"], p["mask"])
    masks = torch.cat([b["mask"] for b in parallel])
    # Items loaded by different workers never repeat each other's anomaly.
    assert all(not torch.equal(masks[i], masks[j]) for i in range(len(masks)) for j in range(i))


def test_plain_tensor_items_and_errors():
    ds = SimulatedAnomalyDataset([smooth_image(32, 0), smooth_image(32, 1)], AnomalySynthesizer(), seed=0)
    assert ds[-1]["image"].shape == (3, 32, 32) and ds[1]["path"] == ""
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(ValueError, match="empty"):
        SimulatedAnomalyDataset([], AnomalySynthesizer())
    with pytest.raises(TypeError, match="synthesizer"):
        SimulatedAnomalyDataset([smooth_image(32)], lambda x, g: x)
    with pytest.raises(TypeError, match="'image' tensor"):
        SimulatedAnomalyDataset([{"img": smooth_image(32)}], AnomalySynthesizer())[0]


def test_integer_like_indices_and_seed_parts():
    # Samplers and Subset(ds, np.arange(n)) hand out numpy integers, some code tensors.
    ds = SimulatedAnomalyDataset([smooth_image(32, i) for i in range(4)], AnomalySynthesizer(), seed=0)
    expected = ds[1]["image"]
    for index in (np.int64(1), np.uint8(1), torch.tensor(1), np.int32(-3)):
        assert torch.equal(ds[index]["image"], expected)
    assert torch.equal(Subset(ds, np.arange(4))[1]["image"], expected)
    assert derive_seed("item", np.int64(5), torch.tensor(2)) == derive_seed("item", 5, 2)
    for bad in (1.0, True, np.bool_(True), torch.tensor(True), torch.tensor(1.0), "1", None):
        with pytest.raises(TypeError, match="index must be an int"):
            ds[bad]
    for bad in (1.5, True, torch.tensor(True), None):
        with pytest.raises(TypeError, match="seed parts must be ints or strings"):
            derive_seed("item", bad)
