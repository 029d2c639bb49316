"""Benchmark: data-parallel local learning reaches single-process accuracy (Fashion-MNIST subset, several seeds).

For each seed, one after another on an otherwise idle machine:

* single process: ``OMP_NUM_THREADS=<cores> python -m locallearn train ARGS --seed S``;
* data parallel: ``torchrun --standalone --nproc-per-node N -m locallearn train ARGS --seed S`` (one thread each),
  the same global batch split over N ranks.

It prints a markdown table of test accuracy, throughput and whether every rank ended with the same weights.

    python benchmarks/data_parallel_accuracy.py --seeds 0 1 --out /tmp/dp_acc
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ARGS = ["--method", "dgl+man", "--K", "4", "--limit-train", "10000", "--epochs", "3", "--no-progress", "--quiet"]


def run(cmd: list[str], out: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([*cmd, "--out", str(out), "--overwrite"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("args", nargs="*", help="extra `locallearn train` arguments (after --)")
    a = p.parse_args()
    out = Path(a.out)
    args = [*ARGS, *a.args]
    single = [sys.executable, "-m", "locallearn", "train", *args]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.nproc)]
    rows = []
    for seed in a.seeds:
        s = run([*single, "--seed", str(seed)], out / f"single_{seed}", a.nproc)
        d = run([*torchrun, "-m", "locallearn", "train", *args, "--seed", str(seed)], out / f"dp_{seed}", 1)
        rows.append((seed, s, d))
        print(seed, s["test_accuracy"], d["test_accuracy"], flush=True)
    lines = [
        f"`locallearn train {' '.join(args)}`, seeds {a.seeds}: one process with {a.nproc} threads against "
        f"`torchrun --nproc-per-node {a.nproc}` (one thread each, the same global batch)",
        "",
        "| seed | single: test acc | img/s | data parallel: test acc | img/s | ranks identical |",
        "|---|---|---|---|---|---|",
    ]
    for seed, s, d in rows:
        same = len(set(d["rank_fingerprints"])) == 1 and len(set(d["rank_method_fingerprints"])) == 1
        lines.append(
            f"| {seed} | {s['test_accuracy']:.4f} | {s['images_per_second']:.0f} | {d['test_accuracy']:.4f} | "
            f"{d['images_per_second']:.0f} | {'yes' if same else 'NO'} |"
        )
    for name, idx in (("single", 1), ("data parallel", 2)):
        accs = [r[idx]["test_accuracy"] for r in rows]
        spread = f" ± {statistics.stdev(accs):.4f}" if len(accs) > 1 else ""
        lines.append(f"\n{name}: mean {statistics.mean(accs):.4f}{spread}")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
