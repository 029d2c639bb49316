"""Benchmark: pipelined against sequential local learning, measured, and a model of the time per step checked on it.

For each case it runs, one after another on an otherwise idle machine:

* sequential: ``OMP_NUM_THREADS=1 python -m locallearn train ...`` (one process, one thread);
* pipelined: ``torchrun --standalone --nproc-per-node S -m locallearn train --parallel pipeline ...`` (one thread
  per process);
* for the InfoPro+MAN case also sequential end-to-end, for the ratio to end-to-end.

Throughput is the training steps' images per second reported by the run (rank 0; evaluation and start-up are not
in it), and the run's whole wall time from outside (``time.perf_counter`` around the process) is printed beside it.

The model: a step of stage s costs the sum of its blocks' step times (measured one block at a time, one thread,
in this process: ``measure_block_seconds``) plus sending its output (``latency + bytes / bandwidth``). With
independent blocks (DGL, InfoPro) the pipeline's step time is the slowest stage's; with MAN at staleness 0 it is also
at least the reading block plus the read block (block k waits for block k+1's step on the micro-batch before).
Sequential is the sum of all blocks. Latency and bandwidth are measured here by a gloo ping-pong between two local
processes, and can be set for other machines (``--bandwidth-gbs``, ``--latency-us``) to predict multi-GPU figures.

    python benchmarks/pipeline_speed.py --out docs/benchmarks/pipeline   # ~10 minutes on the 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

CASES = {
    "dgl_k4": ["--method", "dgl", "--K", "4"],
    "infopro_man_k16": ["--config", "man/cifar10_resnet32_k16_infopro_man"],
}
E2E = ["--method", "e2e"]


def _common(batch: int, steps: int) -> list[str]:
    return [
        "--dataset", "synthetic", "--image-size", "32", "--in-channels", "3", "--num-classes", "10",
        "--data.synthetic_train_size=" + str(batch * steps), "--data.synthetic_test_size=" + str(batch),
        "--arch", "resnet32", "--batch-size", str(batch), "--epochs", "1", "--device", "cpu", "--no-progress",
        "--quiet", "--overwrite", "--train.save_checkpoint=False",
    ]  # fmt: skip


def run(cmd: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["outside_wall_seconds"] = wall
    return summary


def ping_pong(nbytes: int = 1 << 22, repeats: int = 20) -> tuple[float, float]:
    """(latency seconds, bandwidth bytes/s) of gloo between two local processes, from 8-byte and ``nbytes``
    round trips."""
    code = f"""
import os, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
def trip(n):
    t = torch.zeros(n // 4)
    dist.barrier()
    start = time.perf_counter()
    for _ in range({repeats}):
        if rank == 0:
            dist.send(t, 1); dist.recv(t, 1)
        else:
            dist.recv(t, 0); dist.send(t, 0)
    return (time.perf_counter() - start) / {repeats} / 2
small, big = trip(8), trip({nbytes})
if rank == 0:
    print(small, big)
dist.destroy_process_group()
"""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(code)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script.name],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    os.unlink(script.name)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    small, big = map(float, proc.stdout.split()[-2:])
    return small, nbytes / max(big - small, 1e-9)


def block_model(case: list[str], batch: int) -> tuple[list[float], list[int], bool]:
    """Per-block step seconds (one thread), bytes each block's output sends on, and whether the method reads the
    next block (MAN). Built through the CLI's own config path so the learner is the one the runs train."""
    from locallearn.cli import _train_parser, build_config  # the CLI's own parsing, so the config is the runs'
    from locallearn.data import Batch
    from locallearn.distributed.pipeline import measure_block_seconds
    from locallearn.runner import build_learner

    parser = argparse.ArgumentParser()
    _train_parser(parser.add_subparsers(dest="command"))
    args, rest = parser.parse_known_args(["train", *case, *_common(batch, 1)])
    cfg = build_config(args, rest)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    class Info:
        num_classes, in_channels, image_size = 10, 3, (32, 32)

    learner = build_learner(cfg, Info, torch.device("cpu"), 1000, 100)
    raw = torch.rand(batch, 3, 32, 32)
    x = (raw - 0.5) / 0.25
    if learner.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    b = Batch(x, torch.randint(0, 10, (batch,)), raw)
    seconds = measure_block_seconds(learner, b, steps=3)
    sizes, h = [], b.x
    with torch.no_grad():
        for block in learner.blocks:
            h = block(h)
            extra = raw.numel() * 4 if learner.method.uses_raw else 0
            sizes.append(h.numel() * h.element_size() + batch * 8 + extra)
    return seconds, sizes, bool(learner.method.downstream_reads())


def predict(seconds: list[float], sizes: list[int], starts: list[int], man: bool, latency: float, bw: float) -> float:
    """Seconds per pipelined step (see the module docstring)."""
    bounds = [0, *starts, len(seconds)]
    per_message = 4 if any(s > 0 for s in sizes) else 0  # header, h, y (and raw): latency each
    stage_times = []
    for a, b in zip(bounds, bounds[1:]):
        send = 0.0 if b == len(seconds) else per_message * latency + sizes[b - 1] / bw
        stage_times.append(sum(seconds[a:b]) + send)
    step = max(stage_times)
    if man:
        for a in bounds[1:-1]:  # block a-1 waits for block a's step on the micro-batch before
            step = max(step, seconds[a - 1] + seconds[a] + latency + sizes[a - 1] / bw)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--cases", nargs="+", default=list(CASES))
    p.add_argument("--bandwidth-gbs", type=float, nargs="*", default=[], help="extra predictions at these GB/s")
    p.add_argument("--latency-us", type=float, default=10.0, help="latency of those extra predictions")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    latency, bandwidth = ping_pong()
    print(f"gloo loopback: latency {latency * 1e6:.0f} us, bandwidth {bandwidth / 1e9:.2f} GB/s", flush=True)
    common = _common(args.batch_size, args.steps)
    single = [sys.executable, "-m", "locallearn", "train"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.stages)]
    results = {"machine": os.uname().nodename, "latency_s": latency, "bandwidth_Bps": bandwidth, "cases": {}}
    for name in args.cases:
        case = CASES[name]
        seq = run([*single, *case, *common], out / f"{name}_seq")
        pipe = run(
            [*torchrun, "-m", "locallearn", "train", *case, *common, "--parallel", "pipeline"], out / f"{name}_pp"
        )
        seconds, sizes, man = block_model(case, args.batch_size)
        starts = [stage[0] for stage in pipe["pipeline_stages"][1:]]
        predicted = predict(seconds, sizes, starts, man, latency, bandwidth)
        row = {
            "sequential_img_s": seq["images_per_second"],
            "pipelined_img_s": pipe["images_per_second"],
            "speedup": pipe["images_per_second"] / seq["images_per_second"],
            "sequential_wall_s": seq["outside_wall_seconds"],
            "pipelined_wall_s": pipe["outside_wall_seconds"],
            "fingerprints_equal": seq["fingerprint"] == pipe["fingerprint"],
            "stages": pipe["pipeline_stages"],
            "block_seconds": seconds,
            "message_bytes": sizes,
            "model_sequential_img_s": args.batch_size / sum(seconds),
            "model_pipelined_img_s": args.batch_size / predicted,
            "model_speedup": sum(seconds) / predicted,
            "model_at": {
                f"{gbs:g} GB/s": sum(seconds) / predict(seconds, sizes, starts, man, args.latency_us * 1e-6, gbs * 1e9)
                for gbs in args.bandwidth_gbs
            },
        }
        if name == "infopro_man_k16":
            e2e = run([*single, *E2E, *common], out / "e2e_seq")
            row["e2e_img_s"] = e2e["images_per_second"]
            row["sequential_over_e2e"] = seq["images_per_second"] / e2e["images_per_second"]
            row["pipelined_over_e2e"] = pipe["images_per_second"] / e2e["images_per_second"]
        results["cases"][name] = row
        print(name, json.dumps(row, indent=1), flush=True)
    (out / "pipeline_speed.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
