"""The peak resident memory of a command, measured from outside it by sampling ``/proc/PID/status``.

``locallearn train`` resets the kernel's peak-RSS mark (VmHWM) at every memory window on CPU so that it can report
the training steps apart from evaluation; the kernel then also forgets the earlier peak, and ``/usr/bin/time``'s
"Maximum resident set size" reports only the peak since the last reset. This script does not rely on that mark: it
polls the command's resident set (VmRSS, the process and its children) every ``--interval`` seconds and prints the
largest sum seen, a lower bound of the true peak that misses only spikes shorter than the interval.

    python benchmarks/peak_rss.py -- locallearn train --dataset synthetic --image-size 224 --arch resnet101 ...

Prints one JSON line: the sampled peak (bytes and MiB), the samples taken, the command's exit status, its wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            children = []
        todo.extend(int(c) for c in children)
    return pids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.002, help="seconds between samples")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    peak, samples = 0, 0
    while proc.poll() is None:
        peak = max(peak, sum(_rss_bytes(p) for p in _tree(proc.pid)))
        samples += 1
        time.sleep(args.interval)
    result = {
        "sampled_peak_rss_bytes": peak,
        "sampled_peak_rss_mib": round(peak / 2**20),
        "samples": samples,
        "exit_status": proc.returncode,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "command": " ".join(command),
    }
    print(json.dumps(result), file=sys.stderr)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
