"""Render a pytest-benchmark JSON file as Markdown tables for RESULTS.md: one table per
group, time, ratio to the group's baseline and peak extra memory.

    python benchmarks/render.py results.json [--baseline slsg]
"""
from __future__ import annotations

import argparse
import json
import re


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("json_file")
    parser.add_argument("--baseline", default="slsg|extension",
                        help="regex matching the parameter of the row other rows are compared with")
    args = parser.parse_args()
    data = json.load(open(args.json_file))
    groups: dict[str, list[dict]] = {}
    for bench in data["benchmarks"]:
        groups.setdefault(bench["group"] or bench["name"], []).append(bench)
    print(f"Machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}, "
          f"{data['machine_info'].get('cpu', {}).get('count', '?')} CPUs; "
          f"run {data['datetime'][:19]} UTC")
    for group, rows in groups.items():
        base = next((r for r in rows if re.search(args.baseline, r["name"])), rows[0])
        base_t = base["stats"]["min"]
        print(f"\n**{group}**\n")
        print("| variant | time (s) | time / ours | peak extra MiB |")
        print("|---|---|---|---|")
        for r in sorted(rows, key=lambda r: r["stats"]["min"]):
            variant = r["name"].split("[", 1)[-1].rstrip("]")
            mem = r.get("extra_info", {}).get("peak_extra_mib", "")
            print(f"| {variant} | {r['stats']['min']:.3f} | {r['stats']['min'] / base_t:.2f} | {mem} |")
        for r in rows:
            paired = r.get("extra_info", {}).get("paired")
            if paired:
                peer, peer_s = paired["peer"], paired["peer_s"]
                print(f"\nPaired ({paired['rounds']} alternating rounds; a row above is one extension call plus one "
                      f"{peer} call): {peer} / extension per round, median {paired['ratio_median']:.2f}, "
                      f"range {paired['ratio_min']:.2f}-{paired['ratio_max']:.2f}; ratio of the minima "
                      f"{paired['ratio_of_minima']:.2f} (extension {min(paired['extension_s']):.3f} s, {peer} "
                      f"{min(peer_s):.3f} s).")


if __name__ == "__main__":
    main()
