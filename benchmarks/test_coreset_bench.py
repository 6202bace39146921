"""greedy_coreset (compiled) against its pure-PyTorch reference, and the PatchCore-scale
case: 214,016 x 1536 -> 10% (anomalib's k-center greedy took 1,835 s and 20.6 GiB for it
on a 2-core machine). Run: pytest benchmarks/test_coreset_bench.py --benchmark-only
"""
import pytest
import torch

from slsg import ops

from .memory import bench_once

N = 200_000


@pytest.fixture(scope="module")
def features():
    cache = {}

    def get(n, d):
        if (n, d) not in cache:
            cache.clear()
            cache[(n, d)] = torch.randn(n, d, generator=torch.Generator().manual_seed(d))
        return cache[(n, d)]

    return get


def run_case(benchmark, x, n, backend, group):
    benchmark.group = group
    bench_once(benchmark, lambda: ops.greedy_coreset(x, n, seed=0, backend=backend))


@pytest.mark.parametrize("backend", ["extension", "reference"])
@pytest.mark.parametrize("ratio", [0.01, 0.1])
@pytest.mark.parametrize("D", [384, 1024, 1536])
def test_greedy_coreset(benchmark, features, D, ratio, backend):
    if backend == "reference" and ratio == 0.1:
        # The reference needs ~0.1-0.3 s per step (20,000 steps at 10%): over half an hour,
        # up to ~100 minutes, a case.
        pytest.skip("reference timed at 1% only")
    run_case(benchmark, features(N, D), int(ratio * N), backend, f"greedy_coreset N={N} D={D} n={ratio:.0%}")


def test_patchcore_scale(benchmark, features):
    """anomalib's k-center greedy: 1,835 s, 20.6 GiB peak. Target: < 240 s, < 4 GiB."""
    x = features(214_016, 1536)
    run_case(benchmark, x, 21_401, "extension", "greedy_coreset PatchCore bottle scale 214016x1536 -> 10%")
