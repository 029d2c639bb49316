"""Where a run's numbers go: ``metrics.jsonl``, TensorBoard and the console, each a :class:`Sink` that the training
loop calls once per event (after a step, at an epoch's end, before a checkpoint, at the end of the run).

The loop holds one :class:`Sinks` and never asks which sinks there are; TensorBoard's is
:class:`locallearn.tensorboard_log.TensorBoardLog`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from locallearn.durable import atomic_write

log = logging.getLogger("locallearn")


class Sink:
    """A destination of a run's numbers; every call does nothing unless a subclass says otherwise."""

    def train_step(self, learner: Any, stats: dict[str, Any]) -> None:
        """After each training step, with its per-block statistics (device tensors)."""

    def block_stats(self, step: int, stats: dict[str, float]) -> None:
        """Per-block statistics of an earlier ``step`` that arrived late: a pipeline's later stages report their
        blocks' to rank 0 every ``--log-every`` steps, a few steps behind (:mod:`locallearn.distributed.pipeline`)."""

    def end_epoch(self, row: dict[str, Any], method_report: dict[str, Any], peak_bytes: int | None) -> None:
        """At each epoch end, with the epoch's ``metrics.jsonl`` row, the method's report and the epoch's peak."""

    def flush(self) -> None:
        """Before each checkpoint: everything so far on disk, so a resume from it misses nothing."""

    def close(self) -> None:
        """At the end of the run, whatever ended it."""


class Sinks(Sink):
    """Several sinks, called in order."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def train_step(self, learner: Any, stats: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.train_step(learner, stats)

    def block_stats(self, step: int, stats: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.block_stats(step, stats)

    def end_epoch(self, row: dict[str, Any], method_report: dict[str, Any], peak_bytes: int | None) -> None:
        for sink in self.sinks:
            sink.end_epoch(row, method_report, peak_bytes)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class MetricsFile(Sink):
    """``<out>/metrics.jsonl``: the run's ``history`` (every epoch's row, a resumed run's earlier ones included),
    rewritten atomically at each epoch end."""

    def __init__(self, path: Path, history: list[dict[str, Any]]) -> None:
        self.path, self.history = Path(path), history

    def end_epoch(self, row: dict[str, Any], method_report: dict[str, Any], peak_bytes: int | None) -> None:
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in self.history))


class ConsoleLog(Sink):
    """The epoch's line in the run log: the last block's training loss, test (or held-out) accuracy, each block's,
    throughput; then the blocks whose gradient was clipped and the method's report, when there are any."""

    def __init__(self, epochs: int, num_blocks: int, holdout: bool, describe_report) -> None:
        self.epochs, self.num_blocks, self.holdout, self.describe_report = epochs, num_blocks, holdout, describe_report

    def end_epoch(self, row: dict[str, Any], method_report: dict[str, Any], peak_bytes: int | None) -> None:
        blocks = " ".join("-" if a is None else f"{a:.3f}" for a in row["block_accuracies"])
        last_loss = row.get(f"loss/{self.num_blocks - 1}")
        log.info(
            "epoch %d/%d step %d  train loss %s  %s acc %.4f%s  blocks [%s]  %.0f img/s",
            row["epoch"],
            self.epochs,
            row["step"],
            f"{last_loss:.4f}" if last_loss is not None else "-",
            "holdout" if self.holdout else "test",
            row["test_accuracy"],
            "" if (top5 := row.get("test_top5_accuracy")) is None else f" (top-5 {top5:.4f})",
            blocks,
            row["images_per_second"],
        )
        clipped = {k: v for k, v in row.items() if k.startswith("clip/") and v > 0}
        if clipped:  # --optim.clip_grad_norm: say when it acts, per block
            shares = ", ".join(f"{v:.0%} (block {k[5:]})" for k, v in clipped.items())
            log.info("  gradient clipped in %s of the steps", shares)
        if method_report:
            log.info("  %s", self.describe_report(method_report))
