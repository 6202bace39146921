#!/usr/bin/env bash
# Set up (if needed), then train and evaluate the detector on real data (MVTec AD bottle
# from ../shared/data by default) and print the metrics.
set -euo pipefail
# Paths given as arguments are the caller's: resolved before moving to the repository.
DATA=${1:+$(realpath -m -- "$1")}
OUT=${2:+$(realpath -m -- "$2")}
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
DATA=${DATA:-../shared/data/mvtec_ad/bottle}
OUT=${OUT:-runs/bottle}
slsg fit --data "$DATA" --out "$OUT"
