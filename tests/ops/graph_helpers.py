"""Shared helpers of the graph op tests."""
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def generator(*seed_parts: int) -> torch.Generator:
    seed = 0
    for part in seed_parts:
        seed = seed * 1009 + int(part)
    return torch.Generator().manual_seed(seed % (2**63))


def kernel_backend(device: str) -> str:
    """The backend that runs our kernel: on CUDA, "auto" runs eager PyTorch for some ops
    (slsg.ops.graph._auto_on_cuda)."""
    return "extension" if device == "cuda" else "auto"


def random_index(B: int, N: int, K: int, g: torch.Generator, device="cpu") -> torch.Tensor:
    return torch.randint(0, N, (B, N, K), generator=g).to(device)


def tolerances(dtype: torch.dtype) -> dict:
    """assert_close tolerances for a kernel against the reference computed in float64."""
    if dtype == torch.float64:
        return {"atol": 1e-10, "rtol": 1e-9}
    if dtype == torch.float32:
        return {"atol": 2e-5, "rtol": 2e-4}
    return {"atol": 3e-2, "rtol": 3e-2}  # float16 / bfloat16 inputs, float32 accumulation


def peak_rss_increase_mib(code: str) -> float:
    """Runs `code` in a fresh interpreter that has imported torch and slsg and defined its
    inputs (everything before the line `# measure`), and returns how much its peak resident
    memory (VmHWM) grew during the rest, in MiB. Peak RSS is what the OS had to provide."""
    setup, measured = code.split("# measure\n")
    script = (
        "import torch, slsg\n"
        "def hwm():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'):\n"
        "            return int(line.split()[1]) / 1024\n"
        + setup
        + "\nbefore = hwm()\n"
        + measured
        + "\nprint('RESULT', hwm() - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [row for row in out.stdout.splitlines() if row.startswith("RESULT")][-1]
    return float(line.split()[1])
