"""Benchmark: what ``--staleness`` costs in accuracy and buys in speed, for MAN pipelined on Fashion-MNIST (issue 30
item 3).

At staleness 0 a pipelined MAN run is exactly sequential MAN (tested); at d ≥ 1 block k's EMA copy follows block
k+1's first layer d steps late and no stage waits for the next. This runs the same pipelined command (2 processes
under torchrun, one thread each, the default data: the first 10,000 Fashion-MNIST training images, 3 epochs, the
full test set) for each staleness and seed, one after another, and prints test accuracy and training images per
second for each, with the mean over seeds and its difference to staleness 0.

    python benchmarks/staleness_accuracy.py --out runs/staleness --staleness 0 1 8 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def run(out: Path, method: str, k: int, staleness: int, seed: int, extra: list[str]) -> dict:
    """One pipelined run (skipped when its summary already exists); its summary."""
    summary = out / "summary.json"
    if not summary.exists():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "locallearn", "train", "--dataset", "fashion-mnist", "--method", method, "--K", str(k),
               "--parallel", "pipeline", "--staleness", str(staleness), "--seed", str(seed), "--no-progress",
               "--quiet", "--tensorboard", "off", "--out", str(out), *extra]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(summary.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--method", default="dgl+man")
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 8])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("extra", nargs="*", help="more `locallearn train` arguments (after --)")
    args = p.parse_args()
    rows = []
    for seed in args.seeds:
        for d in args.staleness:
            s = run(args.out / f"d{d}_s{seed}", args.method, args.K, d, seed, args.extra)
            keys = ("test_accuracy", "images_per_second", "steps", "pipeline_wait_seconds", "git_commit")
            row = {"staleness": d, "seed": seed, **{key: s.get(key) for key in keys}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = statistics.mean(r["test_accuracy"] for r in rows if r["staleness"] == args.staleness[0])
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    print(f"\n| staleness | {seeds} | mean | − staleness {args.staleness[0]} (points) | img/s (mean) |")
    print("|---|" + "---|" * (len(args.seeds) + 3))
    for d in args.staleness:
        mine = [r for r in rows if r["staleness"] == d]
        accs = " | ".join(f"{100 * r['test_accuracy']:.2f}" for r in mine)
        mean = statistics.mean(r["test_accuracy"] for r in mine)
        rate = statistics.mean(r["images_per_second"] for r in mine)
        print(f"| {d} | {accs} | {100 * mean:.2f} | {100 * (mean - base):+.2f} | {rate:.1f} |")


if __name__ == "__main__":
    main()
