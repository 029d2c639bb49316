"""Measured training-step memory (and speed) of one bench configuration, in a fresh process.

``locallearn bench`` estimates every configuration on fake tensors (:func:`locallearn.memory.estimate_peak`) and,
next to that, measures it for real here: a fresh child process (:func:`measure_in_subprocess`) builds the model,
the learner and a synthetic batch, runs the warm-up steps (the optimizer state exists after the first), hands the
memory freed since back to the operating system, and then measures the timed steps alone:

* CPU: the growth of the process's peak resident set (VmHWM, reset through ``/proc/self/clear_refs``) over its
  resident set just before the steps — what the steps needed on top of the model, the data, the learner and the
  libraries, which are resident already;
* CUDA: ``max_memory_allocated`` and ``max_memory_reserved`` after ``reset_peak_memory_stats``, and the growth of
  the allocated bytes over those in use before the steps.

A fresh process per configuration matters on a CPU: glibc keeps freed heap memory resident, so an earlier
configuration's larger peak would hide a later one's in the same process (:mod:`locallearn.allocator`).

The estimate comparable to the CPU growth is the estimated peak less what exists before the steps (parameters,
buffers, optimizer state): :func:`estimated_step_bytes`.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from locallearn.allocator import release_free_memory
from locallearn.metrics import MemoryWindow, memory_in_use

RESIDENT_BEFORE_STEPS = ("Parameter", "Buffer", "Optstate")
"""MemTracker's categories that exist before a training step (after the first one) and stay between steps."""


@dataclass
class Measurement:
    """What the measured steps needed. Bytes; None where the device cannot measure it."""

    growth_bytes: int | None  # peak over the steps minus what was in use just before them
    baseline_bytes: int  # in use before the steps (CPU: resident set; CUDA: allocated)
    peak_bytes: int  # CPU: peak RSS of the process during the steps; CUDA: max_memory_allocated
    reserved_bytes: int | None  # CUDA: max_memory_reserved (the caching allocator's pool); None on CPU
    images_per_second: float | None  # None when the steps were not timed
    steps: int


def estimated_step_bytes(estimated_peak: int, parts: dict[str, int]) -> int:
    """The estimated peak less what exists before a step: what a step adds (activations, gradients, temporaries)."""
    return estimated_peak - sum(parts.get(name, 0) for name in RESIDENT_BEFORE_STEPS)


def measure_steps(train_step, device: torch.device, steps: int, warmup: int, images_per_step: int, timed: bool):
    """Run ``warmup`` untracked steps, release freed memory, then measure ``steps`` steps."""
    for _ in range(warmup):
        train_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    release_free_memory()
    window = MemoryWindow(device, reset=True)  # this process is the row's own: an exact peak for its steps
    baseline = memory_in_use(device) if device.type == "cuda" else window.start
    start = time.perf_counter()
    for _ in range(steps):
        train_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak, growth = window.close()
    reserved = int(torch.cuda.max_memory_reserved(device)) if device.type == "cuda" else None
    if device.type == "cuda":
        growth = max(0, peak - baseline)
    rate = images_per_step * steps / seconds if timed and seconds > 0 else None
    return Measurement(growth, baseline, peak, reserved, rate, steps)


def measure_in_subprocess(row: Callable[..., Measurement], *args: Any, timeout: float | None = None) -> Measurement:
    """``row(*args)`` (one bench row: :func:`locallearn.bench_row.measure_row`) measured in a fresh process.

    The process is forked from multiprocessing's fork server, a clean process started once (same interpreter,
    environment and thread settings) that imports torch, dynamo and ``row``'s module and never computes or allocates a
    tensor. Each row thus starts with nothing of another row's heap, as a new interpreter would, without paying the
    interpreter's start-up (imports: about 3 s of the 4 a tiny row took on a 2-core CPU) again for every row.

    Raises:
        RuntimeError: the row failed (its exception is in the message) or its process died (a negative exit status
            is the signal that killed it, e.g. -9 when the kernel ran out of memory).
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", row.__module__])  # optimizers import dynamo when built
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_run_row, args=(row, args, send), daemon=True)
    proc.start()
    send.close()  # the child holds the only writer: recv() ends (EOFError) if the child dies
    what = f"measuring {' '.join(map(str, args[1:]))}"
    try:
        if not receive.poll(timeout):
            proc.kill()
            raise RuntimeError(f"{what} took longer than {timeout} s: stopped")
        status, value = receive.recv()
    except EOFError:
        status, value = "died", None
    finally:
        proc.join()
        receive.close()
    if status != "ok":
        why = value if status == "error" else "no result"
        raise RuntimeError(f"{what} failed (exit status {proc.exitcode}): {why}")
    return Measurement(**value)


def _run_row(row: Callable[..., Measurement], args: tuple, send) -> None:
    """The measuring process: ``row(*args)``, sent back as a dict, or its exception as text."""
    try:
        send.send(("ok", asdict(row(*args))))
    except Exception as err:  # the parent reports it and goes on with the other rows
        send.send(("error", f"{err.__class__.__name__}: {err}"))
        raise SystemExit(1) from None
