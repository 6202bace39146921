"""MemoryBank exact search (the float32 values, then float64 ranks of near ties) against the
bare sphere_distance op it starts from and faiss IndexFlatL2, side by side: time and peak
extra memory. Sizes of the detector's use: one image's patches (1,024) or a batch's (8,192)
against a bank like MTD's (10,781 x 152), and a larger bank of 200,000 x 384 rows.
Run: pytest benchmarks/test_memory_bench.py --benchmark-only
"""
import faiss
import pytest
import torch

from slsg import MemoryBank, ops

from .memory import bench_once

CASES = [(1024, 10_781, 152), (8192, 10_781, 152), (4096, 200_000, 384)]


@pytest.fixture(scope="module")
def data():
    cache = {}

    def get(m, n, d):
        if (m, n, d) not in cache:
            cache.clear()
            g = torch.Generator().manual_seed(m + n + d)
            features = torch.randn(n, d, generator=g)
            cache[(m, n, d)] = (features, torch.randn(m, d, generator=g), MemoryBank(features))
        return cache[(m, n, d)]

    return get


@pytest.mark.parametrize("method", ["bank_kernel", "op", "faiss"])
@pytest.mark.parametrize("M,N,D", CASES)
def test_memory_bank_search(benchmark, data, M, N, D, method):
    features, queries, bank = data(M, N, D)
    if method == "bank_kernel":
        fn = lambda: bank.search(queries, 1)  # noqa: E731
    elif method == "op":
        fn = lambda: ops.sphere_distance(queries, features)  # noqa: E731
    else:
        index = faiss.IndexFlatL2(D)
        index.add(features.numpy())
        xn = queries.numpy()
        fn = lambda: index.search(xn, 1)  # noqa: E731
    benchmark.group = f"MemoryBank.search M={M} N={N} D={D}"
    bench_once(benchmark, fn, rounds=5 if M * N * D <= 2e10 else 1)
