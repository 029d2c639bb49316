"""End-to-end backprop through PyTorch's own pipeline parallelism: the baseline pipelined local learning is measured
against (issue 30 item 6). Not a training mode of locallearn: a benchmark arm, launched by ``torchrun``.

The network is locallearn's (``create_model``), cut into K blocks by the same split a local-learning run uses, and
the blocks are grouped into one contiguous stage per process at the same first-block indices as a pipelined
local-learning run's ``--dist.stages``: the same stages, trained end to end. Each stage is a
``torch.distributed.pipelining.PipelineStage``; a step runs the chosen schedule (``gpipe``: every micro-batch's
forward, then every backward; ``1f1b``: one forward, one backward in steady state) over ``--microbatches``
micro-batches and then each stage's optimizer (SGD as ``locallearn train``'s default: lr 0.1, momentum 0.9, Nesterov,
weight decay 1e-4 on every parameter). Channels-last weights and inputs, as locallearn's runs.

Throughput: images per second of the timed steps (after ``--warmup`` untimed ones), measured on the last stage
(which finishes each step last) between two barriers. Rank 0 prints one JSON line.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/e2e_pipeline.py --schedule 1f1b \\
        --microbatches 4 --arch resnet32 --K 4 --stages 2 --batch-size 128 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from locallearn import create_model
from locallearn.models import resolve_split, split_model

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class _Wire(torch.autograd.Function):
    """Contiguous on the wire in both directions (gloo sends and receives contiguous tensors only); ``inside`` is the
    layout the stage's own modules compute in."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, inside: torch.memory_format) -> torch.Tensor:
        ctx.inside = inside
        return x.contiguous(memory_format=inside)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.contiguous(), None


class Layout(nn.Module):
    """Channels-last inside a stage, contiguous on the wire: the conversion locallearn's own pipeline makes too."""

    def __init__(self, memory_format: torch.memory_format) -> None:
        super().__init__()
        self.memory_format = memory_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Wire.apply(x, self.memory_format) if x.dim() == 4 else x.contiguous()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--arch", default="resnet32")
    p.add_argument("--K", type=int, default=4, help="blocks of the local-learning split the stages group")
    p.add_argument("--split", default="even")
    p.add_argument("--stages", type=int, nargs="*", default=None,
                   help="first block of stages 1..S-1 (default: K/S blocks each)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.1)
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=args.num_classes)
    shape = (3, args.image_size, args.image_size)
    blocks = split_model(model, resolve_split(model, args.split, args.K))
    starts = args.stages or [round(s * len(blocks) / world) for s in range(1, world)]
    edges = [0, *starts, len(blocks)]
    layers = [Layout(torch.channels_last), *blocks[edges[rank] : edges[rank + 1]], Layout(torch.contiguous_format)]
    mine = nn.Sequential(*layers).to(memory_format=torch.channels_last)
    stage = PipelineStage(mine, rank, world, device)
    schedule = SCHEDULES[args.schedule](stage, args.microbatches, loss_fn=nn.functional.cross_entropy)
    opt = torch.optim.SGD(mine.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)

    data = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch_size, *shape, generator=data)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=data)

    def step() -> None:
        if rank == 0:
            schedule.step(x)
        elif rank == world - 1:
            schedule.step(target=y, losses=[])
        else:
            schedule.step()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        print(json.dumps({
            "arm": f"e2e {args.schedule}", "schedule": args.schedule, "microbatches": args.microbatches,
            "stages": [list(range(a, b)) for a, b in zip(edges, edges[1:])], "processes": world,
            "threads_per_process": torch.get_num_threads(), "steps": args.steps, "batch_size": args.batch_size,
            "images_per_second": args.steps * args.batch_size / seconds, "omp": os.environ.get("OMP_NUM_THREADS"),
        }))  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
