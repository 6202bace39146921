import pytest
import torch

from slsg import ops
from slsg.ops import reference

from .helpers import devices, needs_extension, noncontiguous


def exact_values(x, centers, radii, index):
    """||x - c||^2 - r^2 at the returned indices, computed directly in float64."""
    diff = x.double().unsqueeze(1) - centers.double()[index]
    values = diff.square().sum(-1)
    if radii is not None:
        values = values - radii.double()[index].square()
    return values


def check_against_reference(x, centers, radii, k, atol=1e-3):
    dist, index = ops.sphere_distance(x, centers, radii, k)
    ref_dist, _ = reference.sphere_distance(x.cpu(), centers.cpu(), None if radii is None else radii.cpu(), k)
    assert dist.shape == (x.shape[0], k) and index.shape == (x.shape[0], k)
    assert index.dtype == torch.long
    # Distances agree with the reference; returned indices really achieve them.
    torch.testing.assert_close(dist.cpu().double(), ref_dist.double(), atol=atol, rtol=1e-4)
    torch.testing.assert_close(exact_values(x.cpu(), centers.cpu(), radii.cpu() if radii is not None else None, index.cpu()), dist.cpu().double(), atol=atol, rtol=1e-4)
    assert (dist[:, 1:] >= dist[:, :-1]).all(), "distances must be ascending"
    assert (index.sort(1).values.diff(dim=1) != 0).all(), "indices within a row must differ"


@needs_extension
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "M,K,D,k",
    [(1, 1, 1, 1), (1, 7, 3, 7), (37, 1, 13, 1), (200, 5000, 13, 4), (513, 4097, 64, 1), (64, 300, 130, 10),
     (130, 1000, 517, 3)],  # the last: several GEMM depth blocks, ragged row and column tiles
)
@pytest.mark.parametrize("with_radii", [False, True])
def test_matches_reference(device, M, K, D, k, with_radii):
    g = torch.Generator().manual_seed(M * 7919 + K * 31 + D + k)
    x = torch.randn(M, D, generator=g).to(device)
    centers = torch.randn(K, D, generator=g).to(device)
    radii = torch.rand(K, generator=g).to(device) if with_radii else None
    check_against_reference(x, centers, radii, k)


@needs_extension
def test_noncontiguous_inputs():
    g = torch.Generator().manual_seed(1)
    x, centers, radii = torch.randn(100, 33, generator=g), torch.randn(700, 33, generator=g), torch.rand(1400, generator=g)[::2]
    assert not radii.is_contiguous()
    a = ops.sphere_distance(noncontiguous(x), noncontiguous(centers), radii, k=3)
    b = ops.sphere_distance(x, centers, radii.contiguous(), k=3)
    torch.testing.assert_close(a, b)


@needs_extension
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 5, 16, 17, 40])
def test_small_integers_give_the_reference_exactly(device, dtype, k):
    # Coordinates in {-2..2}: every value is exact in every dtype (TF32 included), so each
    # path (one-value and k-value warp selection, the serial scan beyond k = 16, TF32
    # screening) must return exactly the reference's values and indices, ties included.
    g = torch.Generator().manual_seed(k)
    centers = torch.randint(-2, 3, (300, 3), generator=g).float()
    x = torch.randint(-2, 3, (70, 3), generator=g).float()
    radii = torch.randint(0, 2, (300,), generator=g).float()
    for r in (None, radii):
        dist, index = ops.sphere_distance(x.to(device, dtype), centers.to(device, dtype),
                                          None if r is None else r.to(device, dtype), k)
        ref_dist, ref_index = reference.sphere_distance(x, centers, r, k)
        assert torch.equal(index.cpu(), ref_index)
        assert torch.equal(dist.cpu().float(), ref_dist)


def clustered_centres(queries: int, per_query: int, D: int, g: torch.Generator, first=0.05, step=1e-3):
    """Queries, and per_query centres around each with squared distances first, first + step,
    ... in a shuffled index order; then as many random far centres. The gaps (step) are far
    above float32 rounding but below TF32's error and the CUDA screening bound."""
    x = torch.randn(queries, D, generator=g, dtype=torch.float64)
    d2 = first + step * torch.stack([torch.randperm(per_query, generator=g) for _ in range(queries)]).double()
    u = torch.nn.functional.normalize(torch.randn(queries, per_query, D, generator=g, dtype=torch.float64), dim=-1)
    near = (x[:, None] + d2.sqrt()[..., None] * u).reshape(-1, D)
    centers = torch.cat([near, 3 * torch.randn(queries * per_query, D, generator=g, dtype=torch.float64)])
    return x.float(), centers.float()


@needs_extension
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("k", [3, 20])
def test_near_duplicate_centres(device, k):
    # 400 centres per query inside the CUDA TF32 screening's bound: its candidate list
    # overflows and the exact float32 path takes over (k = 20: the exact path throughout).
    x, centers = clustered_centres(10, 400, 64, torch.Generator().manual_seed(11))
    dist, index = ops.sphere_distance(x.to(device), centers.to(device), k=k)
    ref_dist, ref_index = reference.sphere_distance(x.double(), centers.double(), None, k)
    assert torch.equal(index.cpu(), ref_index)
    torch.testing.assert_close(dist.cpu().double(), ref_dist, atol=1e-4, rtol=0)


@needs_extension
@pytest.mark.parametrize("device", devices())
def test_tiny_vectors_whose_products_are_subnormal(device):
    # Components ~1e-20: every x.c product is subnormal (< 1.2e-38), which tensor cores may
    # flush to zero; a purely relative screening bound would then rank the zero centre first.
    # In float32 the exact values are 0 for the query's copy and ~1e-40 for the zero centre.
    x = torch.tensor([[1e-20, 0.0, 0.0, 0.0], [0.0, 2e-20, 0.0, 0.0]])
    centers = torch.cat([torch.zeros(3, 4), x, torch.zeros(2, 4)])
    for k in (1, 2):
        dist, index = ops.sphere_distance(x.to(device), centers.to(device), k=k)
        ref_dist, ref_index = reference.sphere_distance(x, centers, None, k)
        assert torch.equal(index.cpu(), ref_index), (index, ref_index)
        assert index[:, 0].tolist() == [3, 4] and torch.equal(dist[:, 0].cpu(), torch.zeros(2))
        torch.testing.assert_close(dist.cpu(), ref_dist, atol=1e-44, rtol=0)


@needs_extension
@pytest.mark.parametrize("device", devices())
def test_ties_across_centre_tiles(device):
    # Exact duplicates 4500 rows apart (CUDA centre tiles hold 4096): the lowest index wins.
    g = torch.Generator().manual_seed(14)
    half = torch.randint(-3, 4, (4500, 4), generator=g).float()
    centers = torch.cat([half, half])
    x = torch.randint(-3, 4, (50, 4), generator=g).float()
    for k in (1, 4, 16, 17):
        dist, index = ops.sphere_distance(x.to(device), centers.to(device), k=k)
        ref_dist, ref_index = reference.sphere_distance(x, centers, None, k)
        assert torch.equal(index.cpu(), ref_index) and torch.equal(dist.cpu(), ref_dist)


@needs_extension
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_several_query_and_centre_tiles(device, dtype):
    g = torch.Generator().manual_seed(12)
    x, centers = torch.randn(4100, 8, generator=g), torch.randn(5000, 8, generator=g)
    x, centers = x.to(dtype).float(), centers.to(dtype).float()  # representable in dtype
    dist, index = ops.sphere_distance(x.to(device, dtype), centers.to(device, dtype), k=2)
    ref_dist, _ = reference.sphere_distance(x, centers, None, 2)
    torch.testing.assert_close(dist.cpu().float(), ref_dist, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(exact_values(x, centers, None, index.cpu()).float(), ref_dist, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_extension
def test_cuda_result_ignores_the_tf32_setting():
    # Squared distances 1e-3 apart around each query, |x|^2 ~ 256: TF32 products (error ~0.1)
    # would scramble their order; float32 (error ~1e-4) does not.
    x, centers = clustered_centres(40, 30, 256, torch.Generator().manual_seed(13))
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        for k in (1, 4, 20):  # screened (k <= 16) and exact paths
            _, ref_index = reference.sphere_distance(x.double(), centers.double(), None, k)
            for dtype in (torch.float32, torch.float64):
                _, index = ops.sphere_distance(x.cuda().to(dtype), centers.cuda().to(dtype), k=k)
                assert torch.equal(index.cpu(), ref_index)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_exact_ties_go_to_lowest_index(backend):
    # Small integers make every distance exact in float32, so ties are real ties.
    centers = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    x = torch.zeros(3, 2)
    dist, index = ops.sphere_distance(x, centers, k=6, backend=backend)
    assert (dist == 1).all()
    assert index.tolist() == [[0, 1, 2, 3, 4, 5]] * 3
    dist, index = ops.sphere_distance(torch.tensor([[2.0, 0.0]]), centers, k=2, backend=backend)
    assert index.tolist() == [[0, 2]] and dist.tolist() == [[1.0, 1.0]]
    # Radii can create ties between different centres too.
    # x = (2, 0): c1, c4, c5 are at 5; c3 at 9 - r^2 = 5 with r = 2: four-way tie at 5.
    radii = torch.tensor([0.0, 0.0, 0.0, 2.0, 0.0, 0.0])
    dist, index = ops.sphere_distance(torch.tensor([[2.0, 0.0]]), centers, radii, k=4, backend=backend)
    assert index.tolist() == [[0, 2, 1, 3]] and dist.tolist() == [[1.0, 1.0, 5.0, 5.0]]


def test_radii_shift_the_nearest_sphere():
    centers = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    x = torch.tensor([[1.0, 0.0]])
    assert ops.sphere_distance(x, centers)[1].item() == 0
    dist, index = ops.sphere_distance(x, centers, torch.tensor([0.0, 2.5]))
    assert index.item() == 1 and dist.item() == pytest.approx(4.0 - 6.25)


def test_empty_queries():
    dist, index = ops.sphere_distance(torch.zeros(0, 5), torch.randn(4, 5), k=2)
    assert dist.shape == (0, 2) and index.shape == (0, 2)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((torch.randn(3, 4).int(), torch.randn(5, 4)), {}, "dtype"),
        ((torch.randn(3, 4), torch.randn(5, 4).double()), {}, "dtype mismatch"),
        ((torch.randn(4), torch.randn(5, 4)), {}, "x must be 2-D"),
        ((torch.randn(3, 4), torch.randn(5, 4, 1)), {}, "centers must be 2-D"),
        ((torch.randn(3, 4), torch.randn(5, 6)), {}, "feature sizes differ"),
        ((torch.randn(3, 4), torch.randn(0, 4)), {}, "centers is empty"),
        ((torch.randn(3, 4), torch.randn(5, 4)), {"k": 6}, r"k must be in \[1, K=5\]"),
        ((torch.randn(3, 4), torch.randn(5, 4)), {"k": 0}, "k must be in"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.rand(4)), {}, "radii has 4 entries"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.rand(5, 1)), {}, "radii must be 1-D"),
        (([[1.0]], torch.randn(5, 1)), {}, "must be a torch.Tensor"),
        ((torch.randn(3, 0), torch.randn(5, 0)), {}, "D is 0"),
    ],
)
def test_bad_input_names_the_problem(args, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ops.sphere_distance(*args, **kwargs)


@needs_extension
@pytest.mark.parametrize("device", devices())
def test_non_finite_input_is_rejected(device):
    x = torch.randn(3, 4, device=device)
    x[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        ops.sphere_distance(x, torch.randn(5, 4, device=device))
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        ops.sphere_distance(torch.randn(3, 4, device=device), torch.full((5, 4), float("inf"), device=device))
    radii = torch.ones(5, device=device)
    radii[3] = float("nan")
    with pytest.raises(RuntimeError, match="radii contain NaN or Inf"):
        ops.sphere_distance(torch.randn(3, 4, device=device), torch.randn(5, 4, device=device), radii)
    radii[3] = 1.9e19  # finite in float32, its square is not: the message must not only say "Inf"
    with pytest.raises(RuntimeError, match="too large to square"):
        ops.sphere_distance(torch.randn(3, 4, device=device), torch.randn(5, 4, device=device), radii)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to test device mismatch")
def test_device_mismatch():
    with pytest.raises(ValueError, match="different devices"):
        ops.sphere_distance(torch.randn(3, 4), torch.randn(5, 4, device="cuda"))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_gradcheck_float64(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    centers = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    radii = torch.rand(9, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b, c: ops.sphere_distance(a, b, c, k=3, backend=backend)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, centers, radii))


@needs_extension
def test_gradients_match_reference():
    g = torch.Generator().manual_seed(4)
    inputs = [torch.randn(20, 7, generator=g), torch.randn(30, 7, generator=g), torch.rand(30, generator=g)]
    grads = []
    for backend in ("extension", "reference"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        dist, _ = ops.sphere_distance(*leaves, k=2, backend=backend)
        (dist * torch.arange(1.0, 3.0)).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@needs_extension
def test_opcheck():
    g = torch.Generator().manual_seed(5)
    for radii in (None, torch.rand(40, generator=g)):
        args = (torch.randn(10, 8, generator=g), torch.randn(40, 8, generator=g), radii, 3)
        torch.library.opcheck(torch.ops.slsg.sphere_distance.default, args)
    args = (torch.randn(10, 8, dtype=torch.float64, requires_grad=True), torch.randn(40, 8, dtype=torch.float64, requires_grad=True), None, 2)
    torch.library.opcheck(torch.ops.slsg.sphere_distance.default, args)


@needs_extension
def test_torch_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def score(x, centers):
        dist, _ = ops.sphere_distance(x, centers, k=2)
        return dist.mean(1).sqrt()

    x, centers = torch.randn(50, 16), torch.randn(80, 16)
    torch.testing.assert_close(score(x, centers), ops.sphere_distance(x, centers, k=2)[0].mean(1).sqrt())


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_squared_norms_beyond_float32_are_refused(backend):
    x, centers = torch.randn(2, 64) * 1e19, torch.randn(5, 64) * 1e19
    with pytest.raises((ValueError, RuntimeError), match="overflow|too large"):
        ops.sphere_distance(x, centers, backend=backend)


@needs_extension
@pytest.mark.parametrize("device", devices())
def test_values_that_overflow_the_expansion_are_refused(device):
    # Each squared norm is 1e38 (finite in float32) but ||x||^2 + ||c||^2 - 2 x.c = 4e38 is
    # not: the CPU kernel returned +inf with an arbitrary index, the CUDA one index -1.
    x = torch.full((2, 4), 5e18, device=device)
    with pytest.raises(RuntimeError, match="too large for this dtype"):
        torch.ops.slsg.sphere_distance(x, -x, None, 1)
    dist, _ = torch.ops.slsg.sphere_distance(x / 2, -x / 2, None, 1)  # (5e18 + 5e18)^2 fits
    assert torch.isfinite(dist).all()


@needs_extension
def test_float64_results_do_not_depend_on_the_thread_count():
    # Queries halfway between two centres: the float64 (BLAS) path's blocks followed the
    # thread count, and their rounding flipped these near ties between 1 and 2 threads.
    g = torch.Generator().manual_seed(12)
    c = torch.randn(600, 33, generator=g, dtype=torch.float64)
    x = (c[:40] + c[40:80]) / 2
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(torch.ops.slsg.sphere_distance(x, c, None, 2))
    finally:
        torch.set_num_threads(old)
    for dist, index in results[1:]:
        assert torch.equal(index, results[0][1]) and torch.equal(dist, results[0][0])
