import numpy as np
import pytest
import torch

from slsg.data.synthesis import AnomalySynthesizer, get_preset
from slsg.detectors import MemoryBankConfig, MemoryBankDetector
from slsg.detectors.validation import SimulatedValidationSet, simulated_validation

from test_memory_bank import ListDataset, normal_image


@pytest.fixture(scope="module")
def synthesizer():
    return AnomalySynthesizer(get_preset("texture"))  # procedural textures: no files needed


def test_validation_set_pairs_each_normal_image_with_a_seeded_anomaly(synthesizer):
    normals = ListDataset([normal_image(i) for i in range(3)])
    val = SimulatedValidationSet(normals, synthesizer, seed=5, branch="texture")
    assert len(val) == 6 and [val[i]["label"] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    for i in range(3):
        torch.testing.assert_close(val[i]["image"], normals[i]["image"])
        assert not val.full_mask(i).any()
        anomaly = val[3 + i]
        mask = val.full_mask(3 + i)
        assert mask.any() and mask.shape == normals[i]["image"].shape[-2:]
        changed = (anomaly["image"] - normals[i]["image"]).abs().amax(0).numpy() > 1e-6
        assert changed[~mask].sum() == 0  # only the masked pixels differ
        torch.testing.assert_close(anomaly["image"], val[3 + i]["image"])  # the same every call
    other = SimulatedValidationSet(normals, synthesizer, seed=6, branch="texture")
    assert not torch.equal(other[3]["image"], val[3]["image"])
    with pytest.raises(IndexError):
        val[6]


def test_simulated_validation_fits_on_the_rest_and_scores_the_held_out_images(synthesizer):
    normals = ListDataset([normal_image(i) for i in range(10)])
    config = MemoryBankConfig(image_size=64, coreset_ratio=None, calibration_ratio=0.0)
    detector, ev = simulated_validation(lambda: MemoryBankDetector(config, progress=False), normals,
                                        synthesizer, holdout_ratio=0.2, seed=0, branch="texture")
    assert detector.fit_info["train_images"] == 8
    assert len(ev.scores) == 4 and ev.labels.tolist() == [0, 0, 1, 1]
    assert sum(m.sum() for m in ev.masks) > 0
    # the held-out images are unseen: their distances to the bank are not zero
    assert (ev.scores[:2] > 0).all()
    assert ev.metrics["image_auroc"] == 1.0  # pasted textures on a smooth product are obvious
    with pytest.raises(ValueError, match="holdout_ratio"):
        simulated_validation(lambda: MemoryBankDetector(config), normals, synthesizer, holdout_ratio=0.01)
