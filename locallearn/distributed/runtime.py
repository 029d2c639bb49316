"""How :func:`locallearn.runner.train` runs its steps: in one process, data-parallel, or as a pipeline stage.

The runner's loop stays the same in every mode; it calls one of these objects for what differs: a training step,
evaluation, agreeing on a stop, gathering state before a checkpoint, and the checkpoint's extra entries. Only the
writer (rank 0) writes files and logs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist
from torch import Tensor

from locallearn.data import as_batch
from locallearn.distributed.context import DistContext
from locallearn.distributed.data_parallel import DataParallel, gather_to_writer
from locallearn.distributed.pipeline import IN_FLIGHT, PipelineStage, checkpoint_pipeline_state
from locallearn.metrics import fingerprint
from locallearn.rng import rng_state, set_rng_state

log = logging.getLogger("locallearn")


class Sequential:
    """One process: the learner itself."""

    writer = True
    drives = True  # runs the training loop (False: a pipeline stage > 0, which follows its stage 0's commands)
    images_factor = 1  # examples of the whole batch per example this process trains on
    mode = "none"
    last_pipeline: Any = None  # the pipeline stages' states from the last collect (None outside a pipeline)

    def __init__(self, learner: Any) -> None:
        self.learner = learner

    def train_step(self, batch) -> dict[str, Tensor]:
        return self.learner.train_step(batch)

    def evaluate(self, loader) -> dict:
        return self.learner.evaluate(loader)

    def agree_stop(self, signum: int | None) -> int | None:
        return signum

    def collect(self) -> tuple[dict[str, Tensor], Any]:
        return {}, None

    def checkpoint_extra(self, pipeline: Any) -> dict[str, Any]:
        return {}

    def restore(self, ckpt: dict[str, Any]) -> None:
        pass

    def finish(self, signum: int = 0) -> None:
        pass

    def summary_extra(self) -> dict[str, Any]:
        return {}

    def step_stats(self, wait: bool = False) -> list[tuple[int, dict[str, float]]]:
        """Statistics of earlier steps of blocks this process's loop did not train (a pipeline's later stages), as
        ``(step, {"loss/k": value, ...})`` once they have arrived (all of them with ``wait``); none here."""
        return []


class DataParallelRun(Sequential):
    """Every rank trains all blocks on its shard; rank 0 writes. Checkpoints hold every rank's RNG state."""

    mode = "data"

    def __init__(self, learner: Any, ctx: DistContext, overlap: bool = True) -> None:
        super().__init__(learner)
        self.ctx = ctx
        self.dp = DataParallel(learner, ctx, overlap=overlap)
        self.writer = ctx.is_writer
        self.images_factor = ctx.world

    def train_step(self, batch) -> dict[str, Tensor]:
        return self.dp.train_step(batch)

    def agree_stop(self, signum: int | None) -> int | None:
        return self.dp.agree_stop(signum)

    def checkpoint_extra(self, pipeline: Any) -> dict[str, Any]:
        rngs = gather_to_writer(rng_state(), self.ctx)
        return {"rng_ranks": rngs, "world": self.ctx.world}

    def restore(self, ckpt: dict[str, Any]) -> None:
        rngs = ckpt.get("rng_ranks")
        if rngs is not None and len(rngs) == self.ctx.world:
            set_rng_state(rngs[self.ctx.rank])
        # no broadcast: every rank loaded the same checkpoint

    def summary_extra(self) -> dict[str, Any]:
        prints = gather_to_writer((fingerprint(self.learner.model), fingerprint(self.learner.method)), self.ctx)
        return {
            "parallel": "data",
            "world_size": self.ctx.world,
            "rank_fingerprints": None if prints is None else [model for model, _ in prints],
            "rank_method_fingerprints": None if prints is None else [method for _, method in prints],
        }


class PipelineRun(Sequential):
    """Stage 0 of each replica drives the loop (rank 0 writes); the other ranks :meth:`serve`."""

    mode = "pipeline"

    def __init__(
        self,
        learner: Any,
        ctx: DistContext,
        starts: list[int],
        staleness: int,
        replicas: int = 1,
        overlap: bool = True,
        in_flight: int = IN_FLIGHT,
        stats_every: int = 0,
    ) -> None:
        super().__init__(learner)
        self.ctx = ctx
        self.stage = PipelineStage(learner, ctx, starts, staleness, replicas, overlap, in_flight, stats_every)
        self.writer = ctx.is_writer
        self.drives = self.stage.stage == 0  # each replica's stage 0 runs the loop; the other stages serve
        self.images_factor = replicas

    def agree_stop(self, signum: int | None) -> int | None:
        return self.stage.agree_stop(signum)

    def train_step(self, batch) -> dict[str, Tensor]:
        return self.stage.train_step(batch)

    def evaluate(self, loader) -> dict:
        return self.stage.evaluate(as_batch(b, self.learner.device) for b in loader)

    def collect(self) -> tuple[dict[str, Tensor], Any]:
        sums, self.last_pipeline = self.stage.collect()
        return sums, self.last_pipeline

    def checkpoint_extra(self, pipeline: Any) -> dict[str, Any]:
        return {"pipeline": pipeline}

    def restore(self, ckpt: dict[str, Any]) -> None:
        stage = self.stage
        state = checkpoint_pipeline_state(ckpt.get("pipeline"), self.ctx.rank, self.ctx.world, stage.starts,
                                          stage.replicas)  # fmt: skip
        stage.restore_pipeline_state(state)

    def step_stats(self, wait: bool = False) -> list[tuple[int, dict[str, float]]]:
        return self.stage.step_stats(wait)

    def finish(self, signum: int = 0) -> None:
        self.stage.stop(signum)

    def serve(self) -> int:
        return self.stage.serve()

    def summary_extra(self) -> dict[str, Any]:
        starts = self.stage.starts
        return {
            "parallel": "pipeline",
            "world_size": self.ctx.world,
            "pipeline_stages": [list(range(a, b)) for a, b in zip(starts, starts[1:])],
            "pipeline_staleness": self.stage.staleness,
            "pipeline_replicas": self.stage.replicas,
            "pipeline_in_flight": self.stage.in_flight,
            # per rank (rank = replica × stages + stage), seconds spent waiting (input, MAN's parameter versions,
            # back-pressure) up to the last collect
            "pipeline_wait_seconds": getattr(self.stage, "stage_waits", None),
        }


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
