#!/usr/bin/env bash
# Set up (if needed), then train and evaluate the detector on real data (MVTec AD bottle
# from ../shared/data by default) and print the metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
DATA=${1:-../shared/data/mvtec_ad/bottle}
OUT=${2:-runs/bottle}
slsg fit --data "$DATA" --out "$OUT"
