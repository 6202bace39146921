"""The CPU kernels' BLAS path (CPUs without AVX2/FMA, forced here with SLSG_CPU_GEMM=blas),
and the attention kernels' ATen path (torch builds without BLAS symbols, forced with
SLSG_CPU_BLAS=aten), must give what the AVX2 micro-kernel path and the references give.
Runs in a subprocess: the switches are read once per process."""
import os
import subprocess
import sys
import textwrap

from .helpers import needs_extension

SCRIPT = textwrap.dedent(
    """
    import torch
    import slsg
    from slsg import ops
    from slsg.ops import graph_reference, reference
    g = torch.Generator().manual_seed(5)
    x, c = torch.randn(130, 517, generator=g), torch.randn(1000, 517, generator=g)
    r = torch.rand(1000, generator=g)
    d, i = ops.sphere_distance(x, c, r, k=3)
    d_ref, i_ref = reference.sphere_distance(x, c, r, k=3)
    torch.testing.assert_close(d, d_ref, rtol=1e-4, atol=1e-3)
    nodes = torch.randn(2, 600, 40, generator=g)
    bias = 0.1 * torch.randn(600, 600, generator=g)
    for b in (None, bias):
        got = ops.knn_graph(nodes, 5, 2, b)
        want = graph_reference.knn_graph(nodes.double(), 5, 2, None if b is None else b.double())
        xn = torch.nn.functional.normalize(nodes.double(), dim=-1)
        sim = xn @ xn.transpose(1, 2) + (0 if b is None else b.double())
        torch.testing.assert_close(sim.gather(2, got), sim.gather(2, want), atol=1e-5, rtol=0)
    # Dense attention: every product layout of the tiles (ragged tiles, widths on both sides
    # of the strided kernel's limit for A^T . B), separate and shared q/k, bias gradient.
    checksum = 0.0
    for n, dk, dv in ((300, 40, 70), (130, 200, 136)):
        q, k, v = (torch.randn(2, 2, n, w, generator=g, requires_grad=True) for w in (dk, dk, dv))
        bias = torch.randn(2, n, n, generator=g, requires_grad=True)
        for shared in (False, True):
            key = q if shared else k
            out = ops.dense_graph_attention(q, key, v, bias)
            want = graph_reference.dense_graph_attention(q.double(), key.double(), v.double(), bias.double())
            torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
            leaves = (q, v, bias) if shared else (q, k, v, bias)
            got = torch.autograd.grad(out.sum(), leaves)
            expected = torch.autograd.grad(want.sum(), leaves)
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
            checksum += out.double().abs().sum().item() + sum(a.double().abs().sum().item() for a in got)
    # A row whose products overflow, at scale 0: BLAS reads neither operand (no 0 * inf).
    q = torch.full((1, 1, 4, 64), 1e20)
    v = torch.randn(1, 1, 4, 8, generator=g)
    flat = ops.dense_graph_attention(q, q.clone(), v, None, 0.0)
    torch.testing.assert_close(flat, v.mean(2, keepdim=True).expand_as(flat))
    info = slsg.ops.backend()
    print("ok", d.sum().item(), info.cpu_gemm, info.cpu_blas, checksum)
    """
)


def run(**switches):
    env = dict(os.environ, **switches)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


@needs_extension
def test_blas_path_matches_kernel_path_and_reference():
    blas, own = run(SLSG_CPU_GEMM="blas"), run(SLSG_CPU_GEMM="auto")
    assert blas[0] == own[0] == "ok"
    assert blas[2] == "blas" and own[2] in ("avx2", "blas")  # "blas" on CPUs without AVX2/FMA
    assert abs(float(blas[1]) - float(own[1])) <= 1e-3 * abs(float(own[1]))


@needs_extension
def test_attention_products_through_aten_match_the_direct_ones():
    # SLSG_CPU_BLAS=aten: the path of torch builds that export no sgemm_/dgemm_.
    aten, direct = run(SLSG_CPU_BLAS="aten", SLSG_CPU_GEMM="blas"), run()
    assert aten[0] == direct[0] == "ok"
    assert aten[3] == "aten" and direct[3] in ("direct", "aten")
    assert abs(float(aten[4]) - float(direct[4])) <= 1e-5 * abs(float(direct[4]))
