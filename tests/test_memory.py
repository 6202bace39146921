import numpy as np
import pytest
import torch

from slsg import MemoryBank
from slsg import memory as memory_module
from slsg import ops as slsg_ops
from slsg.memory import IndexConfig


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3000, 48, generator=g), torch.randn(200, 48, generator=g)


def test_exact_backends_agree(data):
    features, queries = data
    bank = MemoryBank(features)
    results = {b: bank.search(queries, k=5, backend=b) for b in ("kernel", "faiss", "torch", "auto")}
    truth = torch.cdist(queries.double(), features.double()).square().topk(5, largest=False)
    for name, (dist, idx) in results.items():
        torch.testing.assert_close(dist.double(), truth.values, atol=1e-3, rtol=1e-4, msg=name)
        assert (idx == truth.indices).float().mean() > 0.999, name


def test_coreset_build_is_seeded_subset(data):
    features, _ = data
    a = MemoryBank.build(features, coreset_ratio=0.1, seed=1)
    b = MemoryBank.build(features, coreset_ratio=0.1, seed=1)
    assert len(a) == 300 and a.dim == 48
    assert torch.equal(a.features, b.features)
    # every kept row is a row of the input
    assert MemoryBank(features).search(a.features, k=1)[0].max() < 1e-4


def test_save_load_roundtrip_flat(tmp_path, data):
    features, queries = data
    bank = MemoryBank(features)
    path = bank.save(tmp_path / "bank.npz")
    loaded = MemoryBank.load(path)
    assert torch.equal(loaded.features, bank.features)
    assert torch.equal(loaded.search(queries, 3)[1], bank.search(queries, 3)[1])
    # a directory path stores memory_bank.npz inside
    assert MemoryBank.load(bank.save(tmp_path)).dim == 48
    assert not list(tmp_path.glob(".*tmp")), "no temporary files left behind"


def test_ivfpq_recall_and_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    # clustered data, as real patch features are
    centers = torch.randn(50, 32, generator=g) * 4
    features = centers.repeat_interleave(400, 0) + torch.randn(20000, 32, generator=g)
    queries = centers.repeat_interleave(4, 0) + torch.randn(200, 32, generator=g)
    bank = MemoryBank(features, index=IndexConfig(kind="ivfpq", nprobe=16))
    dist, idx = bank.search(queries, k=5)
    exact_dist, exact = MemoryBank(features).search(queries, k=5)
    same_cluster = (idx // 400 == exact // 400).float().mean()
    assert same_cluster > 0.95
    # The PQ codes' candidates are ranked by exact distances (refine): the returned distances are
    # the true ones of the returned rows, ascending, and the nearest row is mostly found.
    torch.testing.assert_close(dist, (queries[:, None] - features[idx]).square().sum(-1), rtol=1e-5, atol=1e-4)
    assert (dist.diff(dim=1) >= 0).all()
    recall = (idx[:, 0] == exact[:, 0]).float().mean()
    unrefined_dist, unrefined = MemoryBank(features, index=IndexConfig(kind="ivfpq", nprobe=16, refine=0)).search(queries, k=5)
    assert recall > 0.9 and recall > (unrefined[:, 0] == exact[:, 0]).float().mean() + 0.3
    loaded = MemoryBank.load(bank.save(tmp_path / "ivf.npz"))
    assert loaded.index_config == bank.index_config
    assert torch.equal(loaded.search(queries, k=5)[1], idx)
    with pytest.raises(ValueError, match="searched with backend 'faiss'"):
        bank.search(queries, backend="kernel")


def test_save_is_atomic(tmp_path, data, monkeypatch):
    features, _ = data
    path = MemoryBank(features[:10]).save(tmp_path / "bank.npz")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        MemoryBank(features).save(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda f, q: MemoryBank(f).search(q[:, :10]), "queries have D=10, the bank has D=48"),
        (lambda f, q: MemoryBank(f).search(q, k=0), "k must be in"),
        (lambda f, q: MemoryBank(f[:3]).search(q, k=4), r"k must be in \[1, bank size=3\]"),
        (lambda f, q: MemoryBank(f, backend="gpu"), "backend must be one of"),
        (lambda f, q: MemoryBank(f, index="hnsw"), "index must be one of"),
        (lambda f, q: MemoryBank(f[:0]), "features is empty"),
        (lambda f, q: MemoryBank(torch.full((3, 4), float("nan"))), "NaN"),
        (lambda f, q: MemoryBank.build(f, coreset_ratio=1.5), "coreset_ratio"),
    ],
)
def test_bad_input(data, call, match):
    features, queries = data
    with pytest.raises((ValueError, TypeError), match=match):
        call(features, queries)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no memory bank"):
        MemoryBank.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a valid memory bank"):
        MemoryBank.load(bad)


@pytest.mark.parametrize("kwargs", [dict(nbits=0), dict(nbits=17), dict(nprobe=0), dict(nlist=-3), dict(m=0),
                                    dict(nprobe=True), dict(nbits=8.0), dict(kind="hnsw")])
def test_index_config_is_validated(kwargs):
    # faiss takes these unchecked (nbits=0 crashed the process).
    with pytest.raises(ValueError, match="IndexConfig"):
        IndexConfig(**({"kind": "ivfpq"} | kwargs))


def test_ivfpq_needs_enough_features_and_reports_short_results():
    g = torch.Generator().manual_seed(3)
    with pytest.raises(ValueError, match="at least 16 features"):
        MemoryBank(torch.randn(10, 16, generator=g), index="ivfpq")
    bank = MemoryBank(torch.randn(4000, 16, generator=g), index=IndexConfig("ivfpq", nprobe=1))
    # One probed cell holds far fewer than 1000 vectors: faiss pads with index -1.
    queries = torch.randn(5, 16, generator=g)
    with pytest.raises(ValueError, match="fewer than k=1000 neighbours"):
        bank.search(queries, 1000)
    # refine * k candidates may exceed the cell: the k found are enough, the padding never returned
    index = bank._get_faiss_index()
    cell = min(int((index.search(q[None].numpy(), 4000)[1] >= 0).sum()) for q in queries)  # smallest probed cell
    k = cell // 2
    assert 8 * k > cell
    dist, idx = bank.search(queries, k)
    assert (idx >= 0).all() and torch.isfinite(dist).all()
    assert all(len(set(row.tolist())) == k for row in idx)


@pytest.mark.parametrize("backend", ["kernel", "faiss", "torch"])
def test_non_finite_queries_are_rejected_by_every_backend(data, backend):
    features, queries = data
    queries = queries.clone()
    queries[1, 0] = float("nan")
    with pytest.raises(ValueError, match="queries contain NaN or Inf"):
        MemoryBank(features).search(queries, 1, backend=backend)


def test_broken_files_name_the_file(tmp_path, data):
    import json
    import zipfile

    path = MemoryBank(data[0][:100]).save(tmp_path / "bank.npz")
    raw = path.read_bytes()
    cases = {"truncated.npz": raw[: len(raw) // 2], "empty.npz": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name} is not a valid memory bank"):
            MemoryBank.load(tmp_path / name)
    for meta in ([1, 2], {"format_version": 1, "backend": "auto", "index": {"kind": "flat", "colour": 1}},
                 {"format_version": 1, "index": {"kind": "flat"}}):
        with zipfile.ZipFile(tmp_path / "tampered.npz", "w") as z:  # np.savez's layout
            with np.load(path) as original:
                np.save(z.open("features.npy", "w"), original["features"])
            np.save(z.open("meta.npy", "w"), np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        with pytest.raises(ValueError, match="tampered.npz is not a valid memory bank"):
            MemoryBank.load(tmp_path / "tampered.npz")


def test_index_kind_must_match_the_stored_index(tmp_path):
    import json
    import zipfile

    g = torch.Generator().manual_seed(5)
    features = torch.randn(2000, 16, generator=g)
    ivf = MemoryBank(features, index=IndexConfig("ivfpq", nprobe=4)).save(tmp_path / "ivf.npz")
    flat = MemoryBank(features).save(tmp_path / "flat.npz")

    def repack(source, name, kind=None, index_from=None, features_dtype=None, index_dtype=None):
        with np.load(source) as original:
            arrays = {key: original[key] for key in original.files}
        if kind is not None:
            meta = json.loads(bytes(arrays["meta"]).decode())
            meta["index"]["kind"] = kind
            arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        if index_from is not None:
            with np.load(index_from) as other:
                arrays["faiss_index"] = other["faiss_index"]
        if features_dtype is not None:
            arrays["features"] = arrays["features"].astype(features_dtype)
        if index_dtype is not None:
            arrays["faiss_index"] = arrays["faiss_index"].astype(index_dtype)
        with zipfile.ZipFile(tmp_path / name, "w") as z:  # np.savez's layout
            for key, value in arrays.items():
                np.save(z.open(f"{key}.npy", "w"), value)
        return tmp_path / name

    # An IVF-PQ bank without its trained index was quietly trained again; an exact bank
    # carrying an IVF-PQ index was searched through it as if exact.
    with pytest.raises(ValueError, match="index kind is 'ivfpq' but it holds no trained faiss index"):
        MemoryBank.load(repack(flat, "no_index.npz", kind="ivfpq"))
    with pytest.raises(ValueError, match="index kind is 'flat' but it holds a trained faiss index"):
        MemoryBank.load(repack(flat, "extra_index.npz", index_from=ivf))
    with pytest.raises(ValueError, match="int64_features.npz is not a valid memory bank"):
        MemoryBank.load(repack(flat, "int64_features.npz", features_dtype=np.int64))
    with pytest.raises(ValueError, match="int64_index.npz is not a valid memory bank"):  # faiss asserted
        MemoryBank.load(repack(ivf, "int64_index.npz", index_dtype=np.int64))
    assert len(MemoryBank.load(repack(ivf, "same.npz"))) == 2000  # the repacking itself is sound
    # Banks saved before IndexConfig.refine keep searching on PQ estimates.
    assert MemoryBank.load(ivf).index_config.refine == 8
    with np.load(ivf) as original:
        meta = json.loads(bytes(original["meta"]).decode())
    del meta["index"]["refine"]
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    with np.load(ivf) as original:
        arrays |= {key: original[key] for key in ("features", "faiss_index")}
    with zipfile.ZipFile(tmp_path / "old.npz", "w") as z:
        for key, value in arrays.items():
            np.save(z.open(f"{key}.npy", "w"), value)
    assert MemoryBank.load(tmp_path / "old.npz").index_config.refine == 0


def test_search_is_exact_when_features_share_a_large_offset():
    # ||x||^2 + ||c||^2 - 2 x.c in float32 lost these distances (offset 1000x the spread):
    # the bank searches relative to its mean, which leaves every distance unchanged.
    g = torch.Generator().manual_seed(7)
    features = 100 + 0.1 * torch.randn(500, 32, generator=g)
    queries = 100 + 0.1 * torch.randn(40, 32, generator=g)
    truth = torch.cdist(queries.double(), features.double()).square().min(1)
    bank = MemoryBank(features)
    assert bank._origin is not None
    for backend in ("kernel", "torch", "faiss"):
        dist, idx = bank.search(queries, 1, backend=backend)
        assert torch.equal(idx[:, 0], truth.indices), backend
        torch.testing.assert_close(dist[:, 0].double(), truth.values, rtol=1e-4, atol=1e-6)
    assert MemoryBank(torch.randn(500, 32, generator=g))._origin is None  # no copy for ordinary banks


def test_features_or_queries_too_large_for_float32_are_refused():
    # Finite in float64 but not in float32 (or whose squared norms overflow float32): the
    # torch backend returned NaN distances and faiss arbitrary rows.
    huge = torch.randn(10, 8, dtype=torch.float64)
    huge[3, 0] = 1e39
    with pytest.raises(ValueError, match=r"MemoryBank: features are too large for float32 search .*1e\+39"):
        MemoryBank(huge)
    with pytest.raises(ValueError, match="features are too large for float32 search"):
        MemoryBank(torch.randn(10, 8) * 1e19)
    bank = MemoryBank(torch.randn(10, 8))
    for backend in ("kernel", "torch", "faiss"):
        with pytest.raises(ValueError, match="queries are too large for float32 search"):
            bank.search(torch.randn(2, 8) * 1e19, backend=backend)
    assert bank.search(torch.randn(2, 8) * 1e17)[1].shape == (2, 1)  # large but within range


def _far_apart_clusters(seed, dim=64, distance=100.0, spread=1.0):
    """Four tight clusters `distance` apart: the features' norms dwarf the distances between
    neighbours, where float32 ||x||^2 + ||c||^2 - 2 x.c swaps neighbours (at spread 0.1 its
    rounding exceeds the distances themselves)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, dim, generator=g)
    centres = centres / centres.norm(dim=1, keepdim=True) * distance
    noise = spread / dim ** 0.5
    features = centres[torch.randint(4, (3000,), generator=g)] + noise * torch.randn(3000, dim, generator=g)
    queries = centres[torch.randint(4, (300,), generator=g)] + noise * torch.randn(300, dim, generator=g)
    return features, queries


@pytest.mark.parametrize("spread", [1.0, 0.1])
@pytest.mark.parametrize("backend", ["kernel", "torch", "faiss"])
def test_search_finds_true_neighbours_of_clusters_far_apart(backend, spread):
    # Before float64 re-ranking, kernel and torch got 85 of 400 such queries wrong at k=5
    # (spread 1). At spread 0.1 the k + 8 float32 candidates miss them too: the float32
    # rounding bound must send those queries on to the float64 search.
    features, queries = _far_apart_clusters(seed=3, spread=spread)
    truth = torch.cdist(queries.double(), features.double()).square().topk(5, largest=False)
    bank = MemoryBank(features)
    assert bank._origin is None  # no common offset: the mean does not help here
    dist, idx = bank.search(queries, 5, backend=backend)
    assert torch.equal(idx, truth.indices)
    torch.testing.assert_close(dist.double(), truth.values, rtol=1e-6, atol=1e-12)


def test_float32_values_alone_miss_those_neighbours():
    # The case above really needs the re-ranking: the op's own float32 ranking is wrong.
    for spread in (1.0, 0.1):
        features, queries = _far_apart_clusters(seed=3, spread=spread)
        truth = torch.cdist(queries.double(), features.double()).square().topk(5, largest=False)
        _, idx = slsg_ops.sphere_distance(queries, features, k=5)
        assert (idx != truth.indices).any(1).sum() > 10
    _, idx = slsg_ops.sphere_distance(queries, features, k=13)  # the first candidates at k=5
    missed = sum(not set(t.tolist()) <= set(c.tolist()) for t, c in zip(truth.indices, idx))
    assert missed > 200


def test_search_ties_go_to_the_lowest_row_and_every_fallback_is_exact(monkeypatch):
    features, queries = _far_apart_clusters(seed=4, dim=24)
    features = torch.cat([features, features[:100]])  # rows 3000-3099 duplicate rows 0-99
    queries = torch.cat([queries, features[:20]])
    # Differences, not cdist: its float64 products can split the duplicates' exact ties.
    truth = (queries.double()[:, None] - features.double()[None]).square().sum(-1).sort(dim=1, stable=True)
    bank = MemoryBank(features)
    expected = bank.search(queries, 4)
    assert torch.equal(expected[1], truth.indices[:, :4])
    # A query equal to row j < 20 finds row j, then its duplicate 3000 + j.
    assert torch.equal(expected[1][-20:, :2], torch.stack([torch.arange(20), torch.arange(3000, 3020)], 1))
    # Bounds so loose that every query falls through to float64, then to the brute force.
    monkeypatch.setattr(memory_module, "_FLOAT64_ERROR", 1.0)
    monkeypatch.setattr(memory_module, "_relative_error", lambda *args: 1.0)
    for backend in ("kernel", "torch", "faiss"):
        dist, idx = bank.search(queries, 4, backend=backend)
        assert torch.equal(idx, expected[1]), backend
        torch.testing.assert_close(dist, expected[0], rtol=1e-6, atol=1e-9)


def test_many_identical_rows_tie_to_the_lowest_rows_without_a_full_scan(monkeypatch):
    # 300 copies of one row: every query near it ties 300 ways, more than the float32 level's
    # candidates; the float64 level widens its list instead of comparing with every row.
    g = torch.Generator().manual_seed(8)
    features = torch.randn(3000, 32, generator=g)
    features[1000:1300] = features[7]
    queries = features[7] + 1e-3 * torch.randn(50, 32, generator=g)
    monkeypatch.setattr(MemoryBank, "_brute_force", lambda *args: pytest.fail("compared with every row"))
    dist, idx = MemoryBank(features).search(queries, 3)
    assert idx.tolist() == [[7, 1000, 1001]] * 50
    truth = (queries.double() - features[7].double()).square().sum(1)
    torch.testing.assert_close(dist, truth[:, None].float().expand(50, 3))


def test_features_that_overflow_relative_to_their_mean_are_refused():
    # Each fits float32, but relative to the mean (which _search_origin subtracts) the last
    # row's squared norm overflows: the torch backend then found row 0 at distance 2.6e38.
    a = 8e18
    features = (a + torch.arange(200, dtype=torch.float64) * 5e15).float()[:, None]
    features[-1] = -a
    with pytest.raises(ValueError, match="too large for float32 search relative to their mean"):
        MemoryBank(features)


def test_reduced_precision_torch_matmuls_widen_the_bound(monkeypatch):
    # With torch.set_float32_matmul_precision("medium") torch's CPU products may run in
    # bfloat16 (TF32 on CUDA from "high"); simulated by rounding the reference's inputs to 10 bits.
    def tf32(t):
        bits = t.float().view(torch.int32)
        return ((bits + (1 << 12)) & ~((1 << 13) - 1)).view(torch.float32)

    def tf32_reference(x, centers, radii=None, k=1):
        dots = tf32(x) @ tf32(centers).T
        values = (x.square().sum(1, keepdim=True) + centers.square().sum(1) - 2 * dots).clamp_min(0)
        return values.sort(dim=1, stable=True)[0][:, :k], values.sort(dim=1, stable=True)[1][:, :k]

    g = torch.Generator().manual_seed(9)
    features, queries = torch.randn(4000, 8, generator=g), torch.randn(600, 8, generator=g)
    truth = torch.cdist(queries.double(), features.double()).square().topk(2, largest=False).indices
    monkeypatch.setattr(memory_module.reference, "sphere_distance", tf32_reference)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert torch.equal(MemoryBank(features).search(queries, 2, backend="torch")[1], truth)
        torch.set_float32_matmul_precision("highest")  # the float32 bound: TF32 errors exceed it
        assert not torch.equal(MemoryBank(features).search(queries, 2, backend="torch")[1], truth)
    finally:
        torch.set_float32_matmul_precision(old)


def test_per_backend_precision_settings_are_read_without_error():
    # torch.get_float32_matmul_precision() raises once the per-backend fp32_precision API is
    # used: every exact search raised with it.
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if matmul is None or not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no per-backend fp32_precision")
    bank = MemoryBank(torch.randn(100, 8))
    old = matmul.fp32_precision
    try:
        matmul.fp32_precision = "bf16"
        assert memory_module._reduced_precision_matmul("cpu")
        for backend in ("kernel", "torch", "faiss"):
            assert bank.search(torch.randn(3, 8), backend=backend)[1].shape == (3, 1)
        matmul.fp32_precision = "ieee"
        assert not memory_module._reduced_precision_matmul("cpu")
    finally:
        matmul.fp32_precision = old


def test_queries_beyond_every_candidate_list_are_compared_with_every_row(monkeypatch):
    # 300 identical rows and a candidate cap of 64: the float64 level cannot settle the tied
    # queries, so the last resort compares them with every row.
    g = torch.Generator().manual_seed(10)
    features = torch.randn(3000, 16, generator=g)
    features[1000:1300] = features[5]
    queries = torch.cat([features[5] + 1e-3 * torch.randn(20, 16, generator=g), torch.randn(20, 16, generator=g)])
    truth = (queries.double()[:, None] - features.double()[None]).square().sum(-1).sort(dim=1, stable=True)
    monkeypatch.setattr(memory_module, "_MAX_CANDIDATES", 64)
    calls = []
    brute_force = MemoryBank._brute_force
    monkeypatch.setattr(MemoryBank, "_brute_force", lambda self, x, k: calls.append(len(x)) or brute_force(self, x, k))
    dist, idx = MemoryBank(features).search(queries, 3)
    assert calls == [20]
    assert torch.equal(idx, truth.indices[:, :3])
    torch.testing.assert_close(dist.double(), truth.values[:, :3], rtol=1e-6, atol=1e-9)


class _LimitedIndex:
    """Stands in for a GPU faiss index: answers like the CPU index it wraps, but refuses k
    beyond a limit, as GPU faiss refuses k > 2048."""

    def __init__(self, index, limit):
        self.index, self.limit, self.largest_k = index, limit, 0

    def search(self, x, k):
        if k > self.limit:
            raise RuntimeError(f"k={k} exceeds the GPU limit {self.limit}")
        self.largest_k = max(self.largest_k, k)
        return self.index.search(x, k)


def test_faiss_searches_beyond_the_gpu_k_limit_go_to_a_cpu_copy(monkeypatch):
    # Duplicated rows make near ties, so the exact search asks faiss for 4 (k + 8) rows.
    g = torch.Generator().manual_seed(3)
    base = torch.randn(300, 16, generator=g)
    features, queries = torch.cat([base, base, base]), base[:40] + 1e-4 * torch.randn(40, 16, generator=g)
    bank = MemoryBank(features, backend="faiss")
    cpu_index = bank._get_faiss_index()
    gpu_like = _LimitedIndex(cpu_index, limit=10)
    bank._faiss_index = gpu_like
    monkeypatch.setattr(memory_module, "_FAISS_GPU_MAX_K", 10)
    monkeypatch.setattr(memory_module, "_is_faiss_gpu", lambda index: index is gpu_like)
    monkeypatch.setattr(memory_module, "_faiss_index_to_cpu", lambda index: index.index)
    dist, idx = bank.search(queries, k=5)
    want_dist, want_idx = bank.search(queries, k=5, backend="kernel")
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(dist, want_dist)
    assert gpu_like.largest_k <= 10 and bank._faiss_cpu_index is cpu_index
