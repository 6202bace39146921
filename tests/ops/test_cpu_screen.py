"""sphere_distance's bfloat16 screen (float32 on CPUs with AVX-512 BF16) must return exactly
what the unscreened kernel returns (SLSG_CPU_SCREEN=off), bit for bit: same distances, same
indices, same tie order. The cases reach every path: candidates re-computed exactly, a row
with too many candidates (duplicates) computed in full, a block whose margins are too wide
for its data (clusters far from each other) computed in full, shifted features (offset from
the origin), radii, subnormal-sized values, odd and large depths, the smallest depth and
bank it screens (48, 1,024). Runs in subprocesses: the
switch is read once per process."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from .helpers import needs_extension

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import slsg
    from slsg import ops
    g = torch.Generator().manual_seed(int(sys.argv[2]))
    def randn(*shape):
        return torch.randn(*shape, generator=g)
    cases = []
    for D in (47, 48, 65, 300, 1030):
        for k in (1, 5, 64, 65):
            cases.append((randn(97, D), randn(3000, D), None, k))
    D = 200
    c = randn(3000, D)
    c[1000:2500] = c[0]  # one query below sees 1,501 centres at one distance
    x = torch.cat([randn(100, D), c[:20] + 1e-3 * randn(20, D)])
    cases += [(x, c, None, 3), (x, c, torch.rand(3000, generator=g), 3)]
    clusters = randn(4, D) * 100
    c = clusters[torch.randint(0, 4, (4000,), generator=g)] + randn(4000, D)
    x = clusters[torch.randint(0, 4, (300,), generator=g)] + randn(300, D)
    cases += [(x, c, None, 5), (x, c, 20 * torch.rand(4000, generator=g), 5)]
    x, c = randn(500, 256).abs() + 3, randn(5000, 256).abs() + 3  # far from the origin
    cases += [(x, c, None, 2), (x, c, 2 * torch.rand(5000, generator=g), 4)]
    cases.append((randn(300, 256)[:, ::2], randn(2000, 256)[:, 1::2], None, 2))  # non-contiguous
    cases.append((randn(3, 100) * 1e-30, randn(2000, 100) * 1e-30, None, 2))  # subnormal products
    cases.append((randn(50, 64), randn(1024, 64), None, 3))  # the fewest centres it screens
    cases.append((randn(1, 64), randn(1, 64), None, 1))
    q = randn(64, 96).round()  # exact ties: integer lattice values
    cases.append((q, torch.cat([q, q, randn(1500, 96).round()]), None, 4))
    out = [ops.sphere_distance(x, c, r, k=k) for x, c, r, k in cases]
    torch.save({"screen": slsg.ops.backend().cpu_screen, "out": out}, sys.argv[1])
    """
)


def run(tmp_path, screen: str, seed: int):
    path = tmp_path / f"{screen}-{seed}.pt"
    env = dict(os.environ, SLSG_CPU_SCREEN=screen)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(seed)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(path)


@needs_extension
@pytest.mark.parametrize("seed", [0, 1])
def test_screen_returns_what_the_exact_kernel_returns(tmp_path, seed):
    screened, exact = run(tmp_path, "auto", seed), run(tmp_path, "off", seed)
    assert exact["screen"] == "off"
    if screened["screen"] != "bf16":
        pytest.skip("this CPU lacks AVX-512 BF16: sphere_distance does not screen here")
    assert len(screened["out"]) == len(exact["out"])
    for n, ((d, i), (d_ref, i_ref)) in enumerate(zip(screened["out"], exact["out"])):
        assert torch.equal(i, i_ref), f"case {n}: indices differ"
        assert torch.equal(d, d_ref), f"case {n}: distances differ"
