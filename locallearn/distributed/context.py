"""The process group: found from torchrun's environment, made once, and described by one small object.

``torchrun`` (``python -m torch.distributed.run``) starts one process per rank and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each; multi-node launches use the same variables through
torchrun's rendezvous flags (``--nnodes``, ``--rdzv-endpoint``). locallearn reads them, nothing else: no launcher of its
own. The backend is gloo on CPU and NCCL on CUDA; each rank takes the GPU ``cuda:LOCAL_RANK``.

Every collective waits at most ``timeout_s`` (the process group's timeout), so a rank whose peer died stops with an
error instead of hanging; torchrun's agent also tears the whole group down when any worker exits with an error.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from locallearn.errors import UserError

log = logging.getLogger("locallearn")


def launched() -> bool:
    """True in a process started by torchrun (or any launcher setting ``WORLD_SIZE``) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job: its rank of ``world`` and the device it computes on."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_writer(self) -> bool:
        """Rank 0 logs, writes checkpoints, metrics and the summary; the others only compute."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world} ({self.backend}, {self.device})"


def init_from_env(device: torch.device, timeout_s: float = 300.0) -> DistContext:
    """Join the process group torchrun described in the environment (creating it on first call).

    ``device`` is the device the run asked for ("cpu" or "cuda"); under torchrun a CUDA run uses
    ``cuda:LOCAL_RANK``. The group is made with a timeout of ``timeout_s`` seconds for every collective.
    """
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise UserError(
            f"distributed training needs the environment torchrun sets ({', '.join(missing)} missing): launch with "
            "`torchrun --nproc-per-node N -m locallearn train ...`"
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): start at most that many "
                "processes per node (--nproc-per-node), or pass --device cpu"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"distributed training runs on cpu (gloo) or cuda (nccl), not on {device.type}")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s), **kwargs
        )
    return DistContext(rank, world, local_rank, device, backend)


def quiet_unless_writer(ctx: DistContext) -> None:
    """Only rank 0 logs at INFO; the others keep warnings and errors (prefixed with their rank)."""
    if ctx.is_writer:
        return
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(f"[rank {ctx.rank}] %(message)s"))


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (pickled; for small control data such as a resolved path)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown(wait_for_peers: bool = False) -> None:
    """Leave the process group (when one was made); safe to call twice.

    ``wait_for_peers`` (after a run that ended normally on every rank) first meets every rank at a barrier, so that no
    rank closes its connections while a peer still has the last collective in flight. Not after an error: a dead peer
    would hold the barrier for the whole ``--dist.timeout_s``.
    """
    if dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a distributed process with ``code`` without the interpreter's finalisation.

    Gloo's C++ threads can still be torn down during finalisation and abort the process with SIGABRT ("terminate
    called without an active exception") after all its work is done: once in CI and once in 48 resumed 2-rank CPU
    runs here (torch 2.14.1), the failure pytorch/pytorch#179291 describes. Every file a run writes is closed (and
    written atomically) before this point, so the logs and standard streams are flushed and the process leaves with
    ``os._exit``; torchrun then sees the real exit status instead of -6.
    """
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it anyway
            pass
    os._exit(code)
