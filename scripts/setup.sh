#!/usr/bin/env bash
# Creates .venv (if missing) and installs slsg with its compiled kernels into it.
# Idempotent: a second run only rebuilds what changed. Used by run_demo.sh and run_tests.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
# torch first: the extension compiles against it (no build isolation). 2.14.1 is the
# version this project is tested with; any torch >= 2.4 with matching headers builds.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q ninja
# Rebuild only when the kernels or the build script changed since the last install.
stamp=.venv/.slsg-build-stamp
# The build switches and torch's version count too: a CPU-only build must not pass for a CUDA one.
want=$( (cat setup.py pyproject.toml slsg/_toolkit.py $(find csrc -type f | sort)
         echo "${SLSG_WITH_CUDA-} ${TORCH_CUDA_ARCH_LIST-} ${CUDA_HOME-} ${SLSG_DEBUG-}"
         python -c "import torch; print(torch.__version__)") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! python -c "import slsg._C" 2>/dev/null; then
  MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q -e ".[test]" --no-build-isolation
  echo "$want" > "$stamp"
fi
python -c "import slsg; print('slsg', slsg.__version__, 'ops backend:', slsg.ops.backend())"
