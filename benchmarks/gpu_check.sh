#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU, a CUDA toolkit and torch (any recent
# version, no internet), build the extension, run every CUDA test and the kernel
# benchmarks, and print a short table last. Target: under 8 minutes.
#   bash benchmarks/gpu_check.sh            (from the repository root)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
start=$(date +%s)
echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}')")
  export TORCH_CUDA_ARCH_LIST
fi
echo "== build (arch $TORCH_CUDA_ARCH_LIST)"
build_start=$(date +%s)
if ! SLSG_WITH_CUDA=1 MAX_JOBS=${MAX_JOBS:-8} $PY setup.py build_ext --inplace > /tmp/slsg_gpu_build.log 2>&1; then
  tail -40 /tmp/slsg_gpu_build.log; echo "BUILD FAILED"; exit 1
fi
echo "built in $(( $(date +%s) - build_start )) s"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
if $PY -c "import pytest" 2>/dev/null; then
  echo "== CUDA tests"
  $PY -m pytest tests/ops -q -x -k "cuda or device" -p no:cacheprovider 2>&1 | tail -15 || status=1
else
  echo "== pytest not installed: skipping the test suite, gpu_check.py still compares against references"
fi
echo "== kernel checks and benchmarks"
$PY benchmarks/gpu_check.py || status=1
if [ -f benchmarks/gpu_check_graph.py ]; then
  $PY benchmarks/gpu_check_graph.py || status=1
fi
echo "total $(( $(date +%s) - start )) s, status $status"
exit $status
