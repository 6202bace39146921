"""CUDA correctness checks against the references, then timings; prints a table last.

Needs only torch (pytest, faiss optional). Run through benchmarks/gpu_check.sh.
"""
from __future__ import annotations

import time

import torch

import slsg
from slsg import ops
from slsg.ops import reference

rows: list[tuple[str, str, str]] = []


def timed(fn, repeat: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def peak_extra(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def record(name: str, value: str, detail: str = "") -> None:
    """Keeps a table row and prints it at once, so a run cut short still shows its rows."""
    rows.append((name, value, detail))
    print(f"{name}  {value}  {detail}", flush=True)


def check(name: str, ok: bool, detail: str = "") -> None:
    record(name, "PASS" if ok else "FAIL", detail)


def guarded(stage) -> None:
    """Runs one stage; an exception becomes a FAIL row, so the later stages and the table follow."""
    try:
        stage()
    except Exception as error:  # noqa: BLE001 - reported, and the exit status says FAIL
        check(f"{stage.__name__} raised", False, f"{type(error).__name__}: {str(error)[:300]}")


def correctness() -> None:
    g = torch.Generator().manual_seed(0)
    for M, K, D, k in [(1, 1, 1, 1), (333, 5000, 13, 4), (4096, 20000, 128, 1), (64, 300, 1030, 10)]:
        x, c, r = torch.randn(M, D, generator=g), torch.randn(K, D, generator=g), torch.rand(K, generator=g)
        for dtype, atol in [(torch.float32, 1e-3), (torch.float16, 5e-1), (torch.bfloat16, 2.0)]:
            xd, cd, rd = x.cuda().to(dtype), c.cuda().to(dtype), r.cuda()
            dist, idx = ops.sphere_distance(xd, cd, rd, k)
            ref, _ = reference.sphere_distance(xd.float().cpu(), cd.float().cpu(), r, k)
            err = (dist.cpu().double() - ref.double()).abs().max().item()
            check(f"sphere_distance {M}x{K}x{D} k={k} {str(dtype)[6:]}", err <= atol * max(1.0, D / 128), f"max err {err:.2e}")
    x = torch.randn(20000, 64, generator=g)
    same = ops.greedy_coreset(x.cuda(), 500, projection_dim=None).cpu().tolist() == ops.greedy_coreset(x, 500, projection_dim=None, backend="reference").tolist()
    check("greedy_coreset 20000x64 n=500 == reference", same)
    s = torch.randn(16, 65536, generator=g)
    err = (ops.topk_mean(s.cuda(), 100).cpu() - reference.topk_mean(s, 100)).abs().max().item()
    check("topk_mean 16x65536 k=100", err < 1e-5, f"max err {err:.1e}")
    xg = torch.randn(50, 8, dtype=torch.float64, device="cuda", requires_grad=True)
    cg = torch.randn(70, 8, dtype=torch.float64, device="cuda", requires_grad=True)
    check("sphere_distance gradcheck float64", torch.autograd.gradcheck(lambda a, b: ops.sphere_distance(a, b, k=2)[0], (xg, cg)))


def chunked_distances(x, c, rows=4096):
    """Squared distances [rows, K] block by block: the eager peers' addmm."""
    cn = c.square().sum(1)
    for xb in x.split(rows):
        yield torch.addmm(cn, xb, c.T, alpha=-2).add_(xb.square().sum(1, keepdim=True))


def chunked_addmm_min(x, c):
    return [d.min(1) for d in chunked_distances(x, c)]


def chunked_addmm_topk(x, c, k):
    return [d.topk(k, dim=1, largest=False) for d in chunked_distances(x, c)]


def benchmarks() -> None:
    torch.manual_seed(0)
    for M, K, D in [(65536, 200000, 1024), (65536, 200000, 128), (4096, 16384, 384)]:
        x = torch.randn(M, D, device="cuda")
        c = torch.randn(K, D, device="cuda")
        t_ours = timed(lambda: ops.sphere_distance(x, c), repeat=2)
        t_ref = timed(lambda: chunked_addmm_min(x, c), repeat=2)
        before = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = True  # an inexact peer: TF32 products only
            t_tf32 = timed(lambda: chunked_addmm_min(x, c), repeat=2)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
        mem = peak_extra(lambda: ops.sphere_distance(x, c))
        record(f"sphere_distance fp32 M={M} K={K} D={D}", f"{t_ours * 1e3:.1f} ms",
               f"addmm+min {t_ref * 1e3:.1f} ms, speed-up {t_ref / t_ours:.2f}x (target 1.5x at D=1024), "
               f"extra {mem:.0f} MiB; inexact TF32 addmm+min {t_tf32 * 1e3:.1f} ms")
        for dtype in (torch.float16, torch.bfloat16):
            xh, ch = x.to(dtype), c.to(dtype)
            t_h = timed(lambda: ops.sphere_distance(xh, ch), repeat=1)
            record(f"sphere_distance {str(dtype)[6:]} M={M} K={K} D={D}", f"{t_h * 1e3:.1f} ms")
        del x, c
    # k > 1: the k-value warp selection (k <= 16) and the one-thread-per-query scan (k > 16).
    x, c = torch.randn(65536, 384, device="cuda"), torch.randn(200000, 384, device="cuda")
    for k in (8, 32):
        t_ours = timed(lambda: ops.sphere_distance(x, c, k=k), repeat=1)
        t_ref = timed(lambda: chunked_addmm_topk(x, c, k), repeat=1)
        record(f"sphere_distance fp32 M=65536 K=200000 D=384 k={k}", f"{t_ours * 1e3:.1f} ms",
               f"addmm+topk {t_ref * 1e3:.1f} ms, speed-up {t_ref / t_ours:.2f}x")
    del x, c
    x = torch.randn(214016, 1536, device="cuda")
    t = timed(lambda: ops.greedy_coreset(x, 21401), repeat=1)
    record("greedy_coreset 214016x1536 -> 10%", f"{t:.2f} s", "projection_dim=128")


def finish(title: str) -> None:
    """Print the collected rows as a table and exit non-zero if any check failed."""
    width = max(len(r[0]) for r in rows)
    print(f"\n== {title}")
    for name, value, detail in rows:
        print(f"{name:<{width}}  {value:>10}  {detail}")
    raise SystemExit(1 if any(r[1] == "FAIL" for r in rows) else 0)


if __name__ == "__main__":
    assert torch.cuda.is_available(), "no CUDA device"
    print("backend:", slsg.ops.backend())
    guarded(correctness)
    guarded(benchmarks)
    finish("GPU check summary")
