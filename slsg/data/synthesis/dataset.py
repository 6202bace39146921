"""Seeding that is safe across DataLoader workers, and a dataset of simulated anomalies.

Each item gets its own generator seeded from a hash of (seed, epoch, index). The
anomaly of an item therefore depends only on those three numbers: not on which
worker loads it, how many workers there are, or in what order items are read. Two
workers can never replay the same stream, and an anomaly seen in a log can be
regenerated from its (seed, epoch, index).
"""
from __future__ import annotations

import hashlib
import operator
import struct
from typing import Any

import torch
from torch.utils.data import Dataset

from .synthesizer import AnomalySynthesizer

__all__ = ["derive_seed", "item_generator", "worker_generator", "SimulatedAnomalyDataset"]


def _integer(value: Any, requirement: str) -> int:
    """``value`` as an int: any integer-like (numpy integers, one-element integer tensors)
    is accepted, as samplers and Subset pass them; bools are refused. ``requirement``
    opens the error message."""
    boolean = isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)
    try:
        if not boolean:
            return operator.index(value)
    except TypeError:
        pass
    raise TypeError(f"{requirement}, got {type(value).__name__} {value!r}")


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from a tuple of ints (or integer-likes) and strings (BLAKE2b; stable
    across runs and platforms)."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        if isinstance(part, str):
            data = part.encode("utf-8")
        else:
            data = str(_integer(part, "seed parts must be ints or strings")).encode("ascii")
        h.update(struct.pack("<I", len(data)) + data)  # length prefix: ("1", "23") != ("12", "3")
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def _generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def item_generator(seed: int, epoch: int, index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator for item ``index`` of ``epoch`` under base ``seed``."""
    return _generator(derive_seed("item", seed, epoch, index), device)


def worker_generator(
    base_seed: int, worker_id: int, epoch: int = 0, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A generator for one DataLoader worker in one epoch (for code that keeps a stream per worker).

    Use it in ``worker_init_fn`` with ``torch.utils.data.get_worker_info().id``.
    Prefer ``SimulatedAnomalyDataset`` (per-item generators) when results must not
    depend on the number of workers.
    """
    return _generator(derive_seed("worker", base_seed, epoch, worker_id), device)


def _image_of(item: Any, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
    if isinstance(item, torch.Tensor):
        return item, {}
    if isinstance(item, dict) and isinstance(item.get("image"), torch.Tensor):
        return item["image"], item
    raise TypeError(f"normal dataset item {index} must be an image tensor or a dict with an 'image' tensor, "
                    f"got {type(item).__name__}")


class SimulatedAnomalyDataset(Dataset):
    """Wrap a dataset of normal images; item i is a simulated anomaly of normal image i.

    Items are dicts: ``image`` (augmented, float [3, S, S]), ``mask`` (float [1, S, S]),
    ``label`` 1, ``normal_image`` (the untouched input), ``path``, ``defect_type``
    ("simulated_texture" / "simulated_self"), ``kind`` ("structural" / "logical"),
    ``branch``, ``beta``. With ``use_other_normal`` the self-content branch may take
    its content from another random normal image of the same dataset.

    Call ``set_epoch(e)`` before each epoch so every epoch shows new anomalies. With
    ``persistent_workers=True`` the workers keep their own copy of the dataset and
    do not see the change; keep persistent workers off, or pass the epoch some
    other way.
    """

    def __init__(
        self,
        normal_dataset: Dataset,
        synthesizer: AnomalySynthesizer,
        seed: int = 0,
        use_other_normal: bool = True,
        epoch: int = 0,
    ) -> None:
        if not isinstance(synthesizer, AnomalySynthesizer):
            raise TypeError(f"synthesizer must be an AnomalySynthesizer, got {type(synthesizer).__name__}")
        if len(normal_dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("normal_dataset is empty")
        self.normal_dataset = normal_dataset
        self.synthesizer = synthesizer
        self.seed = int(seed)
        self.use_other_normal = use_other_normal
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.normal_dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = _integer(index, "a SimulatedAnomalyDataset index must be an int")
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        image, meta = _image_of(self.normal_dataset[index], index)
        generator = item_generator(self.seed, self.epoch, index)
        other_loader = None
        if self.use_other_normal and n > 1:
            # The partner is drawn from its own stream, so whether it is loaded
            # does not shift the synthesis stream.
            pick = item_generator(derive_seed("other", self.seed), self.epoch, index)
            j = int(torch.randint(0, n - 1, (), generator=pick))
            j += j >= index  # any index but this one

            def other_loader() -> torch.Tensor:
                return _image_of(self.normal_dataset[j], j)[0]

        result = self.synthesizer.sample(image, generator, other_normal=other_loader)
        return {
            "image": result.image,
            "mask": result.mask,
            "label": 1,
            "normal_image": image,
            "path": str(meta.get("path", "")),
            "defect_type": f"simulated_{result.branch}",
            "kind": result.kind,
            "branch": result.branch,
            "beta": result.beta,
        }
