"""Measurements shared by training and benchmarks: peak memory, a weight fingerprint, running means."""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import threading
from pathlib import Path

import torch
from torch import Tensor, nn

from locallearn.errors import UserError

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
_STATM = "/proc/self/statm"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
SAMPLE_INTERVAL_S = 0.005


def resolve_device(name: str) -> torch.device:
    """ "auto" picks CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here: use --device cpu")
    return device


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: CUDA's allocator counter, or on CPU the kernel's peak-RSS mark (VmHWM, Linux). Returns
    False where the CPU mark cannot be reset (no writable ``/proc/self/clear_refs``): the peak is then lifelong."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text("5")  # "5" resets the peak resident set size (proc(5), /proc/pid/clear_refs)
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def memory_in_use(device: torch.device) -> int:
    """Bytes in use now: CUDA's allocated tensors, or the process's resident set on CPU (VmRSS)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    return _status_bytes("VmRSS") or 0


def process_peak_memory(device: torch.device) -> int:
    """The whole process's peak since the last reset: on CPU its maximum resident set (the interpreter, libraries,
    data and evaluation included), on CUDA what the caching allocator reserved at most."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_reserved(device))
    # after a reset of VmHWM getrusage's ru_maxrss no longer holds the lifetime peak, so read the mark itself
    return _status_bytes("VmHWM") or int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class RssSampler:
    """The largest resident set (VmRSS) a background thread sees, reading ``/proc/self/statm`` every ``interval``
    seconds until :meth:`stop` (a lower bound of the true peak: it misses spikes shorter than the interval). Reading
    the resident set leaves the kernel's peak mark alone, which is the point (see :class:`MemoryWindow`)."""

    def __init__(self, interval: float = SAMPLE_INTERVAL_S) -> None:
        self.interval = interval
        self.samples = 0
        self._fd = os.open(_STATM, os.O_RDONLY)
        self._max = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="locallearn-rss-sampler", daemon=True)
        self._thread.start()

    def _read(self) -> int:
        return int(os.pread(self._fd, 128, 0).split()[1]) * _PAGE  # statm: size resident shared ... (pages)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, self._read())
            self.samples += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        peak = max(self._max, self._read())
        os.close(self._fd)
        return peak


class MemoryWindow:
    """The peak over a stretch of work and its growth over what was in use when the stretch began.

    ``growth`` is what the work itself needed (on CPU: peak RSS minus RSS at the start, so the model, data and
    libraries already resident are not counted); None where the CPU peak cannot be measured.

    CUDA: the allocator's peak counters, reset when the window opens (they are the process's own). CPU, two ways:

    * ``reset=False`` (training runs): nothing outside the process loses anything. The kernel's peak-RSS mark (VmHWM,
      which ``/usr/bin/time``, ``getrusage`` and schedulers read at exit) is only read: if the window raised it, the
      window's peak is the new mark, exactly; otherwise the peak lies below an earlier one and the window reports the
      largest resident set a sampling thread saw (:class:`RssSampler`, every 5 ms: a lower bound). ``exact`` says
      which it was once closed.
    * ``reset=True`` (a bench row's own measuring process, :mod:`locallearn.measure`): the mark is reset through
      ``/proc/self/clear_refs`` when the window opens, so every window's peak is exact, at the price that the kernel
      forgets the earlier peak (outside tools then see only the peak since the last reset). False in ``exact`` where
      the kernel does not allow the reset.
    """

    def __init__(self, device: torch.device, reset: bool = False) -> None:
        self.device = device
        self.reset = reset or device.type == "cuda"
        self.sampler: RssSampler | None = None
        self.mark = None
        if self.reset:
            self.exact = reset_peak_memory(device)
        else:
            self.mark = _status_bytes("VmHWM")
            self.exact = self.mark is not None and os.path.exists(_STATM)
            if self.exact:
                self.sampler = RssSampler()
        self.start = memory_in_use(device)

    def close(self) -> tuple[int, int | None]:
        """(peak bytes since the window opened, growth over the start or None)."""
        if self.sampler is None:
            peak, _ = peak_memory(self.device)
            return peak, (max(0, peak - self.start) if self.exact else None)
        sampled = self.sampler.stop()
        mark = _status_bytes("VmHWM") or 0
        self.exact = mark > self.mark  # the window raised the process's peak: the mark is the window's own peak
        # Below an earlier peak: what the sampler saw, never above the kernel's mark. The resident-set counters are
        # kept per CPU and the mark is updated lazily, so a sample can pass the mark by a page or so; capped, every
        # figure stays at most what /usr/bin/time and getrusage report for the process.
        peak = mark if self.exact else min(max(sampled, self.start), mark)
        return peak, max(0, peak - self.start)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory in bytes since the last reset, and what was measured.

    CUDA: ``max_memory_allocated`` (tensors only, the field's headline number). CPU: peak resident memory of the whole
    process (VmHWM), which includes the interpreter, libraries and the dataset, so compare CPU figures between runs
    of one configuration, not as absolute activation sizes.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm, "cpu_peak_rss"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss_lifetime"


class MemoryReport:
    """Where a run's memory goes: the training steps alone, evaluation alone, and the whole process.

    ``peak`` is the highest peak of any window (training or evaluation) since training began — the summary's
    ``peak_memory_bytes`` as before; ``peaks["train"]`` the highest of the training windows alone; ``train``/``eval``
    growth is the most any window of that kind added on top of what was in use when it opened (on CPU, RSS: the
    model, data and libraries already resident are not counted).

    On CPU the windows only read the kernel's peak-RSS mark (VmHWM) and sample the resident set
    (:class:`MemoryWindow` with ``reset=False``): the mark stays the process's lifetime peak, so ``/usr/bin/time``'s
    maximum resident set, ``getrusage`` and a scheduler's accounting see the whole run, and ``process_peak`` (the
    mark at the last window's end) is at most what they report. A window that does not raise the mark reports the
    sampled peak, a lower bound; the training windows of the first epoch raise it in practice.

    ``last[kind]`` is the peak of the most recent window of that kind: an epoch's own peak is
    ``max(last["train"], last["eval"])`` once its evaluation has run (the per-epoch TensorBoard scalar).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.before_training = memory_in_use(device)
        self.peaks: dict[str, int] = {"train": 0, "eval": 0}
        self.last: dict[str, int] = {"train": 0, "eval": 0}
        self.growth: dict[str, int | None] = {"train": 0, "eval": 0}
        self.process_peak = process_peak_memory(device)  # what building the model, data and learner took

    @property
    def peak(self) -> int:
        """The highest peak of any window since training began."""
        return max(self.peaks.values())

    @contextlib.contextmanager
    def window(self, kind: str):
        window = MemoryWindow(self.device)
        yield
        peak, growth = window.close()
        self.peaks[kind] = max(self.peaks[kind], peak)
        self.last[kind] = peak
        self.process_peak = max(self.process_peak, process_peak_memory(self.device))
        old = self.growth[kind]
        self.growth[kind] = None if growth is None or old is None else max(old, growth)

    def summary(self) -> dict[str, int | None]:
        return {
            "process_peak_memory_bytes": self.process_peak,
            "memory_in_use_before_training_bytes": self.before_training,
            "train_steps_peak_memory_bytes": self.peaks["train"],
            "train_steps_memory_growth_bytes": self.growth["train"],
            "eval_memory_growth_bytes": self.growth["eval"],
        }

    def describe(self) -> str:
        def mib(v: int | None) -> str:
            return "unmeasured" if v is None else f"{v / 2**20:.0f} MiB"

        s = self.summary()
        whole = "CUDA reserved" if self.device.type == "cuda" else "process peak RSS"
        train, evaluation = s["train_steps_memory_growth_bytes"], s["eval_memory_growth_bytes"]
        return (
            f"training steps +{mib(train)} over {mib(self.before_training)} in use before them "
            f"(peak {mib(s['train_steps_peak_memory_bytes'])}); "
            f"evaluation +{mib(evaluation)}; {whole} {mib(s['process_peak_memory_bytes'])}"
        )


def fingerprint(module: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every tensor in ``module.state_dict()``: equal iff the weights are equal."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().numpy().tobytes()
            if tensor.dtype != torch.bfloat16
            else tensor.detach().float().cpu().numpy().tobytes()
        )
    return digest.hexdigest()[:16]


class RunningMeans:
    """Sums of per-step statistics kept on the device; ``.means()`` syncs once instead of every step."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def update(self, stats: dict[str, Tensor]) -> None:
        for key, value in stats.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.count += 1

    def means(self) -> dict[str, float]:
        return {key: value.item() / max(self.count, 1) for key, value in self.sums.items()}
