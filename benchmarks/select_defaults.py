"""Compare memory-bank detector settings on validation data only (no test image is read).

For each candidate setting: fit on 80% of the dataset's *training* split, then score the other
20% of the training images as they are and with a simulated anomaly (slsg.detectors.validation).
This is how the defaults were chosen; test-split figures are measured afterwards, once, with
`slsg fit`.

Run:
    python benchmarks/select_defaults.py --data ../shared/data/mtd --out val_mtd.json \
        --candidate square resize=square --candidate keep_aspect resize=keep_aspect
A candidate is a name followed by MemoryBankConfig overrides (key=value, values parsed as JSON
where possible, e.g. strides=[4,8,16] coreset_ratio=0.1).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from slsg.data import open_dataset
from slsg.data.synthesis import AnomalySynthesizer, preset_for_category
from slsg.detectors import MemoryBankConfig, MemoryBankDetector
from slsg.detectors.validation import simulated_validation
from slsg.utils import atomic_write_text

DEFAULT_TEXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "textures" / "dtd"


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--candidate", nargs="+", action="append", required=True, metavar="NAME [KEY=VALUE ...]")
    parser.add_argument("--textures", default=str(DEFAULT_TEXTURES))
    parser.add_argument("--branch", default="texture", help="synthesis branch: texture, self, or any")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = Path(args.data)
    normals = open_dataset(data, "train", image_size=None)
    textures = args.textures if Path(args.textures).is_dir() else None
    synthesizer = AnomalySynthesizer(preset_for_category(data.name), textures=textures)
    branch = None if args.branch == "any" else args.branch
    results = {"data": str(data), "train_images": len(normals), "holdout_ratio": 0.2, "seed": args.seed,
               "branch": args.branch, "textures": textures, "threads": torch.get_num_threads(),
               "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "candidates": {}}
    for name, *pairs in args.candidate:
        config = MemoryBankConfig(**parse_overrides(pairs))
        start = time.perf_counter()
        detector, ev = simulated_validation(lambda: MemoryBankDetector(config, progress=False), normals,
                                            synthesizer, seed=args.seed, branch=branch)
        m = ev.metrics
        row = {"overrides": pairs, "image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"],
               "aupro": m["aupro"], "bank_size": detector.fit_info["bank_size"],
               "seconds": time.perf_counter() - start,
               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        results["candidates"][name] = row
        print(f"{name:>16}: image AUROC {row['image_auroc']:.4f}  pixel AUROC {row['pixel_auroc']:.4f}  "
              f"AUPRO {row['aupro']:.4f}  bank {row['bank_size']}  {row['seconds']:.0f} s", flush=True)
        atomic_write_text(Path(args.out), json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
