"""Benchmark: the most a local-learning arrangement of N equal workers can gain over E2E data parallelism, from the
arithmetic of one training step alone (issue 30's "DGL+MAN pipelined ≥ 0.9× E2E data-parallel").

Data parallelism gives every worker 1/N of the batch and the whole network; a pipeline gives every worker the whole
batch and 1/N of the blocks, each with its auxiliary net. With communication free and nothing waiting, E2E DP on N
workers trains ``N × (B/N) / T_e2e(B/N)`` images per second and a pipeline ``B / T_stage`` where ``T_stage`` is its
slowest stage's step time. So

    pipelined ÷ ideal E2E DP  ≤  T_e2e(B/N) / max over stages of T_stage(B)

is a ceiling no schedule, overlap or staleness can lift (a real E2E DP runs below its ideal: its processes meet at an
all-reduce every step, so the ratio to a measured E2E DP can read higher); and ``N × T_e2e(B/N) / T_method(B)`` is
the ceiling of any cuts at all, however fine (stages that share the method's step evenly). Both sides are measured
here, on one thread (what each of the benchmark's N × 1 processes has), in one process, one step of each learner in
turn (run-to-run drift on a shared VM is larger than the effects measured); medians of ``--rounds`` steps.
``T_stage`` is the sum of its blocks' shares of the method's step (forward, auxiliary net and local loss, backward,
optimizer step; :func:`locallearn.distributed.pipeline.measure_block_seconds`), at the best contiguous cuts for them
(the pipeline's own ``balance``). The whole-step ratio ``T_e2e(B) / T_method(B)`` is printed too: what the method's
extra arithmetic costs against E2E on the same batch.

    OMP_NUM_THREADS=1 python benchmarks/work_bound.py --methods dgl dgl+man infopro+man --K 4 --stages 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from locallearn import LocalLearner, create_model
from locallearn.data import as_batch
from locallearn.distributed.pipeline import balance, measure_block_seconds


def build(arch: str, method: str, K: int, shape: tuple[int, ...]) -> LocalLearner:
    torch.manual_seed(0)
    return LocalLearner(create_model(arch), method, K, input_shape=shape, channels_last=True, check_every=0)


def step_seconds(learner: LocalLearner, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        learner.train_step(x, y)
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["dgl", "dgl+man", "infopro+man"])
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--stages", type=int, default=2, help="N: workers (pipeline stages, data-parallel processes)")
    p.add_argument("--arch", default="resnet32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=20, help="rounds of one step of every learner, order rotating")
    args = p.parse_args()
    n, batch = args.stages, args.batch_size
    if batch % n:
        p.error(f"--batch-size {batch} must divide among --stages {n} workers")

    shape = (3, args.image_size, args.image_size)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch, *shape, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    shard = (x[: batch // n], y[: batch // n])
    e2e = build(args.arch, "e2e", 1, shape)
    methods = {m: build(args.arch, m, args.K, shape) for m in args.methods}
    for learner in (e2e, *methods.values()):  # warm: allocator, oneDNN primitives, both batch sizes for E2E
        step_seconds(learner, x, y, 2)
    step_seconds(e2e, *shard, 2)

    learners = {"e2e shard": (e2e, shard), "e2e": (e2e, (x, y)), **{m: (lrn, (x, y)) for m, lrn in methods.items()}}
    times: dict[str, list[float]] = {name: [] for name in learners}
    order = list(learners)
    for r in range(args.rounds):  # one step each, the order rotating: drift reaches every learner alike
        for name in order[r % len(order) :] + order[: r % len(order)]:
            learner, (xb, yb) = learners[name]
            times[name].append(step_seconds(learner, xb, yb, 1))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = {}
    for m, learner in methods.items():
        # each block's share of the step (forward, auxiliary net, backward, optimizer), scaled to the step's median
        prepared = learner.prepare_batch(as_batch((x, y), learner.device))  # channels-last, as a run's
        block = measure_block_seconds(learner, prepared, steps=3)
        per_block = [med[m] * s / sum(block) for s in block]
        starts = [0, *balance(per_block, n), args.K]
        stage_seconds = [sum(per_block[a:b]) for a, b in zip(starts, starts[1:])]
        rows[m] = {
            "step_seconds": round(med[m], 4),
            "block_seconds": [round(s, 4) for s in per_block],
            "best_cuts_first_blocks": starts[1:-1],
            "stage_seconds": [round(s, 4) for s in stage_seconds],
            "whole_step_ratio_e2e_over_method": round(med["e2e"] / med[m], 3),
            "pipeline_ceiling_vs_e2e_dp": round(med["e2e shard"] / max(stage_seconds), 3),
            # any cuts at all, even inside blocks: the stages share the method's step time evenly
            "balanced_ceiling_vs_e2e_dp": round(n * med["e2e shard"] / med[m], 3),
        }
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "threads": torch.get_num_threads(), "arch": args.arch, "batch_size": batch, "K": args.K, "workers": n,
        "e2e_step_seconds": round(med["e2e"], 4), f"e2e_step_seconds_batch_{batch // n}": round(med["e2e shard"], 4),
        "e2e_dp_ideal_images_per_second": round(batch / med["e2e shard"], 1),
        "step_seconds_quartiles": {k: [round(q, 4) for q in statistics.quantiles(v, n=4)[::2]]
                                   for k, v in times.items()},
        "methods": rows,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
