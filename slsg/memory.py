"""MemoryBank: the memory of normal features, searched for the nearest normal feature.

In SLSG terms each stored feature is the centre of a small hypersphere around normal
data; the squared distance to the nearest centre is the anomaly score of a query.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import ops
from .ops import reference
from .ops._extension import has_kernel
from .ops._validate import check_int, check_tensor
from .utils import abs_peak, all_finite, atomic_path, squared_norms_fit_float32

BACKENDS = ("auto", "kernel", "faiss", "torch")
INDEX_TYPES = ("flat", "ivfpq")
FILE_NAME = "memory_bank.npz"
FORMAT_VERSION = 1
_EXTRA_CANDIDATES = 8  # candidates beyond k that exact search ranks in float64
_MAX_CANDIDATES = 4096  # largest candidate list of the float64 level (for k <= 4088); beyond it, every row
_RERANK_ELEMENTS = 1 << 22  # float64 elements per re-ranking chunk (32 MiB)
_ABSOLUTE_ERROR = 2 * 2.0 ** -126  # per term, for subnormal values flushed to zero
_FLOAT64_ERROR = 2 * 2.0 ** -53  # per term of a float64 value (doubled: see _relative_error)
_ABSOLUTE_ERROR64 = 2 * 2.0 ** -1022  # the same for float64 subnormals
_SHIFT_ERROR = 4 * 2.0 ** -24  # float32 rounding of x - origin and c - origin


@dataclass
class IndexConfig:
    """How the bank is searched. "flat" is exact; "ivfpq" is faiss's approximate
    inverted-file product-quantiser index for banks of millions of vectors."""

    kind: str = "flat"
    nlist: int | None = None  # IVF cells; default ~4 sqrt(N)
    m: int | None = None  # PQ sub-quantisers; default D/8 rounded to a divisor of D
    nbits: int = 8
    nprobe: int = 16
    # IVF-PQ: the index proposes refine * k candidates, ranked again by their exact distances to
    # the stored features (faiss's IndexRefineFlat idea; the bank keeps the features anyway). PQ
    # codes alone order close neighbours poorly: on 848,484 real patch features recall at 1 was
    # 0.58 with PQ estimates and 0.96 with refine 8, in 1.2 s against 1.1 at k = 1 (benchmarks/
    # RESULTS.md); the re-ranking grows with k * refine * D (k = 9, D = 512: 2.7x the time).
    # 0: PQ estimates.
    refine: int = 8

    def __post_init__(self) -> None:
        # faiss takes these unchecked: nbits = 0 crashed the process in a test.
        if self.kind not in INDEX_TYPES:
            raise ValueError(f"IndexConfig: kind must be one of {INDEX_TYPES}, got {self.kind!r}")
        for name, low, high, optional in (("nlist", 1, 1 << 24, True), ("m", 1, 1 << 16, True),
                                          ("nbits", 1, 16, False), ("nprobe", 1, 1 << 24, False),
                                          ("refine", 0, 1 << 10, False)):
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
    in float32 (like torch.cdist), searching relative to the bank's mean when one common offset
    dominates the features. Where neighbours lie within that computation's rounding bound of
    each other, float64 differences rank them (and give their distances), so the neighbours
    are the true ones even where the features' norms dwarf the distances between neighbours
    (several clusters far apart), and exact ties go to the lowest row.

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
        self._faiss_cpu_index = None  # a CPU copy of a GPU index, for k beyond GPU faiss's limit
        self._origin = _search_origin(self.features)
        # What the exact backends search: the features relative to the origin (a shift leaves
        # every distance unchanged). A second copy only for offset-dominated banks.
        self._searched = self.features if self._origin is None else self.features - self._origin
        if self._origin is not None and not squared_norms_fit_float32(self._searched):
            # Relative to the mean, far-apart features can be twice as long as they were.
            raise ValueError("MemoryBank: features are too large for float32 search relative to their "
                             f"mean (squared norms overflow, |value| up to {abs_peak(self._searched):.3g}); rescale them")
        self._reach = _max_row_norm(self._searched)  # bounds the float32 rounding of exact search

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
            n = coreset_size(features.shape[0], coreset_ratio)
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
        their indices ``[M, k]`` (int64). Queries are searched as float32 (float64 queries
        are rounded first), like the bank."""
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
        shifted = x - self._origin if self._origin is not None else x
        if self._origin is not None and not squared_norms_fit_float32(shifted):
            raise ValueError("MemoryBank.search: queries are too large for float32 search relative to the "
                             f"bank's mean (squared norms overflow, |value| up to {abs_peak(shifted):.3g}); rescale them")
        if backend == "kernel":
            search = lambda q, n: ops.sphere_distance(q, self._searched, k=n)  # noqa: E731
        elif backend == "torch":
            search = lambda q, n: reference.sphere_distance(q, self._searched, k=n)  # noqa: E731
        else:
            search = self._faiss_search
        if approximate:
            refine = self.index_config.refine
            if refine == 0:
                return search(shifted, k)
            # Cells may hold fewer than refine * k vectors: missing candidates (-1) are skipped;
            # fewer than k found is still an error.
            _, candidates = self._faiss_search(shifted, min(len(self), refine * k), needed=k)
            return self._rerank(x, candidates, k)
        return self._exact_search(x, shifted, k, search, relative_error=_relative_error(backend, x, self.dim))

    # -- exact search ----------------------------------------------------------------------
    def _exact_search(self, x, shifted, k, search, relative_error):
        """The true k nearest rows, in order: the backend's values ||x||^2 + ||c||^2 - 2 x.c
        where they decide, float64 differences where they may not.

        Each float32 value is within e = relative_error (||x|| + max ||c||)^2 of the exact
        distance (of the searched vectors, relative to the origin). Where the first k + 1
        values of a query are more than 2e apart, their order is the true order, and the
        values are returned as they are. Other queries (near ties) take k + 8 candidates: with
        T the k-th smallest value, every true neighbour scores at most T + 2e, so when the last
        candidate scores more than that, none is missing, and float64 differences rank them.
        Queries short of it search again with 4 times the candidates, then in float64
        (clusters far apart, whose norms dwarf the distances between neighbours) with up to
        _MAX_CANDIDATES candidates (many exact ties, e.g. duplicated rows), and in the end
        against every row. A NaN or Inf value (overflow) never settles a query."""
        reach = torch.linalg.vector_norm(shifted, dim=1, dtype=torch.float64) + self._reach
        # Searching relative to the origin rounds x - origin and c - origin in float32 once.
        shift = _SHIFT_ERROR if self._origin is not None else 0.0

        def margin(error, absolute, rows=slice(None)):  # twice the bound e, per query
            r = reach[rows]
            return 2 * ((error + shift) * r.square() + absolute * self.dim * (r + 2))

        values, candidates = search(shifted, min(len(self), k + 1))
        dist, index = values[:, :k].float().contiguous(), candidates[:, :k].contiguous()
        gaps = values[:, 1:].double() - values[:, :-1].double()
        rows = torch.nonzero(~(gaps > margin(relative_error, _ABSOLUTE_ERROR)[:, None]).all(1)).view(-1)
        first = k + _EXTRA_CANDIDATES
        cap = max(first, _MAX_CANDIDATES)
        float64_sizes = [first]
        while float64_sizes[-1] < min(len(self), cap):
            float64_sizes.append(min(4 * float64_sizes[-1], cap))
        levels = [(search, relative_error, _ABSOLUTE_ERROR, (first, 4 * first)),
                  (self._float64_search, _FLOAT64_ERROR * (self.dim + 8), _ABSOLUTE_ERROR64, float64_sizes)]
        for level_search, error, absolute, sizes in levels:
            for kc in sizes:
                if not rows.numel():
                    return dist, index
                kc = min(kc, len(self))
                values, candidates = level_search(shifted[rows], kc)
                threshold = values[:, k - 1].double() + margin(error, absolute, rows)
                short = ~(values[:, kc - 1].double() > threshold) & (kc < len(self))
                done = ~short
                if done.any():
                    dist[rows[done]], index[rows[done]] = self._rerank(x[rows[done]], candidates[done], k)
                rows = rows[short]
        if rows.numel():
            dist[rows], index[rows] = self._brute_force(x[rows], k)
        return dist, index

    def _float64_search(self, shifted, kc):
        """The kc smallest float64 values ||x||^2 + ||c||^2 - 2 x.c (ascending; which of equal
        values come first does not matter here). torch's topk, not the kernel: its sorted
        insertion costs kc per candidate at the large kc of many ties."""
        queries = shifted.double()
        query_norms = queries.square().sum(1, keepdim=True)

        def values(q0, q1, block):
            return torch.addmm(query_norms[q0:q1] + block.square().sum(1), queries[q0:q1], block.T, alpha=-2)

        # [256, rows] values and [rows, D] blocks at a time
        rows = max(kc, _RERANK_ELEMENTS // max(256, self.dim))
        return self._smallest_by_chunks(len(queries), kc, 256, rows, self._searched, values, stable=False)

    def _rerank(self, x, candidates, k):
        """The k nearest of each query's candidate rows [M, kc] by float64 differences; ties
        go to the lowest row. Candidates -1 (none found) rank last."""
        m, kc = candidates.shape
        dist = torch.empty(m, k, dtype=torch.float32, device=x.device)
        index = torch.empty(m, k, dtype=torch.long, device=x.device)
        step = max(1, _RERANK_ELEMENTS // (kc * self.dim))
        for start in range(0, m, step):
            cand = candidates[start:start + step].sort(dim=1).values  # index order: stable ties
            diff = x[start:start + step, None, :].double() - self.features[cand.clamp_min(0)].double()
            d = diff.square_().sum(-1).masked_fill_(cand < 0, math.inf)
            d, order = d.sort(dim=1, stable=True)
            dist[start:start + step] = d[:, :k].float()
            index[start:start + step] = cand.gather(1, order[:, :k])
        return dist, index

    def _brute_force(self, x, k):
        """The k nearest rows by float64 differences against every row; ties go to the lowest."""
        def values(q0, q1, block):
            return (x[q0:q1, None, :].double() - block[None]).square_().sum(-1)

        rows = max(k, 1024)
        step = max(1, _RERANK_ELEMENTS // (rows * self.dim))  # [step, rows, D] differences at a time
        dist, index = self._smallest_by_chunks(len(x), k, step, rows, self.features, values, stable=True)
        return dist.float(), index

    def _smallest_by_chunks(self, m, n, step, rows, bank, values, stable):
        """The n smallest ``values(q0, q1, block)`` [q1 - q0, rows in block] of each of m queries
        over ``bank`` (float64 blocks of ``rows`` rows), ``step`` queries at a time so memory
        stays bounded however many queries come; with ``stable``, equal values keep the lower
        row first."""
        best = torch.empty(m, n, dtype=torch.float64, device=bank.device)
        index = torch.empty(m, n, dtype=torch.long, device=bank.device)
        for q0 in range(0, m, step):
            q1 = min(m, q0 + step)
            v_best = i_best = None
            for start in range(0, len(self), rows):
                block = bank[start:start + rows].double()
                v = values(q0, q1, block)
                i = torch.arange(start, start + block.shape[0], device=v.device).expand_as(v)
                v_best, i_best = _merge_smallest(v_best, i_best, v, i, n, stable)
            best[q0:q1], index[q0:q1] = v_best, i_best
        return best, index

    # -- faiss ---------------------------------------------------------------------------
    def _faiss_search(self, x: torch.Tensor, k: int, needed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """faiss's k nearest [M, k]; an error where fewer than ``needed`` (default k) were found
        (IVF: index -1 pads the rest)."""
        index = self._get_faiss_index()
        if k > _FAISS_GPU_MAX_K and _is_faiss_gpu(index):
            # GPU faiss selects at most 2,048 neighbours, and the exact search's re-checks ask
            # for 4 (k + 8): a CPU copy of the index answers those (same vectors, same results).
            if self._faiss_cpu_index is None:
                self._faiss_cpu_index = _faiss_index_to_cpu(index)
            index = self._faiss_cpu_index
        dist, idx = index.search(np.ascontiguousarray(x.cpu().numpy()), k)
        needed = k if needed is None else needed
        missing = int((idx[:, :needed] < 0).any(axis=1).sum())
        if missing:  # IVF: the probed cells held fewer than k vectors (index -1 would pass as the last row)
            raise ValueError(f"MemoryBank.search: the ivfpq index found fewer than k={needed} neighbours for "
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
        except MemoryError:
            raise  # a large bank in too little memory, most likely (a damaged header may claim too many rows)
        except Exception as exc:  # numpy raises many kinds on damaged files (even AssertionError)
            raise ValueError(f"{invalid} ({type(exc).__name__}: {exc})") from exc
        if not isinstance(meta, dict):
            raise ValueError(f"{invalid} (its metadata is not a JSON object)")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"MemoryBank.load: {path} has format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
        try:
            if not isinstance(meta.get("index"), dict):
                raise ValueError("no index settings")
            # Banks saved before IndexConfig.refine searched on PQ estimates: they keep doing so.
            bank = cls(features, backend=meta.get("backend"), index=IndexConfig(**{"refine": 0, **meta["index"]}),
                       device=device)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{invalid} ({exc})") from exc
        # An IVF-PQ bank must bring its trained index (training it again would quietly give other
        # results); an exact bank must not carry one (it would be searched as if exact).
        kind = bank.index_config.kind
        if (serialized is None) != (kind == "flat"):
            raise ValueError(f"{invalid} (its index kind is {kind!r} but it "
                             f"{'holds no' if serialized is None else 'holds a'} trained faiss index)")
        if serialized is not None:
            try:
                index = _faiss().deserialize_index(serialized)
            except Exception as exc:
                raise ValueError(f"{invalid} (its faiss index does not deserialise: {exc})") from exc
            if not isinstance(index, _faiss().IndexIVFPQ):
                raise ValueError(f"{invalid} (its faiss index is a {type(index).__name__}, not the IndexIVFPQ "
                                 f"of index kind {kind!r})")
            if index.d != bank.dim or index.ntotal != len(bank):
                raise ValueError(f"{invalid} (its faiss index holds {index.ntotal} x {index.d}, "
                                 f"the features {len(bank)} x {bank.dim})")
            bank._faiss_index = _to_faiss_gpu(index) if bank.features.is_cuda else index
        return bank


def coreset_size(rows: int, coreset_ratio: float | None) -> int:
    """How many of ``rows`` features a bank built with ``coreset_ratio`` keeps."""
    return rows if coreset_ratio is None else min(rows, max(1, math.ceil(coreset_ratio * rows)))


def _relative_error(backend: str, x: torch.Tensor, dim: int) -> float:
    """A bound on the relative error of a float32 value ||x||^2 + ||c||^2 - 2 x.c, relative
    to (||x|| + ||c||)^2: D + 8 roundings of 2^-24 each (any summation order), doubled for
    safety. Where torch's matmul computes it (the torch backend, or the kernel backend
    without a compiled kernel for the device) and may run in TF32 or bfloat16, each product
    keeps 8 to 10 bits: 2^-6 more. Our kernels and faiss use float32 products."""
    exact = 2.0 * (dim + 8) * 2.0 ** -24
    uses_torch_matmul = backend == "torch" or (backend == "kernel" and not has_kernel("sphere_distance", x.device.type))
    return exact + 2.0 ** -6 if uses_torch_matmul and _reduced_precision_matmul(x.device.type) else exact


def _reduced_precision_matmul(device_type: str) -> bool:
    """Whether torch may run float32 matmuls on this device in TF32 or bfloat16: the
    per-backend fp32_precision settings (torch >= 2.9), else set_float32_matmul_precision
    ("high" allows TF32 on CUDA, "medium" bfloat16 as well)."""
    settings = []
    try:
        matmul = torch.backends.cuda.matmul if device_type == "cuda" else torch.backends.mkldnn.matmul
        settings = [matmul.fp32_precision, torch.backends.fp32_precision]
    except AttributeError:  # an older torch
        pass
    if any(setting not in ("none", "ieee") for setting in settings):
        return True
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # raised once the per-backend settings are in use: they decided above
        return False
    return legacy == "medium" or (device_type == "cuda" and (legacy == "high" or torch.backends.cuda.matmul.allow_tf32))


def _merge_smallest(best_v, best_i, v, i, n, stable=True):
    """The n smallest of two candidate lists [M, *], ascending. The first list holds the lower
    indices, so with ``stable`` its entries come first on equal values; without, topk (faster)."""
    if best_v is not None:
        v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
    if stable:
        v, order = v.sort(dim=1, stable=True)
        v, order = v[:, :n], order[:, :n]
    else:
        v, order = v.topk(min(n, v.shape[1]), dim=1, largest=False)
    return v, i.gather(1, order)


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


def _max_row_norm(features: torch.Tensor, chunk: int = 65536) -> float:
    """max_i ||features_i||, in float64 by chunks (no float64 copy of the bank)."""
    return max(float(features[start:start + chunk].double().norm(dim=1).max())
               for start in range(0, features.shape[0], chunk))


def _bank_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / FILE_NAME if path.is_dir() or not path.suffix else path


def _pq_subquantizers(dim: int) -> int:
    """About 8 dimensions per sub-quantiser, as a divisor of D."""
    target = max(1, dim // 8)
    return max(m for m in range(1, target + 1) if dim % m == 0)


# GPU faiss's largest k (GPU_MAX_SELECTION_K in faiss/gpu/utils/DeviceDefs.cuh).
_FAISS_GPU_MAX_K = 2048


def _is_faiss_gpu(index) -> bool:
    faiss = _faiss()
    return hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex)


def _faiss_index_to_cpu(index):
    return _faiss().index_gpu_to_cpu(index)


def _to_faiss_gpu(index):
    """Move a faiss index to the GPU when GPU faiss is installed; else keep it on CPU."""
    faiss = _faiss()
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index
