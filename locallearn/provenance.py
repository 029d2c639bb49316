"""Where and how a run was started: the record a run directory keeps in ``run.json``.

``config.yaml`` says *what* a run computes and ``summary.json`` what came out; ``run.json`` says how to start it again
and on what it ran: the exact command line, the working directory, the code's commit (and whether the checkout had
uncommitted changes), the versions of Python and of every library that changes results, the machine, and the
environment variables a distributed launch depends on. A run that is resumed appends its own start to
``starts`` instead of replacing the record, so the file tells the whole history of the directory::

    {"format": 1, "starts": [{"started": "2026-...", "command": "locallearn train ...", ...}, {...resumed...}]}

Everything here is read without importing optional packages (their versions come from the installed metadata), so
writing the record costs milliseconds.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import sys
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from locallearn.durable import atomic_write
from locallearn.version import __version__

RUN_RECORD = "run.json"

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")  # fmt: skip
"""Environment variables that decide how a (distributed) run is laid out, recorded when set."""

_REQUIRED = ("torchvision", "numpy")
_OPTIONAL = ("timm", "tensorboard")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :func:`platform.processor` says, else "cpu"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str | None]:
    """torch (as imported), locallearn, torchvision and numpy (None when absent), and the optional packages that are
    installed. Read from the package metadata, so nothing optional is imported just to name its version."""
    versions: dict[str, str | None] = {"torch": str(torch.__version__), "locallearn": __version__}
    versions.update({name: _installed(name) for name in _REQUIRED})
    versions.update({name: v for name in _OPTIONAL if (v := _installed(name)) is not None})
    return versions


def _cuda() -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    return {
        "device_count": count,
        "devices": [torch.cuda.get_device_name(i) for i in range(count)],
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def start_record(started: datetime, commit: str | None, **extra: Any) -> dict[str, Any]:
    """One start of a run as a JSON-ready dict. ``commit`` is :func:`locallearn.runner.git_commit` (``<sha>`` or
    ``<sha>-dirty``); ``extra`` adds fields the caller knows (the device, the checkpoint a resume started from)."""
    argv = list(sys.argv)
    # sys.orig_argv is the interpreter's own command line (``python -m locallearn train ...``), which sys.argv is not
    orig_argv = list(getattr(sys, "orig_argv", argv))
    return {
        "started": started.astimezone().isoformat(timespec="seconds"),
        "argv": argv,
        "command": shlex.join(argv),
        "python_command": shlex.join(orig_argv),
        "cwd": os.getcwd(),
        "git_commit": None if commit is None else commit.removesuffix("-dirty"),
        "git_dirty": None if commit is None else commit.endswith("-dirty"),
        "python": platform.python_version(),
        "executable": sys.executable,
        "versions": package_versions(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": _cuda(),
        "env": {name: os.environ[name] for name in DIST_ENV if name in os.environ},
        **extra,
    }


def write_run_record(out: Path, record: dict[str, Any], append: bool) -> Path:
    """Write ``<out>/run.json`` atomically with ``record`` as its last start. ``append`` (a resumed run, or a rerun
    into the same directory with ``--resume``) keeps the starts already recorded; otherwise the file holds this start
    alone. An unreadable old record is kept beside the new one (``run.json.corrupt``) rather than lost."""
    path = Path(out) / RUN_RECORD
    starts: list[dict[str, Any]] = []
    if append and path.is_file():
        try:
            old = json.loads(path.read_text())
            starts = list(old["starts"])
        except (OSError, ValueError, KeyError, TypeError):
            os.replace(path, path.with_name(RUN_RECORD + ".corrupt"))
    atomic_write(path, json.dumps({"format": 1, "starts": [*starts, record]}, indent=2) + "\n")
    return path
