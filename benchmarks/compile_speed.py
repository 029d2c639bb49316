"""Benchmark: compiled against eager blocks in one process, timed alternately (issue 30 item 1).

Run-to-run throughput on a shared VM drifts by tens of percent between processes started minutes apart
(docs/benchmarks/speed.md), more than the effect measured here. So one process builds two learners from the same
seed — eager and ``compile="default"`` — compiles the second (its first step, timed apart), warms both, and then
times single training steps of each in turn on the same batch, ``--steps`` of each, the order swapped every other
pair so neither always runs second. Drift reaches both alike at this grain: each pair's ratio (eager seconds ÷
compiled seconds) is a measurement of the speed-up, and the median of those ratios with its quartiles is reported,
with the median images per second of each. (Blocks of ten steps per learner, this script's first design, gave ratios
from 0.97 to 1.24 on the same code; single-step pairs agree to about ±0.02 between runs.)

    OMP_NUM_THREADS=2 python benchmarks/compile_speed.py --method dgl --K 4 --arch resnet32 --batch-size 128

``--profile`` then prints, for each learner, where three more steps spend their time (``torch.profiler``, operators
by self CPU time, with the share of convolutions, forward and backward, in the total); ``--kernel-profile`` names
each of inductor's generated kernels in that table (``torch._inductor.config.cpp.enable_kernel_profile``; the
compile cache does not hold such kernels, so it compiles from scratch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from locallearn import LocalLearner, create_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="dgl")
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--arch", default="resnet32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=60, help="timed training steps of each learner, alternating")
    p.add_argument("--mode", default="default", help="torch.compile mode")
    p.add_argument("--profile", action="store_true", help="print where the time goes, per learner")
    p.add_argument("--kernel-profile", action="store_true", help="with --profile: name inductor's kernels")
    args = p.parse_args()
    if args.kernel_profile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True

    shape = (3, args.image_size, args.image_size)
    data = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch_size, *shape, generator=data)
    y = torch.randint(0, 10, (args.batch_size,), generator=data)
    learners = {}
    for name, mode in (("eager", "off"), ("compiled", args.mode)):
        torch.manual_seed(0)
        # channels-last and the guard decided on the device, as in a run
        model = create_model(args.arch)
        learners[name] = LocalLearner(model, args.method, args.K, input_shape=shape, compile=mode, channels_last=True,
                                      check_every=0)  # fmt: skip
    start = time.perf_counter()
    learners["compiled"].train_step(x, y)
    first_step = time.perf_counter() - start
    for learner in learners.values():  # warm: allocator, oneDNN primitives
        for _ in range(2):
            learner.train_step(x, y)
    seconds: dict[str, list[float]] = {name: [] for name in learners}
    for i in range(args.steps):
        pair = list(learners.items())
        for name, learner in pair if i % 2 == 0 else reversed(pair):
            start = time.perf_counter()
            learner.train_step(x, y)
            seconds[name].append(time.perf_counter() - start)
    ratios = sorted(e / c for e, c in zip(seconds["eager"], seconds["compiled"]))
    quartiles = statistics.quantiles(ratios, n=4)
    print(json.dumps({
        "method": args.method, "K": args.K, "arch": args.arch, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "mode": args.mode, "first_compiled_step_seconds": round(first_step, 2),
        "steps": args.steps,
        "median_images_per_second": {k: round(args.batch_size / statistics.median(v), 1) for k, v in seconds.items()},
        "speedup_median_of_pairs": round(statistics.median(ratios), 3),
        "speedup_quartiles": [round(q, 3) for q in (quartiles[0], quartiles[2])],
    }, indent=1))  # fmt: skip
    if args.profile:
        for name, learner in learners.items():
            profile_steps(name, learner, x, y)


def profile_steps(name: str, learner, x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> None:
    """Operators (and compiled kernels) of ``steps`` training steps by self CPU time, and the convolutions' share."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(steps):
            learner.train_step(x, y)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mkldnn_convolution",
                                                                  "aten::convolution_backward"))  # fmt: skip
    print(f"\n{name}: {steps} steps, {total / 1e3:.0f} ms of operator time, convolutions {100 * conv / total:.0f} %")
    print(events.table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
