"""MemoryBank: the memory of normal features, searched for the nearest normal feature.

In SLSG terms each stored feature is the centre of a small hypersphere around normal
data; the squared distance to the nearest centre is the anomaly score of a query.
"""
from __future__ import annotations

import io
import json
import math
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import ops
from .ops import reference
from .ops._validate import check_int, check_tensor
from .utils import abs_peak, all_finite, atomic_path, squared_norms_fit_float32

BACKENDS = ("auto", "kernel", "faiss", "torch")
INDEX_TYPES = ("flat", "ivfpq")
FILE_NAME = "memory_bank.npz"
FORMAT_VERSION = 1


@dataclass
class IndexConfig:
    """How the bank is searched. "flat" is exact; "ivfpq" is faiss's approximate
    inverted-file product-quantiser index for banks of millions of vectors."""

    kind: str = "flat"
    nlist: int | None = None  # IVF cells; default ~4 sqrt(N)
    m: int | None = None  # PQ sub-quantisers; default D/8 rounded to a divisor of D
    nbits: int = 8
    nprobe: int = 16

    def __post_init__(self) -> None:
        # faiss takes these unchecked: nbits = 0 crashed the process in a test.
        if self.kind not in INDEX_TYPES:
            raise ValueError(f"IndexConfig: kind must be one of {INDEX_TYPES}, got {self.kind!r}")
        for name, low, high, optional in (("nlist", 1, 1 << 24, True), ("m", 1, 1 << 16, True),
                                          ("nbits", 1, 16, False), ("nprobe", 1, 1 << 24, False)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"IndexConfig: {name} must be an int in [{low}, {high}]"
                                 f"{' or None' if optional else ''}, got {value!r}")


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("MemoryBank backend 'faiss' needs faiss: pip install faiss-cpu") from exc
    return faiss


class MemoryBank:
    """Normal features ``[N, D]`` (float32) with exact or approximate nearest search.

    Backends: "kernel" (slsg.ops.sphere_distance, compiled or reference), "faiss",
    "torch" (the pure-PyTorch reference), "auto" (kernel for exact search, faiss for
    IVF-PQ). Exact backends return the same neighbours. They compute ||x||^2 + ||c||^2 - 2 x.c
    in float32 (like faiss's BLAS path and torch.cdist), searching relative to the bank's mean
    when one common offset dominates the features; where the features' norms still dwarf the
    distances between neighbours (several clusters far apart, e.g. 100 times their spread),
    float32 rounding can swap near neighbours.

    Float32 features already on ``device`` are kept without a copy (banks can be large):
    modifying them in place afterwards leaves the bank's search state stale.
    """

    def __init__(
        self,
        features: torch.Tensor,
        *,
        backend: str = "auto",
        index: IndexConfig | str = "flat",
        device: str | torch.device = "cpu",
    ) -> None:
        check_tensor("MemoryBank", "features", features, ndim=2, shape_hint="[N, D]", nonempty=True)
        if not all_finite(features):
            raise ValueError("MemoryBank: features contain NaN or Inf")
        if backend not in BACKENDS:
            raise ValueError(f"MemoryBank: backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(index, str) and index not in INDEX_TYPES:
            raise ValueError(f"MemoryBank: index must be one of {INDEX_TYPES}, got {index!r}")
        if not isinstance(index, (str, IndexConfig)):
            raise TypeError(f"MemoryBank: index must be a str or IndexConfig, got {type(index).__name__}")
        self.index_config = IndexConfig(kind=index) if isinstance(index, str) else index
        minimum = 1 << min(self.index_config.nbits, 4)  # PQ training: one point per code at least
        if self.index_config.kind == "ivfpq" and features.shape[0] < minimum:
            raise ValueError(f"MemoryBank: index 'ivfpq' needs at least {minimum} features to train, got "
                             f"{features.shape[0]}; use index='flat' (exact) for small banks")
        self.features = features.detach().to(device=device, dtype=torch.float32).contiguous()
        if not squared_norms_fit_float32(self.features):
            raise ValueError("MemoryBank: features are too large for float32 search (squared norms overflow, "
                             f"|value| up to {float(features.abs().max()):.3g}); rescale them")
        self.backend = backend
        self._faiss_index = None
        self._origin = _search_origin(self.features)
        # What the exact backends search: the features relative to the origin (a shift leaves
        # every distance unchanged). A second copy only for offset-dominated banks.
        self._searched = self.features if self._origin is None else self.features - self._origin

    @classmethod
    def build(
        cls,
        features: torch.Tensor,
        coreset_ratio: float | None = None,
        *,
        seed: int = 0,
        projection_dim: int | None = 128,
        backend: str = "auto",
        index: IndexConfig | str = "flat",
        device: str | torch.device = "cpu",
    ) -> "MemoryBank":
        """A bank of ``features``, optionally reduced to ``coreset_ratio`` of the rows by
        k-center greedy selection (PatchCore's coreset)."""
        check_tensor("MemoryBank.build", "features", features, ndim=2, shape_hint="[N, D]", nonempty=True)
        if coreset_ratio is not None:
            if not 0 < coreset_ratio <= 1:
                raise ValueError(f"MemoryBank.build: coreset_ratio must be in (0, 1], got {coreset_ratio}")
            n = max(1, math.ceil(coreset_ratio * features.shape[0]))
            if n < features.shape[0]:
                features = features[ops.greedy_coreset(features, n, seed=seed, projection_dim=projection_dim)]
        return cls(features, backend=backend, index=index, device=device)

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def search(self, x: torch.Tensor, k: int = 1, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared L2 distances ``[M, k]`` (ascending) to the k nearest stored features and
        their indices ``[M, k]`` (int64)."""
        check_tensor("MemoryBank.search", "x", x, ndim=2, shape_hint="[M, D]")
        if x.shape[1] != self.dim:
            raise ValueError(f"MemoryBank.search: queries have D={x.shape[1]}, the bank has D={self.dim}")
        check_int("MemoryBank.search", "k", k, 1, len(self), "bank size")
        backend = backend or self.backend
        if backend not in BACKENDS:
            raise ValueError(f"MemoryBank: backend must be one of {BACKENDS}, got {backend!r}")
        approximate = self.index_config.kind != "flat"
        if backend == "auto":
            backend = "faiss" if approximate else "kernel"
        if approximate and backend != "faiss":
            raise ValueError(f"MemoryBank: index {self.index_config.kind!r} is searched with backend 'faiss', not {backend!r}")
        x = x.detach().to(device=self.features.device, dtype=torch.float32)
        # Every backend rejects them alike (faiss would return index -1, torch NaN).
        peak = abs_peak(x)
        if not math.isfinite(peak):
            raise ValueError("MemoryBank.search: queries contain NaN or Inf")
        if not squared_norms_fit_float32(x, peak):
            raise ValueError("MemoryBank.search: queries are too large for float32 search (squared norms "
                             f"overflow, |value| up to {peak:.3g}); rescale them")
        if self._origin is not None:
            x = x - self._origin
        if backend == "kernel":
            return ops.sphere_distance(x, self._searched, k=k)
        if backend == "torch":
            return reference.sphere_distance(x, self._searched, k=k)
        return self._faiss_search(x, k)

    # -- faiss ---------------------------------------------------------------------------
    def _faiss_search(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._get_faiss_index()
        dist, idx = index.search(np.ascontiguousarray(x.cpu().numpy()), k)
        missing = int((idx < 0).any(axis=1).sum())
        if missing:  # IVF: the probed cells held fewer than k vectors (index -1 would pass as the last row)
            raise ValueError(f"MemoryBank.search: the ivfpq index found fewer than k={k} neighbours for "
                             f"{missing} of {len(idx)} queries; raise IndexConfig.nprobe "
                             f"(now {self.index_config.nprobe}) or lower k")
        dist_t = torch.from_numpy(dist).clamp_min_(0).to(x.device)
        return dist_t, torch.from_numpy(idx).to(device=x.device, dtype=torch.long)

    def _get_faiss_index(self):
        if self._faiss_index is None:
            self._faiss_index = self._make_faiss_index()
        return self._faiss_index

    def _make_faiss_index(self):
        faiss = _faiss()
        data = np.ascontiguousarray(self._searched.cpu().numpy())
        cfg = self.index_config
        if cfg.kind == "flat":
            index = faiss.IndexFlatL2(self.dim)
        else:
            nlist = cfg.nlist or max(1, int(4 * math.sqrt(len(self))))
            nlist = min(nlist, max(1, len(self) // 39))  # faiss wants >= 39 training points per cell
            m = cfg.m or _pq_subquantizers(self.dim)
            if self.dim % m:
                raise ValueError(f"MemoryBank: ivfpq needs D={self.dim} divisible by m={m}")
            nbits = cfg.nbits
            while nbits > 4 and 39 * (1 << nbits) > len(self):  # PQ training needs ~39 points per code
                nbits -= 1
            index = faiss.IndexIVFPQ(faiss.IndexFlatL2(self.dim), self.dim, nlist, m, nbits)
            index.train(data)
            index.nprobe = min(cfg.nprobe, nlist)
        index.add(data)
        return _to_faiss_gpu(index) if self.features.is_cuda else index

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank to one .npz file (arrays and JSON metadata; a trained IVF-PQ index
        in faiss's own serialised format). No pickle; the write is atomic. A directory
        path gets ``memory_bank.npz`` inside it."""
        path = _bank_file(path)
        meta = {"format_version": FORMAT_VERSION, "backend": self.backend, "index": asdict(self.index_config)}
        arrays = {
            "features": self.features.cpu().numpy(),
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        }
        if self.index_config.kind != "flat":
            faiss = _faiss()
            index = self._get_faiss_index()
            if self.features.is_cuda:
                index = faiss.index_gpu_to_cpu(index)
            arrays["faiss_index"] = faiss.serialize_index(index)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getvalue())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> "MemoryBank":
        path = _bank_file(path)
        if not path.is_file():
            raise FileNotFoundError(f"MemoryBank.load: no memory bank at {path}")
        invalid = f"MemoryBank.load: {path} is not a valid memory bank file"
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                features = torch.from_numpy(data["features"].copy())
                serialized = data["faiss_index"].copy() if "faiss_index" in data else None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
            raise ValueError(f"{invalid} ({type(exc).__name__}: {exc})") from exc
        if not isinstance(meta, dict):
            raise ValueError(f"{invalid} (its metadata is not a JSON object)")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"MemoryBank.load: {path} has format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
        try:
            if not isinstance(meta.get("index"), dict):
                raise ValueError("no index settings")
            bank = cls(features, backend=meta.get("backend"), index=IndexConfig(**meta["index"]), device=device)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{invalid} ({exc})") from exc
        if serialized is not None:
            try:
                index = _faiss().deserialize_index(serialized)
            except RuntimeError as exc:
                raise ValueError(f"{invalid} (its faiss index does not deserialise: {exc})") from exc
            if index.d != bank.dim or index.ntotal != len(bank):
                raise ValueError(f"{invalid} (its faiss index holds {index.ntotal} x {index.d}, "
                                 f"the features {len(bank)} x {bank.dim})")
            bank._faiss_index = _to_faiss_gpu(index) if bank.features.is_cuda else index
        return bank


def _search_origin(features: torch.Tensor, chunk: int = 65536) -> torch.Tensor | None:
    """The bank's mean when the features share an offset much larger than their spread, else None.

    Exact search computes ||x||^2 + ||c||^2 - 2 x.c in float32; with an offset 1000 times
    the spread that kept the true nearest neighbour for only a quarter of queries (a bug
    hunt, 2026-11-29). Searching relative to the mean avoids it. Accumulated in float64 by
    chunks, so no float64 copy of the bank is made."""
    n = features.shape[0]
    total = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device)
    squares = torch.zeros((), dtype=torch.float64, device=features.device)
    for start in range(0, n, chunk):
        block = features[start:start + chunk].double()
        total += block.sum(0)
        squares += block.square().sum()
    mean = total / n
    offset = mean.square().sum()
    spread = (squares / n - offset).clamp_min(0)  # mean squared distance to the mean
    return mean.float() if offset > 16 * spread else None


def _bank_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / FILE_NAME if path.is_dir() or not path.suffix else path


def _pq_subquantizers(dim: int) -> int:
    """About 8 dimensions per sub-quantiser, as a divisor of D."""
    target = max(1, dim // 8)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def _to_faiss_gpu(index):
    """Move a faiss index to the GPU when GPU faiss is installed; else keep it on CPU."""
    faiss = _faiss()
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index
