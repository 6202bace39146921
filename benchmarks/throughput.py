"""Batch-1 inference speed of a saved detector at its model input size.

Run: python benchmarks/throughput.py RUN_DIR DATA_DIR THREADS
(e.g. runs/bottle ../shared/data/mvtec_ad/bottle 2; set OMP_WAIT_POLICY in the environment
to compare OpenMP wait policies). Prints the best of 3 runs of 30 calls after 3 warm-up calls.
"""
from __future__ import annotations

import os
import sys

import torch

from slsg.data import open_dataset
from slsg.detectors import load_detector, measure_throughput


def main(run_dir: str, data_dir: str, threads: int) -> None:
    torch.set_num_threads(threads)
    detector = load_detector(run_dir)
    detector.progress = False
    image = open_dataset(data_dir, "test", image_size=detector.dataset_image_size)[0]["image"][None]
    image = detector.resize_to_input(image)
    rates = [measure_throughput(detector, image, repeats=30, warmup=3) for _ in range(3)]
    print(f"threads={threads} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')} "
          f"input={tuple(image.shape[-2:])} images/s best={max(rates):.1f} all={[round(r, 1) for r in rates]}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
