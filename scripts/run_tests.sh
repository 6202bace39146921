#!/usr/bin/env bash
# Set up (if needed) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# Extra arguments go to pytest (paths relative to the repository root).
python -m pytest tests -q "$@"
