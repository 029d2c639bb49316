"""Kill a real training run with SIGKILL at random moments, resume it each time with ``--resume auto``, and compare
its final weights with an uninterrupted run's (issue 14's "done when"); then time SIGTERM → exit for a large model.

    python benchmarks/kill_resume.py --out /tmp/killres                      # DGL+MAN and InfoPro+MAN, 3 kills each
    python benchmarks/kill_resume.py --out /tmp/killres --preempt-arch resnet101 --preempt-image-size 224

Each start is killed at a uniformly random moment 0-6 s after it has written a checkpoint of its own (so a kill may land
inside a step or inside the next checkpoint's write); the seed of those moments is printed. Prints one JSON line per
run and writes ``<out>/kill_resume.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

BASE = [
    sys.executable, "-m", "locallearn", "train", "--dataset", "fashion-mnist", "--arch", "resnet32", "--K", "4",
    "--batch-size", "128", "--epochs", "2", "--device", "cpu", "--no-progress", "--checkpoint-every", "5",
    "--data.limit_test=2000",
]  # fmt: skip


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _run(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc, time.perf_counter() - start


def kill_and_resume(method: str, out: Path, limit: int, kills: int, rng: random.Random) -> dict:
    cmd = [*BASE, "--method", method, "--limit-train", str(limit)]
    whole, seconds = _run([*cmd, "--out", str(out / f"{method}-whole")])
    if whole.returncode != 0:
        raise SystemExit(whole.stderr[-2000:])
    reference = _summary(out / f"{method}-whole")
    cut = out / f"{method}-killed"
    log = []
    for i in range(kills + 1):
        args = [*cmd, "--out", str(cut)] + (["--resume", "auto"] if i else [])
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if i == kills:  # the last start runs to the end
            _, stderr = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(stderr[-2000:])
            taken = [line for line in stderr.splitlines() if "resume:" in line]
            log.append({"start": i, "exit": proc.returncode, "resume": taken})
            break
        # Wait for a checkpoint this start wrote (so each start makes progress), then kill at a random moment of the
        # next few seconds: inside a step, between steps, or inside the next checkpoint's write.
        seen = set((cut / "checkpoints").glob("*.json")) if (cut / "checkpoints").exists() else set()
        while proc.poll() is None and not (set((cut / "checkpoints").glob("*.json")) - seen):
            time.sleep(0.01)
        delay = rng.uniform(0.0, 6.0)
        time.sleep(delay)
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before kill {i + 1}: use a larger --limit-train")
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate()
        taken = [line for line in stderr.splitlines() if "resume:" in line]
        done = sorted(p.name for p in (cut / "checkpoints").glob("*.json")) if (cut / "checkpoints").exists() else []
        log.append({"start": i, "killed_after_checkpoint_s": round(delay, 2), "resume": taken, "manifests": done[-2:]})
    resumed = _summary(cut)
    return {
        "method": method,
        "limit_train": limit,
        "uninterrupted_seconds": round(seconds, 1),
        "uninterrupted_fingerprint": reference["fingerprint"],
        "resumed_fingerprint": resumed["fingerprint"],
        "same_fingerprint": reference["fingerprint"] == resumed["fingerprint"],
        "test_accuracy": [reference["test_accuracy"], resumed["test_accuracy"]],
        "starts": log,
    }


def preempt_time(arch: str, image_size: int, batch: int, out: Path) -> dict:
    """SIGTERM a synthetic-data run of ``arch`` once its first checkpoint exists; seconds until it has exited."""
    run = out / f"preempt-{arch}"
    cmd = [
        sys.executable, "-m", "locallearn", "train", "--dataset", "synthetic", "--image-size", str(image_size),
        "--arch", arch, "--method", "dgl", "--K", "4", "--batch-size", str(batch), "--device", "cpu",
        "--no-progress", "--checkpoint-every", "1", "--epochs", "1", "--out", str(run),
        "--data.synthetic_train_size=256", "--data.synthetic_test_size=32", "--num-classes", "1000",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not ((run / "checkpoints").exists() and list((run / "checkpoints").glob("*.json"))):
        if proc.poll() is not None:
            raise SystemExit(proc.stderr.read()[-2000:])
        time.sleep(0.05)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate()
    seconds = time.perf_counter() - sent
    size = sum(p.stat().st_size for p in (run / "checkpoints").glob("*.pt")) / max(
        1, len(list((run / "checkpoints").glob("*.pt")))
    )
    return {
        "arch": arch,
        "image_size": image_size,
        "batch_size": batch,
        "exit": proc.returncode,
        "sigterm_to_exit_seconds": round(seconds, 2),
        "checkpoint_mib": round(size / 2**20, 1),
        "last_line": stderr.strip().splitlines()[-1] if stderr.strip() else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=["dgl+man", "infopro+man"])
    parser.add_argument("--limit-train", type=int, default=5120)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill times (default: drawn and printed)")
    parser.add_argument("--preempt-arch", default=None, help="also time SIGTERM → exit for this arch (e.g. resnet101)")
    parser.add_argument("--preempt-image-size", type=int, default=224)
    parser.add_argument("--preempt-batch-size", type=int, default=16)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    print(json.dumps({"kill_time_seed": seed}), flush=True)
    rng = random.Random(seed)
    results = []
    for method in args.methods:
        results.append(kill_and_resume(method, args.out, args.limit_train, args.kills, rng))
        print(json.dumps(results[-1]), flush=True)
    if args.preempt_arch:
        results.append(preempt_time(args.preempt_arch, args.preempt_image_size, args.preempt_batch_size, args.out))
        print(json.dumps(results[-1]), flush=True)
    (args.out / "kill_resume.json").write_text(json.dumps({"seed": seed, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
