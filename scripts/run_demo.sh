#!/usr/bin/env bash
# Set up (if needed), then train and evaluate the detector on real data (MVTec AD bottle
# from ../shared/data by default) and print the metrics.
set -euo pipefail
# Paths given as arguments are the caller's: made absolute before moving to the repository
# (portable: no realpath -m outside GNU coreutils).
absolute() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }
DATA=${1:+$(absolute "$1")}
OUT=${2:+$(absolute "$2")}
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
DATA=${DATA:-../shared/data/mvtec_ad/bottle}
OUT=${OUT:-runs/bottle}
slsg fit --data "$DATA" --out "$OUT"
