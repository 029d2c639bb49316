"""The in-process memory-window scenarios of tests/test_metrics.py, run in a fresh interpreter (``python -m
tests.memory_windows`` prints one JSON object).

A process's resident set is the whole process's: in a pytest-xdist worker, other tests' threads, heap left resident
and allocator settings (``mallopt``) move it, and CI once read a growth of 0 for a 64 MiB tensor there. A fresh
process holds only what the scenario allocates."""

from __future__ import annotations

import json
import time

import torch

from locallearn.metrics import MemoryWindow, _status_bytes, memory_in_use

MiB = 2**20
CPU = torch.device("cpu")


def _resident(mib: int) -> torch.Tensor:
    return torch.ones(mib * MiB // 4)  # ones() touches every page, so the tensor is resident


def baseline() -> dict:
    """A reset window leaves out what was resident before it opened."""
    if not MemoryWindow(CPU, reset=True).exact:
        return {"skip": "this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)"}
    before = _resident(96)
    window = MemoryWindow(CPU, reset=True)
    small = _resident(4)
    peak, growth_small = window.close()
    now = memory_in_use(CPU)
    window = MemoryWindow(CPU, reset=True)
    more = _resident(128)
    _, growth_more = window.close()
    del before, small, more
    return {"peak": peak, "rss": now, "growth_small": growth_small, "growth_more": growth_more}


def sampled() -> dict:
    """A window below an earlier peak: the mark untouched, the growth from the sampling thread."""
    if _status_bytes("VmHWM") is None:
        return {"skip": "no /proc/self/status VmHWM on this system"}
    high = _resident(160)  # an earlier peak, higher than the window's
    del high
    mark = _status_bytes("VmHWM")
    window = MemoryWindow(CPU)
    held = _resident(64)
    time.sleep(0.1)  # held for 20 sampling intervals
    del held
    peak, growth = window.close()
    return {"mark": mark, "mark_after": _status_bytes("VmHWM"), "exact": window.exact,
            "samples": window.sampler.samples, "growth": growth, "peak": peak}  # fmt: skip


def raises_mark() -> dict:
    """A window that passes the process's lifetime peak: its peak is the kernel's new mark, exactly."""
    if _status_bytes("VmHWM") is None:
        return {"skip": "no /proc/self/status VmHWM on this system"}
    need = _status_bytes("VmHWM") - memory_in_use(CPU) + 48 * MiB
    window = MemoryWindow(CPU)
    held = _resident(need // MiB)
    peak, growth = window.close()
    mark = _status_bytes("VmHWM")  # read while the tensor is held: /proc reports max(recorded mark, RSS now), and the
    del held  # recorded mark is updated lazily, so after a free it may read lower than the peak it showed before
    return {"need": need, "exact": window.exact, "peak": peak, "mark": mark, "growth": growth}


if __name__ == "__main__":
    print(json.dumps({"raises_mark": raises_mark(), "sampled": sampled(), "baseline": baseline()}))
