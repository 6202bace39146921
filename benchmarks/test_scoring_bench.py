"""sphere_distance against faiss IndexFlatL2, chunked torch.cdist + min and chunked
addmm + min (the pure-PyTorch reference), side by side per size: time and peak extra
memory. Run: pytest benchmarks/test_scoring_bench.py --benchmark-only
"""
import faiss
import pytest
import torch

from slsg import ops
from slsg.ops import reference

from .memory import bench_once

# (M queries, K centres); every D below. M = 65536 with K = 200,000 costs ~10 min per
# method at D = 1024 on a 2-core CPU, so that corner runs at D = 128 only.
SIZES = [(4096, 16384), (4096, 200_000), (65536, 16384)]
DIMS = [128, 384, 1024]
CASES = [(m, k, d) for m, k in SIZES for d in DIMS] + [(65536, 200_000, 128)]
CDIST_ROWS = 4096  # cdist materialises [rows, K]; chunking keeps it feasible at all


def cdist_min(x, c):
    return [torch.cdist(xb, c).min(1) for xb in x.split(CDIST_ROWS)]


@pytest.fixture(scope="module")
def data():
    cache = {}

    def get(m, k, d):
        key = (m, k, d)
        if key not in cache:
            cache.clear()
            g = torch.Generator().manual_seed(m + k + d)
            cache[key] = (torch.randn(m, d, generator=g), torch.randn(k, d, generator=g))
        return cache[key]

    return get


@pytest.mark.parametrize("method", ["slsg", "faiss", "cdist_min", "addmm_min"])
@pytest.mark.parametrize("M,K,D", CASES)
def test_sphere_distance(benchmark, data, M, K, D, method):
    x, c = data(M, K, D)
    if method == "slsg":
        fn = lambda: ops.sphere_distance(x, c)  # noqa: E731
    elif method == "faiss":
        index = faiss.IndexFlatL2(D)
        index.add(c.numpy())
        xn = x.numpy()
        fn = lambda: index.search(xn, 1)  # noqa: E731
    elif method == "cdist_min":
        fn = lambda: cdist_min(x, c)  # noqa: E731
    else:
        fn = lambda: reference.sphere_distance(x, c)  # noqa: E731
    benchmark.group = f"sphere_distance M={M} K={K} D={D}"
    bench_once(benchmark, fn, rounds=3 if M * K * D <= 1e11 else 1)
