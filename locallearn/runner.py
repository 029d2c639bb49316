"""A whole training run from a :class:`RunConfig`: data → model → learner → epochs → run directory.

The run directory holds ``run.json`` (how and where the run was started, each start of a resumed run appended:
:mod:`locallearn.provenance`), ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per epoch),
``tensorboard/`` (event files, :mod:`locallearn.tensorboard_log`), ``checkpoint.pt`` and ``summary.json``. Every file
but the event files is written atomically (temporary file, then rename), so a run that fails half-way never leaves a
truncated file behind.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from locallearn.allocator import set_mmap_threshold
from locallearn.checkpoint import load_checkpoint
from locallearn.config import RunConfig, dump_yaml, validate
from locallearn.data import build_data
from locallearn.distributed import runtime
from locallearn.distributed.context import broadcast_object, init_from_env, launched, quiet_unless_writer
from locallearn.distributed.data_parallel import convert_sync_batchnorm
from locallearn.distributed.pipeline import balance, grid_position, measure_block_seconds
from locallearn.distributed.runtime import barrier
from locallearn.durable import CheckpointStore, atomic_write, check_keep, resolve_resume
from locallearn.errors import CheckpointError, PeerFailed, Preempted, UserError
from locallearn.from_config import build_learner, build_mixer  # noqa: F401 (build_mixer: API)
from locallearn.learner import LocalLearner
from locallearn.metrics import MemoryReport, RunningMeans, fingerprint, peak_memory, resolve_device
from locallearn.provenance import start_record, write_run_record
from locallearn.results import RESUMABLE_DIFFERENCES, config_differences  # noqa: F401 (RESUMABLE_DIFFERENCES: API)
from locallearn.rng import rng_state, set_rng_state
from locallearn.sinks import ConsoleLog, MetricsFile, Sink, Sinks
from locallearn.tensorboard_log import open_log, wanted
from locallearn.version import __version__

log = logging.getLogger("locallearn")


def _describe_checkout() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        if out.returncode != 0:
            return None
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# Read once, when the code is imported: a run records the commit of the code it is running, even if the checkout
# moves on while it trains (a long benchmark outlives several commits); "-dirty" marks uncommitted changes.
_CODE_COMMIT = _describe_checkout()


def git_commit() -> str | None:
    """The commit of the locallearn code this process imported (``<sha>`` or ``<sha>-dirty``), None outside git."""
    return _CODE_COMMIT


def prepare_run_dir(cfg: RunConfig, create: bool = True) -> Path:
    """The run directory, checked (and made, with ``create``; only rank 0 makes it in a distributed run)."""
    k = cfg.resolved_k()
    arch = cfg.model.arch.replace(":", "-")  # torchvision:resnet18 → torchvision-resnet18 (no ':' in paths)
    out = Path(cfg.train.out or f"runs/{datetime.now():%Y%m%d-%H%M%S}-{cfg.train.method}-{arch}-K{k}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a directory path")
    if out.is_dir() and any(out.iterdir()) and not cfg.train.overwrite and not cfg.train.resume:
        raise UserError(
            f"--out {out} already holds files: choose a new directory, pass --resume auto to continue the run in it, "
            "or --overwrite"
        )
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class Progress:
    """Where a run stands: what a checkpoint must hold besides the learner to continue exactly."""

    epoch: int = 0  # the epoch in progress (or the next one, when ``batch`` is 0)
    batch: int = 0  # batches of ``epoch`` already trained
    history: list[dict[str, Any]] = field(default_factory=list)
    train_images: int = 0
    train_seconds: float = 0.0
    epoch_seen: int = 0
    epoch_seconds: float = 0.0
    epoch_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    epoch_count: int = 0


class _Signals:
    """SIGTERM, SIGINT and (optionally) SIGUSR1 set a flag; the loop finishes its step, saves and stops."""

    def __init__(self, names: list[str]) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}
        for name in names:
            signum = getattr(signal, name)
            self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _checkpoint_state(
    cfg: RunConfig, learner: LocalLearner, progress: Progress, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    rng = rng_state()
    return {
        "format": 2,
        "config": cfg.to_dict(),
        "learner": learner.state_dict(),
        "progress": dict(vars(progress)),
        "rng": rng,
        "versions": {"locallearn": __version__, "torch": str(torch.__version__), "git": git_commit()},
        **(extra or {}),
    }


def _restore(path: Path, cfg: RunConfig, learner: LocalLearner, runner=None) -> Progress:
    ckpt = load_checkpoint(path)
    if ckpt.get("format") != 2 or "progress" not in ckpt:
        raise CheckpointError(f"{path} is a final checkpoint without training progress: resume from checkpoints/")
    diffs = config_differences(ckpt["config"], cfg.to_dict())
    if diffs:
        raise CheckpointError(
            f"{path} was written by a different configuration ({'; '.join(diffs)}): resume with the same config, "
            "or start a new run in another --out"
        )
    learner.load_state_dict(ckpt["learner"])
    set_rng_state(ckpt["rng"])
    if runner is not None:
        runner.restore(ckpt)
    return Progress(**ckpt["progress"])


def _save(store, cfg: RunConfig, learner: LocalLearner, progress: Progress, runner, pipeline=None) -> None:
    """A complete checkpoint (a collective in a distributed run: every rank calls it, rank 0 writes)."""
    extra = runner.checkpoint_extra(pipeline)
    if not runner.writer:
        return
    path = store.save(
        _checkpoint_state(cfg, learner, progress, extra),
        learner.step,
        {"epoch": progress.epoch, "batch": progress.batch},
    )
    log.info("checkpoint: %s (step %d)", path, learner.step)


def use_deterministic_kernels() -> None:
    """Only deterministic kernels from here on: ``torch.use_deterministic_algorithms`` (an operation without a
    deterministic implementation warns, naming itself), cuDNN without benchmark autotuning, and cuBLAS's fixed
    workspace (the variable must be set before CUDA's first matrix product; a run sets it at its start)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _is_peer_failure(err: RuntimeError) -> bool:
    """A collective or point-to-point message failed because a peer died or timed out (gloo and NCCL raise
    ``RuntimeError`` or its ``DistError`` subclasses, with the transport's message)."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    markers = ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "gloo", "NCCL")
    return any(m in text for m in markers)


def _parallel_mode(cfg: RunConfig) -> str:
    mode = cfg.dist.parallel
    if mode not in ("auto", "none", "data", "pipeline"):
        raise UserError(f"unknown --dist.parallel {mode!r}: use auto, none, data or pipeline")
    if mode == "auto":
        mode = "data" if launched() else "none"
    if mode != "none" and not launched():
        raise UserError(
            f"--dist.parallel {mode} needs several processes: launch with `torchrun --nproc-per-node N -m locallearn "
            "train ...` (N >= 2)"
        )
    if cfg.dist.replicas != 1 and mode != "pipeline":
        raise UserError(
            f"--dist.replicas {cfg.dist.replicas} is for --parallel pipeline (a grid of stages x replicas); data "
            "parallelism already makes every process a replica: leave --dist.replicas at 1"
        )
    if mode == "pipeline":
        grid_position(0, int(os.environ["WORLD_SIZE"]), cfg.dist.replicas)  # a grid that fits: checked before any work
    return mode


def _make_executor(mode, cfg: RunConfig, learner: LocalLearner, ctx, train_loader, resume_from: Path | None = None):
    """The object that runs steps in ``mode`` (:mod:`locallearn.distributed.runtime`)."""
    if mode == "none":
        return runtime.Sequential(learner)
    if mode == "data":
        if cfg.dist.sync_bn:
            convert_sync_batchnorm(learner, learner.device)
        return runtime.DataParallelRun(learner, ctx, overlap=cfg.dist.overlap)
    if learner.method.phases(cfg.train.epochs) is not None:
        raise UserError(
            f"--parallel pipeline does not run {learner.method.name}'s phases (a stage would idle while another "
            "phase trains): use data parallelism (the default under torchrun) or one process"
        )
    if cfg.dist.sync_bn:
        raise UserError("--dist.sync_bn is for data parallelism; a pipeline stage holds whole batches: leave it off")
    starts = cfg.dist.stages
    if starts is None and resume_from is not None:  # a resumed pipeline keeps its stages (timings may differ now)
        states = load_checkpoint(resume_from).get("pipeline") if ctx.is_writer else None
        starts = broadcast_object(None if not states else states[0]["starts"][1:-1])
    if starts is None:
        if ctx.is_writer:  # time each block on the first batch (state restored after), then split by time
            seconds = measure_block_seconds(learner, next(iter(train_loader)))
            stages = ctx.world // cfg.dist.replicas
            starts = balance(seconds, stages)
            log.info(
                "pipeline: %d stages %s by measured seconds per block [%s]",
                stages,
                [0, *starts],
                " ".join(f"{t * 1e3:.1f}ms" for t in seconds),
            )
        starts = broadcast_object(starts)
    return runtime.PipelineRun(learner, ctx, list(starts), cfg.dist.staleness, cfg.dist.replicas, cfg.dist.overlap,
                               cfg.dist.in_flight, stats_every=cfg.train.log_every)  # fmt: skip


@dataclass
class Run:
    """Everything one training run is made of, as :func:`train`'s parts hand it on: where it runs (device, processes),
    its data, learner and epoch plan, its directory and checkpoint store, the executor, and its progress."""

    cfg: RunConfig
    started: datetime
    device: torch.device
    mode: str  # "none", "data" or "pipeline"
    ctx: Any  # DistContext under torchrun, else None
    train_loader: Any
    test_loader: Any
    learner: LocalLearner
    schedule: list[tuple[Any, int, int, int]]
    total_steps: int
    out: Path
    store: CheckpointStore | None
    resume_from: Path | None
    executor: Any
    progress: Progress = field(default_factory=Progress)

    @property
    def writer(self) -> bool:
        return self.ctx is None or self.ctx.is_writer


def train(cfg: RunConfig) -> dict[str, Any] | None:
    """Run the configured training and return the summary (also written to ``<out>/summary.json``).

    Every ``train.checkpoint_every`` steps and at the end of each epoch a complete checkpoint goes to
    ``<out>/checkpoints/`` (:mod:`locallearn.durable`); ``train.resume`` ("auto" or a path) continues from one so that
    the run ends with the weights an uninterrupted run would have. SIGTERM, SIGINT and SIGUSR1 finish the current
    step, save and raise :class:`Preempted` (exit status 128 + the signal).

    Under torchrun (``cfg.dist``, docs/distributed.md) every rank calls this; rank 0 writes and returns the summary,
    the other ranks return None.
    """
    run = _prepare(cfg)
    _announce(run)
    wall_start = time.perf_counter()
    memory = MemoryReport(run.device)
    if not _execute(run, memory):
        return None  # a pipeline stage > 0: rank 0 writes the run's results
    log.info("memory: %s", memory.describe())
    return _finish(run, memory, time.perf_counter() - wall_start)


def _prepare(cfg: RunConfig) -> Run:
    """Check the config, join the other processes, load the data, build the learner and its epoch plan, check and
    make the run directory, choose the executor and restore a checkpoint when resuming."""
    started = datetime.now()
    validate(cfg)
    device = resolve_device(cfg.train.device)
    if cfg.train.deterministic:
        use_deterministic_kernels()
    mode = _parallel_mode(cfg)
    ctx = None
    if mode != "none":
        ctx = init_from_env(device, cfg.dist.timeout_s)
        device = ctx.device
        quiet_unless_writer(ctx)
    writer = ctx is None or ctx.is_writer
    wanted(cfg.train.tensorboard, announce=writer)  # "on" without the package fails here, before any work
    if cfg.train.malloc_mmap_threshold is not None and not set_mmap_threshold(cfg.train.malloc_mmap_threshold):
        log.warning("malloc_mmap_threshold has no effect here: the C library is not glibc")
    if cfg.train.checkpoint_every < 0:
        raise UserError(f"checkpoint_every must be >= 0 (0: at epoch ends only), got {cfg.train.checkpoint_every}")
    check_keep(cfg.train.keep_checkpoints)  # before any work, not only when the store is made
    torch.manual_seed(cfg.train.seed)
    train_loader, test_loader, learner, schedule, total_steps = _data_and_learner(cfg, device, mode, ctx)
    out = prepare_run_dir(cfg, create=writer)
    if ctx is not None:
        barrier()  # every rank has checked --out before rank 0 writes into it
    store = CheckpointStore(out, cfg.train.keep_checkpoints) if writer else None
    resume_from = None
    if cfg.train.resume:
        resume_from = resolve_resume(cfg.train.resume, out, log) if writer else None
        if ctx is not None:
            resume_from = broadcast_object(resume_from)  # rank 0 chose (and logged why); every rank loads it
    executor = _make_executor(mode, cfg, learner, ctx, train_loader, resume_from)
    run = Run(cfg, started, device, mode, ctx, train_loader, test_loader, learner, schedule, total_steps, out, store,
              resume_from, executor)  # fmt: skip
    if resume_from is not None:
        run.progress = _restore(resume_from, cfg, learner, executor)
        log.info("resumed at step %d (epoch %d, batch %d)", learner.step, run.progress.epoch + 1, run.progress.batch)
    return run


def _data_and_learner(cfg: RunConfig, device: torch.device, mode: str, ctx) -> tuple[Any, Any, LocalLearner, list, int]:
    """The loaders (sharded under data parallelism), the learner, the epoch plan and the run's length in steps."""
    train_loader, test_loader, info = build_data(
        cfg.data, cfg.train.batch_size, seed=cfg.train.seed, device=device, eval_batch_size=cfg.train.eval_batch_size
    )
    if len(train_loader) == 0:
        raise UserError(
            f"the training set ({train_loader.num_examples} examples) is smaller than one batch of "
            f"{cfg.train.batch_size}: lower --batch-size or raise --limit-train"
        )
    if mode == "data":
        train_loader.shard(ctx.rank, ctx.world)
        test_loader.shard(ctx.rank, ctx.world)
    elif mode == "pipeline" and cfg.dist.replicas > 1:  # a grid: each replica's stage 0 reads its shard
        _, replica, _ = grid_position(ctx.rank, ctx.world, cfg.dist.replicas)
        train_loader.shard(replica, cfg.dist.replicas)
        test_loader.shard(replica, cfg.dist.replicas)
    learner = build_learner(cfg, info, device, None, len(train_loader))
    schedule = epoch_schedule(learner, train_loader, cfg)
    total_steps = sum(steps for _, _, _, steps in schedule)
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    learner.total_steps = total_steps
    if cfg.data.limit_train is not None and cfg.data.name != "synthetic":
        log.warning(
            "training on the first %d examples of %s (--limit-train; 'all' for the full set)",
            train_loader.num_examples,
            cfg.data.name,
        )
    if cfg.data.holdout is not None:
        log.warning(
            "evaluating on the last %d training examples of %s (--holdout), not on its test set: every 'test' "
            "figure of this run is a validation figure",
            cfg.data.holdout,
            cfg.data.name,
        )
    return train_loader, test_loader, learner, schedule, total_steps


def _announce(run: Run) -> None:
    """Write the resolved config and this start's record (rank 0), and log what runs where."""
    cfg, learner = run.cfg, run.learner
    if run.writer:
        dump_yaml(cfg, run.out / "config.yaml")
        resumed = {"resumed_from": None if run.resume_from is None else str(run.resume_from),
                   "resumed_at_step": learner.step}  # fmt: skip
        start = start_record(run.started, git_commit(), device=str(run.device), **resumed)
        write_run_record(run.out, start, append=bool(cfg.train.resume))  # a rerun with --resume keeps earlier starts
    ctx = run.ctx
    log.info(
        "run %s: %s on %s, %s, K=%d on %s%s",
        run.out,
        cfg.train.method,
        cfg.model.arch,
        cfg.data.name,
        len(learner.blocks),
        run.device,
        "" if ctx is None else f", {run.mode}-parallel over {ctx.world} processes ({ctx.backend})",
    )
    for line in learner.describe():
        log.info("  %s", line)
    if learner.method.aux_summary:
        log.info("  %s", learner.method.aux_summary)


def _execute(run: Run, memory: MemoryReport) -> bool:
    """Train the epoch plan (from the restored progress), with signals, TensorBoard and the executor's ending; False on
    a pipeline stage > 0, which follows rank 0 instead and has no results of its own."""
    cfg, learner, executor, progress = run.cfg, run.learner, run.executor, run.progress
    signals = _Signals(["SIGTERM", "SIGINT"] + (["SIGUSR1"] if cfg.train.stop_on_sigusr1 else []))
    epochs = len(run.schedule)
    sinks = _sinks(run, epochs)
    try:
        if not executor.drives:
            signum = executor.serve()  # pipeline stages > 0 follow their stage 0's commands until it stops them
            if signum:
                raise Preempted(f"{signal.Signals(signum).name} received: stopped with the pipeline", signum)
            return False
        try:
            while progress.epoch < epochs and learner.step < run.total_steps:
                _enter_epoch(learner, run.train_loader, run.schedule[progress.epoch])
                with memory.window("train"):
                    _train_epoch(learner, run.train_loader, progress, run.total_steps, cfg, run.store, signals,
                                 executor, epochs, sinks)  # fmt: skip
                if progress.batch < len(run.train_loader):
                    break  # max_steps reached inside the epoch: that partial epoch is evaluated below
                _end_epoch(learner, run.test_loader, progress, memory, cfg, run.out, run.store, executor, epochs, sinks)
            if progress.batch > 0:  # a run cut short by max_steps mid-epoch still reports that partial epoch
                _end_epoch(learner, run.test_loader, progress, memory, cfg, run.out, run.store, executor, epochs, sinks)
        except Preempted as err:
            executor.finish(err.exit_code - 128)
            raise
        executor.finish(0)
    except RuntimeError as err:
        if run.ctx is None or not _is_peer_failure(err):
            raise
        raise PeerFailed(
            f"rank {run.ctx.rank}: another process of the run failed or did not answer within --dist.timeout_s="
            f"{cfg.dist.timeout_s:g} s ({' '.join(str(err).split())[:200]}); the other ranks' logs say which and why. "
            f"Checkpoints already in {run.out / 'checkpoints'} are complete: fix the cause and rerun with --resume auto"
        ) from None
    finally:
        signals.restore()
        sinks.close()  # flushed and closed whatever ended the run (an error, a signal, a lost peer)
    return True


def _sinks(run: Run, epochs: int) -> Sinks:
    """metrics.jsonl and TensorBoard (rank 0), and the run log (every rank; quiet but for rank 0's)."""
    cfg, learner = run.cfg, run.learner
    sinks: list[Sink] = []
    if run.writer:
        sinks.append(MetricsFile(run.out / "metrics.jsonl", run.progress.history))
        if wanted(cfg.train.tensorboard, announce=False):
            resumed_step = learner.step if run.resume_from is not None else None
            sinks.append(open_log(run.out, cfg.train.log_every, resumed_step, required=cfg.train.tensorboard == "on"))
    sinks.append(ConsoleLog(epochs, len(learner.blocks), cfg.data.holdout is not None, learner.method.describe_report))
    return Sinks(sinks)


def _finish(run: Run, memory: MemoryReport, wall_seconds: float) -> dict[str, Any] | None:
    """The summary (rank 0 writes it and the final checkpoint; the other ranks return None)."""
    cfg, learner, progress = run.cfg, run.learner, run.progress
    _, peak_kind = peak_memory(run.device)
    history = progress.history
    extra = run.executor.summary_extra()  # a collective under data parallelism (fingerprints of every rank)
    if not run.writer:
        return None
    summary = {
        "method": cfg.train.method,
        "arch": cfg.model.arch,
        "dataset": cfg.data.name,
        "K": len(learner.blocks),
        "split": cfg.train.split,
        "boundaries": learner.bounds,
        "epochs": len(history),
        "steps": learner.step,
        "evaluated_on": "test" if (n := cfg.data.holdout) is None else f"holdout of the last {n} training examples",
        "test_accuracy": history[-1]["test_accuracy"] if history else None,
        "test_top5_accuracy": history[-1].get("test_top5_accuracy") if history else None,
        "best_test_accuracy": max((r["test_accuracy"] for r in history), default=None),
        "block_accuracies": history[-1]["block_accuracies"] if history else [],
        "peak_memory_bytes": memory.peak,
        "peak_memory_kind": peak_kind,
        **memory.summary(),
        "images_per_second": progress.train_images / max(progress.train_seconds, 1e-9),
        "compile": cfg.train.compile,
        "compile_seconds": learner.compile_seconds,  # the step that compiled (this process's; left out above)
        **learner.num_params(),
        "wall_seconds": wall_seconds,
        "device": str(run.device),
        "device_name": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu",
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "seed": cfg.train.seed,
        "git_commit": git_commit(),
        "resumed_from": None if run.resume_from is None else str(run.resume_from),
        "skipped_nonfinite_steps": learner.skipped_steps,
        "phases": [  # each phase once, in order (the schedule has one entry per epoch)
            {"name": p.name, "learning": list(p.learning), "epochs": p.epochs, "batch_size": p.batch_size}
            for p in dict.fromkeys(phase for phase, _, _, _ in run.schedule if phase is not None)
        ],
        "method_report": learner.method.report(),
        "parallel": "none",
        **extra,
        "fingerprint": fingerprint(learner.model),
        "out": str(run.out),
    }
    if cfg.train.save_checkpoint:
        final = {"format": 1, "config": cfg.to_dict(), "learner": learner.state_dict(), "summary": summary}
        run.store.save_final(final, learner.step)
    atomic_write(run.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def epoch_schedule(learner: LocalLearner, loader, cfg: RunConfig) -> list[tuple[Any, int, int, int]]:
    """Every epoch of the run as (phase, epoch within the phase, batch size, steps): the method's phases
    (:meth:`locallearn.methods.LocalMethod.phases`, each at its own batch size), or ``--epochs`` epochs in which
    every block learns (phase None). The run's epoch index, its order and its augmentation stay what they are
    without phases, so a resumed run finds its phase from the checkpoint's epoch alone."""
    schedule = []
    for phase, phase_epoch in learner.method.epoch_phases(cfg.train.epochs):
        batch_size = (phase.batch_size if phase is not None else None) or cfg.train.batch_size
        if phase is not None and phase_epoch == 0:
            loader.set_batch_size(batch_size)
            if len(loader) == 0:
                raise UserError(
                    f"{learner.method.name}'s {phase.name} phase trains at batch {batch_size}, more than the "
                    f"{loader.num_examples} training examples: lower its batch size or raise --limit-train"
                )
        schedule.append((phase, phase_epoch, batch_size, len(loader)))
    if schedule[0][0] is not None:
        loader.set_batch_size(schedule[0][2])
    return schedule


def _enter_epoch(learner: LocalLearner, loader, entry: tuple[Any, int, int, int]) -> None:
    """Set the phase and batch size of the epoch ``entry`` of :func:`epoch_schedule` describes."""
    phase, phase_epoch, batch_size, _ = entry
    if phase is None:
        return
    if loader.batch_size != batch_size:
        loader.set_batch_size(batch_size)
    if learner.phase != phase:
        log.info(
            "phase %s: blocks %s learn, batch %d, %d epoch(s)",
            phase.name,
            list(phase.learning),
            batch_size,
            phase.epochs,
        )
    learner.set_phase(phase, phase_epoch)


def _train_epoch(
    learner,
    loader,
    progress: Progress,
    total_steps: int,
    cfg: RunConfig,
    store,
    signals,
    executor,
    epochs: int,
    sinks: Sink | None = None,
) -> None:
    """Train the rest of ``progress.epoch`` (from batch ``progress.batch``), checkpointing on the way."""
    loader.set_epoch(progress.epoch, start_batch=progress.batch)
    means = RunningMeans()
    means.sums, means.count = dict(progress.epoch_sums), progress.epoch_count
    left = min(len(loader) - progress.batch, total_steps - learner.step)
    bar = tqdm(
        total=left,
        desc=f"epoch {progress.epoch + 1}/{epochs}",
        disable=not cfg.train.progress or not executor.writer,
        leave=False,
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    every = cfg.train.checkpoint_every
    sinks = sinks or Sink()

    def late_stats(wait: bool) -> None:  # a pipeline's later stages' step statistics, arriving steps behind
        for step, late in executor.step_stats(wait):
            sinks.block_stats(step, late)

    def bank() -> None:  # move the epoch's time and running sums into progress (before a save, at the end)
        learner.check_nonfinite()  # "stop" stops here, before a checkpoint could hold a non-finite step
        _sync(learner)
        progress.epoch_seconds += time.perf_counter() - start
        progress.epoch_sums, progress.epoch_count = dict(means.sums), means.count
        late_stats(wait=True)  # every step's scalars are written before the checkpoint of that step (not timed)

    for done, batch in enumerate(loader, start=1):
        if done > left:
            break
        compiled_before = learner.compile_seconds
        stats = executor.train_step(batch)
        means.update(stats)
        sinks.train_step(learner, stats)  # TensorBoard: every --log-every steps
        late_stats(wait=False)
        progress.batch += 1
        if learner.compile_seconds != compiled_before:  # the step that compiled the blocks is not training throughput
            start += learner.compile_seconds - compiled_before
            if executor.writer:
                log.info("compiled %d blocks (%s) in %.1f s: the first step, left out of img/s", len(learner.blocks),
                         cfg.train.compile, learner.compile_seconds)  # fmt: skip
        else:
            progress.epoch_seen += batch.y.numel() * executor.images_factor
        bar.update(1)
        if done % 20 == 1 or done == left:
            shown = max(stats, key=lambda key: (key.startswith("loss/"), int(key.split("/")[1])))
            rate = progress.epoch_seen / max(progress.epoch_seconds + time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{means.sums[shown].item() / means.count:.3f}", img_s=f"{rate:.0f}")
        received = executor.agree_stop(signals.received)  # under data parallelism every rank stops at one step
        if (every and learner.step % every == 0 and progress.batch < len(loader)) or received:
            _add_sums(means.sums, executor.collect())
            bank()
            sinks.flush()  # every event up to this checkpoint is on disk before it is
            _save(store, cfg, learner, progress, executor, executor.last_pipeline)
            start = time.perf_counter()  # the save's time is not training time
        if received:
            name = signal.Signals(received).name
            raise Preempted(
                f"{name} received: stopped after step {learner.step} and saved a checkpoint in {out_dir(store, cfg)}; "
                "run the same command with --resume auto to continue",
                received,
            )
    bar.close()
    bank()


def out_dir(store, cfg: RunConfig) -> str:
    return str(store.dir) if store is not None else str(Path(cfg.train.out or ".") / "checkpoints")


def _add_sums(sums: dict[str, torch.Tensor], collected) -> None:
    """Add the statistics other pipeline stages sent with their state (``executor.collect()``) to ``sums``."""
    extra, _ = collected
    for key, value in extra.items():
        sums[key] = sums[key] + value if key in sums else value.clone()


def _sync(learner: LocalLearner) -> None:
    if learner.device.type == "cuda":
        torch.cuda.synchronize(learner.device)


def _end_epoch(
    learner,
    test_loader,
    progress: Progress,
    memory,
    cfg: RunConfig,
    out: Path,
    store,
    executor,
    epochs: int,
    sinks: Sink | None = None,
) -> None:
    """Evaluate, hand the epoch's row to the sinks (``metrics.jsonl``, TensorBoard, the log) and checkpoint the
    epoch's end."""
    with memory.window("eval"):
        report = executor.evaluate(test_loader)
    _add_sums(progress.epoch_sums, executor.collect())
    means = RunningMeans()
    means.sums, means.count = progress.epoch_sums, progress.epoch_count
    train_stats = means.means()
    seen, seconds = progress.epoch_seen, progress.epoch_seconds
    method_report = learner.method.report()
    row = {
        "epoch": progress.epoch + 1,
        "step": learner.step,
        "lr": learner.current_lr(),  # the run's schedule; what each learning block steps with is block_lrs
        "block_lrs": [lr if learner.learns(k) else None for k, lr in enumerate(learner.block_lrs())],
        **train_stats,
        **report,
        "train_seconds": seconds,
        "images_per_second": seen / max(seconds, 1e-9),
        **({"phase": learner.phase.name} if learner.phase is not None else {}),
        **method_report,
    }
    progress.history.append(row)
    progress.train_images += seen
    progress.train_seconds += seconds
    progress.epoch, progress.batch = progress.epoch + 1, 0
    progress.epoch_seen, progress.epoch_seconds, progress.epoch_sums, progress.epoch_count = 0, 0.0, {}, 0
    sinks = sinks or Sink()
    sinks.end_epoch(row, method_report, max(memory.last["train"], memory.last["eval"]))
    sinks.flush()  # every event up to this checkpoint is on disk before it is
    _save(store, cfg, learner, progress, executor, executor.last_pipeline)
