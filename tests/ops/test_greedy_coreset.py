import pytest
import torch

from slsg import ops
from slsg.ops import reference
from slsg.ops.coreset import coreset_plan

from .helpers import devices, needs_extension, noncontiguous


def brute_force_k_center(x, n, start):
    """Textbook k-center greedy on the full distance matrix (float64)."""
    dist = torch.cdist(x.double(), x.double()).square()
    chosen = [start]
    for _ in range(n - 1):
        nearest = dist[:, chosen].min(1).values
        nearest[chosen] = -1
        chosen.append(int(nearest.argmax()))
    return chosen


def test_reference_is_textbook_k_center():
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(0))
    assert reference.greedy_coreset(x, 40, 17).tolist() == brute_force_k_center(x, 40, 17)


@needs_extension
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("N,D,n", [(1, 1, 1), (2, 3, 2), (500, 13, 50), (3000, 128, 300), (257, 1, 257)])
def test_kernel_selects_like_reference(device, N, D, n):
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(N + D)).to(device)
    start = N // 3
    assert torch.ops.slsg.greedy_coreset(x, n, start).tolist() == reference.greedy_coreset(x, n, start).tolist()


def clustered_int8(N, D, clusters, spread, noise_share, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, D, generator=g) * 40
    x = centres[torch.randint(clusters, (N,), generator=g)] + spread * torch.randn(N, D, generator=g)
    noisy = int(noise_share * N)
    x[:noisy] = torch.rand(noisy, D, generator=g) * 250 - 125
    return x.round().clamp(-127, 127).to(torch.int8)


@needs_extension
@pytest.mark.parametrize("N,D,clusters,spread,noise_share,n", [
    (6000, 128, 50, 3.0, 0.0, 600),    # clustered like real features: the CPU kernel prunes
    (6000, 128, 50, 3.0, 0.0, 6000),   # ... to exhaustion
    (20000, 32, 200, 5.0, 0.3, 3000),  # clusters in noise: the kernel may switch back and forth
    (5000, 128, 5, 0.5, 0.0, 1500),
    (3000, 8, 3000, 0.0, 0.0, 3000),   # exact duplicates: zero distances and ties everywhere
    (30000, 128, 30000, 0.0, 1.0, 40),  # uniform noise: no pruning, plain passes
    (20000, 2, 1, 0.0, 1.0, 3000),      # uniform in 2-D: groups touch; the bound decides often
    (10000, 4, 1, 0.0, 1.0, 2000),
])
def test_int8_kernel_selects_like_reference_on_clustered_features(N, D, clusters, spread, noise_share, n):
    # The CPU int8 kernel skips the groups that a new centre cannot change (triangle
    # inequality); the selection must stay the plain greedy one, ties included.
    x = clustered_int8(N, D, clusters, spread, noise_share, seed=N + n)
    for start in (0, N - 1):
        assert torch.equal(torch.ops.slsg.greedy_coreset(x, n, start), reference.greedy_coreset(x, n, start))


@needs_extension
def test_duplicates_ties_and_exhaustion():
    # Four distinct points, each repeated: ties must go to the lowest index and, once
    # every distinct point is taken, the remaining duplicates are taken in index order.
    base = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 3.0], [4.0, 3.0]])
    x = base.repeat(3, 1)  # rows i and i + 4 and i + 8 are equal
    expected = reference.greedy_coreset(x, 12, 0).tolist()
    assert torch.ops.slsg.greedy_coreset(x, 12, 0).tolist() == expected
    assert expected[:4] == [0, 3, 1, 2]
    assert sorted(expected) == list(range(12))


@needs_extension
def test_face_identical_across_backends_and_layouts():
    x = torch.randn(2000, 300, generator=torch.Generator().manual_seed(2))
    a = ops.greedy_coreset(x, 100, seed=7)
    assert a.tolist() == ops.greedy_coreset(x, 100, seed=7, backend="reference").tolist()
    assert a.tolist() == ops.greedy_coreset(noncontiguous(x), 100, seed=7).tolist()
    assert a.tolist() != ops.greedy_coreset(x, 100, seed=8).tolist()
    assert len(set(a.tolist())) == 100


def test_projection_and_start_are_seeded():
    x = torch.randn(50, 300)
    p1, s1 = coreset_plan(x, seed=3)
    p2, s2 = coreset_plan(x, seed=3)
    assert s1 == s2 and torch.equal(p1, p2) and p1.shape == (50, 128)
    assert p1.dtype == torch.int8 and p1.abs().max() == 127  # global scale uses the full range
    assert coreset_plan(x, seed=3, projection_dim=None)[0] is x


@needs_extension
@pytest.mark.parametrize("device", devices())
def test_int8_kernel_exact_like_reference(device):
    # Quantised inputs: distances are exact integers, ties are real ties.
    x = torch.randint(-127, 128, (4000, 37), generator=torch.Generator().manual_seed(9), dtype=torch.int8)
    x[100:200] = x[:100]  # duplicates
    got = torch.ops.slsg.greedy_coreset(x.to(device), 400, 5).tolist()
    assert got == reference.greedy_coreset(x, 400, 5).tolist()


def test_coreset_covers_clusters():
    # Five far-apart clusters: a 5-point k-center coreset takes one point from each.
    g = torch.Generator().manual_seed(1)
    centers = torch.tensor([[0.0, 0], [100, 0], [0, 100], [100, 100], [50, 50]])
    x = (centers.repeat_interleave(40, 0) + torch.randn(200, 2, generator=g))
    chosen = ops.greedy_coreset(x, 5, projection_dim=None)
    assert sorted((chosen // 40).tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "x,n,match",
    [
        (torch.randn(10), 2, "x must be 2-D"),
        (torch.randn(10, 3), 11, r"n must be in \[1, N=10\]"),
        (torch.randn(10, 3), 0, "n must be in"),
        (torch.randn(0, 3), 1, "x is empty"),
        (torch.randint(0, 3, (10, 3)), 2, "dtype"),
    ],
)
def test_bad_input(x, n, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ops.greedy_coreset(x, n)


@needs_extension
def test_nan_rejected_opcheck_compile():
    x = torch.randn(20, 4)
    x[3, 1] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        torch.ops.slsg.greedy_coreset(x, 5, 0)
    for backend in ("auto", "reference"):  # with and without the projection, whose scale a NaN poisons
        for projection_dim in (None, 2):
            with pytest.raises(ValueError, match="x contains NaN or Inf"):
                ops.greedy_coreset(x, 5, projection_dim=projection_dim, backend=backend)
    torch.library.opcheck(torch.ops.slsg.greedy_coreset.default, (torch.randn(30, 4), 5, 2))
    fn = torch.compile(lambda t: torch.ops.slsg.greedy_coreset(t, 6, 1) + 0, fullgraph=True, backend="aot_eager")
    t = torch.randn(40, 3)
    assert fn(t).tolist() == reference.greedy_coreset(t, 6, 1).tolist()


@needs_extension
@pytest.mark.parametrize("device", devices())
def test_float64_keeps_its_precision(device):
    # Rows 1 and 2 differ by 1e-12: equal in float32, distinct in float64. The kernel must
    # see them as the reference does (it once read float64 through float32).
    x = torch.tensor([[0.0], [1.0], [1.0 + 1e-12]], dtype=torch.float64, device=device)
    assert torch.ops.slsg.greedy_coreset(x, 2, 0).tolist() == reference.greedy_coreset(x, 2, 0).tolist() == [0, 2]
    # Beyond float32's range, but finite in float64.
    big = torch.tensor([[0.0], [1e39], [2e39]], dtype=torch.float64, device=device)
    assert torch.ops.slsg.greedy_coreset(big, 3, 0).tolist() == reference.greedy_coreset(big, 3, 0).tolist()


def test_values_beyond_float32_are_refused():
    # float64 rows are projected in float32: an overflow made the int8 plan all zeros, and the
    # selection silently became index order.
    x = torch.randn(100, 300, dtype=torch.float64)
    x[44, 0] = 1e39
    with pytest.raises(ValueError, match="too large for float32"):
        ops.greedy_coreset(x, 10)
    assert ops.greedy_coreset(x, 10, projection_dim=None).shape == (10,)  # float64 throughout
