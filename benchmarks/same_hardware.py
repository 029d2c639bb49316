"""Benchmark: local learning against what a user would run instead, on the same cores (issue 30 item 7).

Every arm uses the same cores and the same number of threads in total (``--cores``, default 2): one process with all
threads, or one process per core with one thread each. Arms, in this order within a round, rounds alternating:

* ``E2E 1×N``: end-to-end backprop, ``locallearn train --method e2e``, one process, N threads;
* ``E2E DP N×1``: end-to-end, data-parallel under torchrun (``--parallel data``), N processes; with ``--compiled``
  both E2E arms also with ``--train.compile=default`` (the whole network and its loss one graph);
* ``E2E 1F1B/GPipe N×1 mM``: end-to-end through ``torch.distributed.pipelining`` (``benchmarks/e2e_pipeline.py``),
  the same N stages as the pipelined local-learning arms, M micro-batches;
* for each method (DGL, DGL+MAN, InfoPro+MAN at K=4): sequential ``1×N``, data-parallel ``DP N×1``, pipelined
  ``pipe N×1`` (``--parallel pipeline --dist.stages`` at the same stage boundaries as the E2E pipeline), each eager
  and, with ``--compiled``, with ``--train.compile=default``.

Figure: images per second of the training steps as each run reports them (rank 0's ``summary.json``; evaluation,
start-up and a compiled run's compiling step are not in it; the E2E pipeline arm times its steps after one warm-up
step between barriers). Every figure is printed as a ratio to E2E DP and to the best E2E 1F1B of the same round. The
machine should be otherwise idle: jobs side by side distort every figure.

    python benchmarks/same_hardware.py --out docs/benchmarks/same_hardware --rounds 2
    python benchmarks/same_hardware.py --out /tmp/sh --arms "E2E*" "DGL K=4*"    # a subset (fnmatch patterns)
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = {"DGL K=4": ["--method", "dgl", "--K", "4"], "DGL+MAN K=4": ["--method", "dgl+man", "--K", "4"],
           "InfoPro+MAN K=4": ["--method", "infopro+man", "--K", "4"],
           # cut for a two-stage pipeline: blocks 0-1 with their two MAN heads about as long as blocks 2-3 with one
           # (by seconds per block measured at 1 thread; the even cuts are 4, 8, 12), docs/benchmarks/speed.md
           "DGL+MAN K=4 cuts 2,5,10": ["--method", "dgl+man", "--K", "4", "--split", "2,5,10"]}  # fmt: skip


def common(args: argparse.Namespace) -> list[str]:
    return [
        "--dataset", "synthetic", "--image-size", "32", "--in-channels", "3", "--num-classes", "10",
        f"--data.synthetic_train_size={args.batch_size * args.steps}", f"--data.synthetic_test_size={args.batch_size}",
        "--arch", args.arch, "--batch-size", str(args.batch_size), "--epochs", "1", "--device", "cpu",
        "--no-progress", "--quiet", "--overwrite", "--train.save_checkpoint=False", "--tensorboard", "off",
    ]  # fmt: skip


def arms(args: argparse.Namespace) -> list[tuple[str, list[str], dict[str, str]]]:
    """(label, command without --out, environment) of every arm, in round order."""
    n = args.cores
    one, each = {"OMP_NUM_THREADS": str(n)}, {"OMP_NUM_THREADS": "1"}
    torchrun = ["torchrun", "--standalone", f"--nproc-per-node={n}"]
    train = [sys.executable, "-m", "locallearn", "train", *common(args)]
    stages = [str(s) for s in args.stages]
    dist_stages = f"--dist.stages=[{','.join(stages)}]"
    out = []
    for compiled in (False, True) if args.compiled else (False,):  # E2E compiled too: the fair baseline of compiled
        extra, tag = (["--train.compile=default"], " compiled") if compiled else ([], "")
        out += [
            (f"E2E 1×{n}{tag}", [*train, "--method", "e2e", *extra], one),
            (
                f"E2E DP {n}×1{tag}",
                [
                    *torchrun,
                    "-m",
                    "locallearn",
                    "train",
                    *common(args),
                    "--method",
                    "e2e",
                    *extra,
                    "--parallel",
                    "data",
                ],
                each,
            ),  # fmt: skip
        ]
    for schedule, label in (("1f1b", "1F1B"), ("gpipe", "GPipe")):
        for m in args.microbatches:
            cmd = [*torchrun, str(HERE / "e2e_pipeline.py"), "--schedule", schedule, "--microbatches", str(m),
                   "--arch", args.arch, "--K", "4", "--stages", *stages, "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), "--warmup", "1"]  # fmt: skip
            out.append((f"E2E {label} {n}×1 m{m}", cmd, each))
    for name, method in METHODS.items():
        for compiled in (False, True) if args.compiled else (False,):
            extra = ["--train.compile=default"] if compiled else []
            tag = " compiled" if compiled else ""
            out += [
                (f"{name} 1×{n}{tag}", [*train, *method, *extra], one),
                (
                    f"{name} DP {n}×1{tag}",
                    [*torchrun, "-m", "locallearn", "train", *common(args), *method, *extra, "--parallel", "data"],
                    each,
                ),  # fmt: skip
                (
                    f"{name} pipe {n}×1{tag}",
                    [
                        *torchrun,
                        "-m",
                        "locallearn",
                        "train",
                        *common(args),
                        *method,
                        *extra,
                        "--parallel",
                        "pipeline",
                        dist_stages,
                    ],
                    each,
                ),  # fmt: skip
            ]
    return [a for a in out if not args.arms or any(fnmatch.fnmatch(a[0], p) for p in args.arms)]


def run_arm(label: str, cmd: list[str], env: dict[str, str], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    is_pipeline_arm = "e2e_pipeline.py" in " ".join(cmd)
    full = cmd if is_pipeline_arm else [*cmd, "--out", str(out)]
    proc = subprocess.run(full, capture_output=True, text=True, env={**os.environ, **env})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{label}: {' '.join(full)} failed:\n{proc.stderr[-3000:]}")
    if is_pipeline_arm:
        result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
        result.pop("arm")  # the label here names the arm
    else:
        summary = json.loads((out / "summary.json").read_text())
        result = {k: summary.get(k) for k in ("images_per_second", "compile_seconds", "fingerprint", "threads",
                                              "pipeline_wait_seconds", "parallel")}  # fmt: skip
    return {"arm": label, "command": " ".join(full), "env": env, "outside_wall_seconds": wall, **result}


def table(rows: list[dict], rounds: int, n: int) -> str:
    by = {}
    for r in rows:
        by.setdefault(r["arm"], {})[r["round"]] = r["images_per_second"]

    def best_1f1b(rnd: int) -> float:
        return max(v[rnd] for k, v in by.items() if k.startswith(f"E2E 1F1B {n}×1") and rnd in v)

    dp = f"E2E DP {n}×1"
    head = " | ".join(f"round {i + 1}" for i in range(rounds))
    lines = [f"| arm | {head} | ÷ E2E DP | ÷ E2E 1F1B (best m) | compile s |", "|---|" + "---|" * (rounds + 3)]
    for arm, v in by.items():
        rates = " | ".join(f"{v[i]:.1f}" if i in v else "–" for i in range(rounds))
        to_dp = " / ".join(f"{v[i] / by[dp][i]:.2f}" for i in range(rounds) if i in v and i in by.get(dp, {}))
        to_pp = " / ".join(f"{v[i] / best_1f1b(i):.2f}" for i in range(rounds) if i in v and any(
            k.startswith(f"E2E 1F1B {n}×1") and i in w for k, w in by.items()))  # fmt: skip
        comp = [r.get("compile_seconds") for r in rows if r["arm"] == arm and r.get("compile_seconds")]
        lines.append(f"| {arm} | {rates} | {to_dp or '–'} | {to_pp or '–'} | "
                     f"{statistics.mean(comp):.0f} |" if comp else f"| {arm} | {rates} | {to_dp or '–'} | "
                     f"{to_pp or '–'} | – |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--arch", default="resnet32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--stages", type=int, nargs="+", default=[2], help="first block of stages 1..N-1 (K=4 blocks)")
    p.add_argument("--microbatches", type=int, nargs="+", default=[4, 8])
    p.add_argument("--compiled", action="store_true", help="also every local-learning arm with --train.compile")
    p.add_argument("--arms", nargs="*", help="only the arms whose label matches one of these fnmatch patterns")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    plan = arms(args)
    rows = []
    results = args.out / "results.jsonl"
    for rnd in range(args.rounds):
        order = plan if rnd % 2 == 0 else plan[::-1]  # alternate, so no arm always runs first or last
        for label, cmd, env in order:
            row = {"round": rnd, **run_arm(label, cmd, env, args.out / "runs" / f"r{rnd}" / label.replace(" ", "_"))}
            rows.append(row)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"round {rnd + 1} {label}: {row['images_per_second']:.1f} img/s", flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    setting = f"{args.cores} cores per arm; {args.arch}, batch {args.batch_size}, {args.steps} steps"
    text = f"machine: {machine}; {setting}\n\n{table(rows, args.rounds, args.cores)}\n"
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
