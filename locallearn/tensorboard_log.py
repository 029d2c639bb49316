"""TensorBoard scalars of a training run, beside ``metrics.jsonl``.

Event files go to ``<out>/tensorboard/``; ``tensorboard --logdir OUT`` shows one run, and ``--logdir`` on a directory
of run directories shows them side by side. ``train.tensorboard`` (``--tensorboard``) is "auto" (write them when the
``tensorboard`` package is installed), "on" (an error without it) or "off". Only the writer process (rank 0 under
torchrun) writes.

Step scalars, every ``train.log_every`` (``--log-every``) training steps, at global step = the learner's step count
after that step (``--log-every 0``: none, epoch ends only):

- ``block{k}/loss``: block k's local loss on that batch;
- ``block{k}/train_accuracy``: block k's auxiliary classifier on that batch (blocks whose loss has a classifier);
- ``train/lr``: the run's schedule at that step (``LocalLearner.current_lr``);
- ``block{k}/lr``: the rate block k's optimizer steps with (``LocalLearner.block_lrs``: the schedule's unless the
  method sets its own, e.g. SoftHebb's classifier and its Hebbian blocks' 1.0, whose rule scales its own steps),
  for the blocks that learn in the phase in progress.

Epoch scalars, at every epoch end, at global step = the step the epoch ended at; the numbers of that epoch's row in
``metrics.jsonl``:

- ``block{k}/epoch_loss``, ``block{k}/epoch_train_accuracy``: block k's means over the epoch's steps;
- ``block{k}/test_accuracy``: test accuracy of block k's head (the last block's is the network's);
- ``test/accuracy``, ``test/loss``: the network on the test set;
- ``train/images_per_second``: training throughput over the epoch;
- ``memory/peak_mib``: peak memory of the epoch, training steps and evaluation (MiB; CUDA: allocated tensors, CPU:
  resident set, as ``summary.json``'s ``peak_memory_bytes``);
- ``method/<key>``: numeric entries of the method's own report (SoftHebb: ``method/hebb1/norm_mean``,
  ``method/hebb1/converged``, ...).

Under ``--parallel pipeline`` the step scalars cover every block too: the later stages send theirs to rank 0 at the
same steps, and rank 0 writes them when they arrive (a few steps later: the stages behind it), all of them before a
checkpoint or epoch end.

A resumed run (``--resume``) appends a new event file to the same directory with ``purge_step`` = the checkpoint's
step + 1: whatever a killed run wrote after its last checkpoint is dropped by TensorBoard, and the resumed run writes
those steps again. Everything up to a checkpoint is flushed before the checkpoint is written, so nothing before it is
missing either.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

from locallearn.errors import UserError
from locallearn.options import TENSORBOARD
from locallearn.sinks import Sink

log = logging.getLogger("locallearn")

TENSORBOARD_DIR = "tensorboard"

# names in the step statistics (locallearn.engine.train_blocks: "loss/{k}", "acc/{k}") -> tag within block{k}/
_STAT_TAGS = {"loss": "loss", "acc": "train_accuracy", "clip": "clipped"}  # clip: 1 when the step clipped


def wanted(mode: str, announce: bool = True) -> bool:
    """Whether ``train.tensorboard`` = ``mode`` writes event files here.

    "auto" without the package is off, with one INFO line (when ``announce``) saying how to get it; "on" without it
    is a :class:`UserError` before any work. Checked on every rank (a cheap lookup, no import) so that all of a
    distributed run's ranks agree.
    """
    if mode not in TENSORBOARD:
        raise UserError(f"--tensorboard {mode!r}: use auto, on or off")
    if mode == "off":
        return False
    if importlib.util.find_spec("tensorboard") is not None:
        return True
    if mode == "on":
        raise UserError(
            "--tensorboard on needs the tensorboard package: pip install tensorboard (or 'locallearn[tensorboard]'), "
            "or pass --tensorboard off"
        )
    if announce:
        log.info("tensorboard: off (the package is not installed; pip install tensorboard to get event files)")
    return False


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a number (ints and bools included), else None (strings, lists, None)."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    return None


def _block_tag(key: str, prefix: str = "") -> str | None:
    """``loss/3`` -> ``block3/{prefix}loss``, ``acc/3`` -> ``block3/{prefix}train_accuracy``, ``clip/3`` ->
    ``block3/{prefix}clipped`` (the fraction of steps whose gradient was clipped); None for other keys."""
    name, _, k = key.partition("/")
    if name not in _STAT_TAGS or not k.isdigit():
        return None
    return f"block{k}/{prefix}{_STAT_TAGS[name]}"


class NullLog(Sink):
    """TensorBoard off (or this process is not the writer): every call does nothing (:class:`Sink`'s)."""

    enabled = False


def _after_existing_files(logdir: Path) -> None:
    """Wait (at most about a second) until a new event file's name sorts after every file already in ``logdir``.

    TensorBoard reads a directory's event files in name order, and a resumed run's purge of the steps after its
    checkpoint applies to what was read before it. The name starts with the creation time in whole seconds, then the
    host, the process id and a per-process counter: a run resumed in the same process within the same second (the
    Python API) could sort before the file it must purge ("…10" < "…9")."""
    newest = 0
    for f in logdir.glob("events.out.tfevents.*"):
        parts = f.name.split(".")
        if len(parts) > 3 and parts[3].isdigit():
            newest = max(newest, int(parts[3]))
    while newest and int(time.time()) <= newest:
        time.sleep(0.05)


class TensorBoardLog(NullLog):
    """Writes the scalars listed in the module docstring through ``torch.utils.tensorboard.SummaryWriter``."""

    enabled = True

    def __init__(self, logdir: Path, log_every: int, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.every = log_every
        if purge_step is not None:
            _after_existing_files(self.logdir)
        self.writer = SummaryWriter(str(self.logdir), purge_step=purge_step)
        self.closed = False

    def _add(self, tag: str, value: float, step: int) -> None:
        # non-finite values too (a step skipped by --train.nonfinite=skip): TensorBoard marks them, as metrics.jsonl
        # holds them
        self.writer.add_scalar(tag, value, step)

    def train_step(self, learner: Any, stats: dict[str, Any]) -> None:
        step = learner.step
        if not self.every or step % self.every:
            return
        for key, value in stats.items():
            tag = _block_tag(key)
            if tag is not None:
                self._add(tag, float(value), step)  # one device sync per block, every log_every steps
        self._add("train/lr", float(learner.current_lr()), step)
        for k, lr in enumerate(learner.block_lrs()):
            if learner.learns(k):
                self._add(f"block{k}/lr", float(lr), step)

    def block_stats(self, step: int, stats: dict[str, float]) -> None:
        for key, value in stats.items():
            if (tag := _block_tag(key)) is not None:
                self._add(tag, value, step)

    def end_epoch(self, row: dict[str, Any], method_report: dict[str, Any], peak_bytes: int | None) -> None:
        step = row["step"]
        for key, value in row.items():
            tag = _block_tag(key, prefix="epoch_")
            if tag is not None:
                self._add(tag, float(value), step)
        for k, acc in enumerate(row.get("block_accuracies") or []):
            if acc is not None:  # a block without a classifier head has no accuracy
                self._add(f"block{k}/test_accuracy", float(acc), step)
        for key, tag in (("test_accuracy", "test/accuracy"), ("test_top5_accuracy", "test/top5_accuracy"),
                         ("test_loss", "test/loss"),
                         ("images_per_second", "train/images_per_second")):  # fmt: skip
            if (value := _number(row.get(key))) is not None:
                self._add(tag, value, step)
        if peak_bytes is not None:
            self._add("memory/peak_mib", peak_bytes / 2**20, step)
        for key, value in method_report.items():
            if (number := _number(value)) is not None:
                self._add(f"method/{key}", number, step)

    def flush(self) -> None:
        if not self.closed:
            self.writer.flush()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()  # flushes the queue and closes the event file


def open_log(out: Path, log_every: int, resumed_step: int | None, required: bool = False) -> NullLog:
    """The writer's log in ``<out>/tensorboard/``: a :class:`TensorBoardLog`, or a :class:`NullLog` with a warning
    when the package is installed but ``torch.utils.tensorboard`` cannot load it (``required``, i.e.
    ``--tensorboard on``: a :class:`UserError` instead).

    ``resumed_step`` (the step of the checkpoint a resumed run starts from) purges what an earlier process wrote past
    it; a fresh start into a directory that already holds event files (``--overwrite``, or ``--resume auto`` before
    any checkpoint existed) purges them all (``purge_step`` 0), so TensorBoard never shows two runs as one.
    """
    logdir = Path(out) / TENSORBOARD_DIR
    if resumed_step is not None:
        purge_step: int | None = resumed_step + 1  # the events at the checkpoint's own step were written before it
    else:
        purge_step = 0 if logdir.is_dir() and any(logdir.glob("events.out.tfevents.*")) else None
    try:
        tb = TensorBoardLog(logdir, log_every, purge_step)
    except ImportError as err:  # e.g. a tensorboard too old for torch, or a protobuf it cannot use
        reason = " ".join(str(err).split())[:200]
        if required:
            raise UserError(
                f"--tensorboard on: torch.utils.tensorboard cannot load tensorboard ({reason}): "
                "pip install -U tensorboard, or pass --tensorboard off"
            ) from None
        log.warning("tensorboard: off (torch.utils.tensorboard cannot load it: %s)", reason)
        return NullLog()
    log.info("tensorboard: %s (tensorboard --logdir %s)", logdir, out)
    return tb
