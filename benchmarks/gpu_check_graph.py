"""CUDA check of the graph ops: a few direct comparisons with the references, then GPU
timings; prints a short table last. Builds nothing and runs no tests (benchmarks/gpu_check.sh
builds, runs every CUDA test, then calls this). Target: a few minutes on one GPU.

Figures:
- dense_graph_attention vs torch SDPA, with and without an additive bias [H, N, N],
  forward and forward + backward; peak extra memory from torch.cuda.max_memory_allocated.
- sparse_graph_attention and max_relative: effective bandwidth (the bytes the op must
  move at least, over its time) as a percentage of a large device-to-device copy.
- knn_graph vs normalise + bmm + topk.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import slsg
from slsg import ops
from slsg.nn import SelfAttentiveGraphConv
from slsg.ops import graph_reference

# Shared with the scoring check (run as scripts, benchmarks/ is on sys.path): one table.
from gpu_check import check, finish, guarded, peak_extra, record, timed  # noqa: E402


def max_err(a, b) -> float:
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def correctness() -> None:
    g = torch.Generator().manual_seed(0)
    B, H, N, D, K = 2, 4, 777, 48, 9
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    index = torch.randint(0, N, (B, N, K), generator=g)
    bias = torch.randn(H, N, N, generator=g) * 0.5
    for dtype, tol in [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 6e-2)]:
        name = str(dtype)[6:]
        qd, kd, vd = (t.cuda().to(dtype) for t in (q, k, v))
        ref_in = [t.to(dtype).double() for t in (q, k, v)]
        err = max_err(ops.dense_graph_attention(qd, kd, vd, bias.cuda().to(dtype), backend="extension"),
                      graph_reference.dense_graph_attention(*ref_in, bias.to(dtype).double()))
        check(f"dense_graph_attention {name} B={B} H={H} N={N} D={D}", err < tol, f"max err {err:.1e}")
        err = max_err(ops.sparse_graph_attention(qd, kd, vd, index.cuda()),
                      graph_reference.sparse_graph_attention(*ref_in, index))
        check(f"sparse_graph_attention {name}", err < tol, f"max err {err:.1e}")
    x = torch.randn(B, N, 64, generator=g)
    same = torch.equal(ops.knn_graph(x.double().cuda(), 9, 3, backend="extension").cpu(), graph_reference.knn_graph(x.double(), 9, 3))
    check("knn_graph float64 == reference", same)
    # Gradients on the GPU against float64 finite differences (small sizes).
    small = [torch.randn(2, 2, 6, 5, dtype=torch.float64, device="cuda", requires_grad=True) for _ in range(3)]
    sb = torch.randn(2, 6, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    check("dense_graph_attention gradcheck float64",
          torch.autograd.gradcheck(lambda a, b, c, d: ops.dense_graph_attention(a, b, c, d, backend="extension"), (*small, sb)))
    si = torch.randint(0, 6, (2, 6, 3), device="cuda")
    eb = torch.randn(2, 2, 6, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    check("sparse_graph_attention gradcheck float64",
          torch.autograd.gradcheck(lambda a, b, c, d: ops.sparse_graph_attention(a, b, c, si, d), (*small, eb)))
    # The layer: extension and reference backends agree on the GPU.
    x = torch.randn(4, 64, 12, 12, generator=g).cuda()
    outs = []
    for backend in ("extension", "reference"):
        torch.manual_seed(0)
        layer = SelfAttentiveGraphConv(64, heads=4, backend=backend).cuda()
        leaf = x.clone().requires_grad_()
        out = layer(leaf)
        out.square().mean().backward()
        outs.append((out.detach(), leaf.grad))
    err = max(max_err(a, b) for a, b in zip(*outs))
    check("SelfAttentiveGraphConv extension == reference (CUDA)", err < 1e-3, f"max err {err:.1e}")


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy: the practical peak."""
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(lambda: dst.copy_(src))


B, C = 8, 256  # the benchmarks' batch and channels


def dense_benchmarks() -> None:
    torch.manual_seed(0)
    for N in (1024, 4096):
        for H in (1, 8):
            D = C // H
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype) for _ in range(3))
                bias = 0.1 * torch.randn(H, N, N, device="cuda", dtype=dtype)
                for with_bias in (False, True):
                    b = bias if with_bias else None
                    b4 = b[None] if with_bias else None  # SDPA's fused kernels want a 4-D mask
                    label = f"dense {str(dtype)[6:]} B={B} H={H} N={N} D={D}{' +bias' if with_bias else ''}"
                    ours = lambda: ops.dense_graph_attention(q, k, v, b, backend="extension")  # noqa: E731
                    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=b4)  # noqa: E731
                    t_ours, t_sdpa = timed(ours, 3), timed(sdpa, 3)
                    record(label + " fwd", f"{t_ours * 1e3:.2f} ms",
                           f"sdpa {t_sdpa * 1e3:.2f} ms, sdpa/ours {t_sdpa / t_ours:.2f}, extra {peak_extra(ours):.0f} vs {peak_extra(sdpa):.0f} MiB")
                    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                    grad = torch.randn(B, H, N, D, device="cuda", dtype=dtype)
                    ours_fb = lambda: torch.autograd.grad(ops.dense_graph_attention(*leaves, b, backend="extension"), leaves, grad)  # noqa: E731
                    sdpa_fb = lambda: torch.autograd.grad(F.scaled_dot_product_attention(*leaves, attn_mask=b4), leaves, grad)  # noqa: E731
                    t_ours, t_sdpa = timed(ours_fb, 3), timed(sdpa_fb, 3)
                    record(label + " fwd+bwd", f"{t_ours * 1e3:.2f} ms",
                           f"sdpa {t_sdpa * 1e3:.2f} ms, sdpa/ours {t_sdpa / t_ours:.2f}, extra {peak_extra(ours_fb):.0f} vs {peak_extra(sdpa_fb):.0f} MiB")
                del q, k, v, bias


def gather_benchmarks() -> None:
    torch.manual_seed(0)
    peak = copy_bandwidth()
    record("device-to-device copy", f"{peak / 1e9:.0f} GB/s", "the 100% of the bandwidth figures")
    K = 9
    for N, H in ((4096, 1), (4096, 8), (16384, 4)):
        D = C // H
        for dtype in (torch.bfloat16, torch.float32):
            q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype) for _ in range(3))
            index = torch.randint(0, N, (B, N, K), device="cuda")
            size = q.element_size()
            # q read once, K neighbour rows of k and v, out written, the index read.
            moved = B * H * N * D * size * (1 + 2 * K + 1) + index.numel() * 8
            t = timed(lambda: ops.sparse_graph_attention(q, k, v, index))
            t_ref = timed(lambda: graph_reference.sparse_graph_attention(q, k, v, index), 2)
            record(f"sparse {str(dtype)[6:]} B={B} H={H} N={N} D={D} K={K}", f"{t * 1e3:.2f} ms",
                   f"{moved / t / 1e9:.0f} GB/s = {100 * moved / t / peak:.0f}% of copy; reference {t_ref * 1e3:.2f} ms")
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            fb = lambda fn: lambda: torch.autograd.grad(fn(*leaves, index).sum(), leaves)  # noqa: E731
            t_fb = timed(fb(ops.sparse_graph_attention))
            t_fb_ref = timed(fb(graph_reference.sparse_graph_attention), 2)
            record("  sparse fwd+bwd", f"{t_fb * 1e3:.2f} ms", f"reference {t_fb_ref * 1e3:.2f} ms, "
                   f"ratio {t_fb_ref / t_fb:.2f}x; extra {peak_extra(fb(ops.sparse_graph_attention)):.0f} vs "
                   f"{peak_extra(fb(graph_reference.sparse_graph_attention)):.0f} MiB")
            x = torch.randn(B, N, C, device="cuda", dtype=dtype)
            moved = x.numel() * size * (K + 2) + index.numel() * 8
            t = timed(lambda: ops.max_relative(x, index))
            t_ref = timed(lambda: graph_reference.max_relative(x, index), 2)
            record(f"max_relative {str(dtype)[6:]} B={B} N={N} C={C} K={K}", f"{t * 1e3:.2f} ms",
                   f"{moved / t / 1e9:.0f} GB/s = {100 * moved / t / peak:.0f}% of copy; reference {t_ref * 1e3:.2f} ms")
            del q, k, v, x


def knn_benchmarks() -> None:
    torch.manual_seed(0)
    for N in (1024, 4096):
        x = torch.randn(B, N, C, device="cuda")
        bias = 0.1 * torch.randn(N, N, device="cuda")

        def matmul_topk():
            xn = F.normalize(x, dim=-1)
            return torch.baddbmm(bias.expand(B, -1, -1), xn, xn.transpose(1, 2)).topk(27, dim=-1).indices[:, :, ::3]

        ours = lambda: ops.knn_graph(x, 9, 3, bias, backend="extension")  # noqa: E731
        eager = lambda: graph_reference.knn_graph(x, 9, 3, bias)  # noqa: E731
        t, t_ref, t_eager = timed(ours), timed(matmul_topk), timed(eager)
        record(f"knn_graph fp32 B={B} N={N} C={C} k=9 d=3", f"{t * 1e3:.2f} ms",
               f"matmul+topk {t_ref * 1e3:.2f} ms, reference (blocked, stable sort) {t_eager * 1e3:.2f} ms, "
               f"extra {peak_extra(ours):.0f} vs {peak_extra(matmul_topk):.0f} vs {peak_extra(eager):.0f} MiB")


def layer_benchmarks() -> None:
    """The layer at N = 1024 (32 x 32 nodes), forward + backward, per backend."""
    x = torch.randn(B, C, 32, 32, device="cuda")
    for heads in (1, 8):
        times = {}
        for backend in ("auto", "extension", "reference"):
            torch.manual_seed(0)
            layer = SelfAttentiveGraphConv(C, heads=heads, backend=backend).cuda()
            leaf = x.clone().requires_grad_()
            step = lambda: layer(leaf).square().mean().backward()  # noqa: E731
            times[backend] = timed(step, 3)
            mem = peak_extra(step)
            record(f"SelfAttentiveGraphConv fp32 B={B} C={C} N=1024 heads={heads} {backend} fwd+bwd",
                   f"{times[backend] * 1e3:.2f} ms", f"extra {mem:.0f} MiB")
        record(f"  layer heads={heads}: reference / auto", f"{times['reference'] / times['auto']:.2f}x", "")


if __name__ == "__main__":
    assert torch.cuda.is_available(), "no CUDA device"
    print("backend:", slsg.ops.backend())
    parts = os.environ.get("GRAPH_PARTS", "correctness,dense,gather,knn,layer").split(",")
    for name in parts:
        guarded({"correctness": correctness, "dense": dense_benchmarks, "gather": gather_benchmarks,
                 "knn": knn_benchmarks, "layer": layer_benchmarks}[name])
    finish("GPU graph check summary")
