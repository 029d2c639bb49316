"""Files that survive a crash: atomic, durable writes, and a directory of rotating checkpoints with manifests.

A write goes to a temporary file in the same directory, is flushed and ``fsync``-ed, renamed over the target with
``os.replace`` (atomic on POSIX), and the directory is ``fsync``-ed so the rename itself is on disk. A reader
therefore sees the old file or the new one, never half of one, even after a power cut.

A checkpoint is two files in ``<run>/checkpoints/``: ``step-<N>.pt`` (``torch.save``) and, written after it,
``step-<N>.json``, its manifest (SHA-256 and size of the ``.pt``, step, epoch, position). A checkpoint counts only
when its manifest exists and verifies, so one killed while writing is never taken for a complete one. Rotation deletes
the oldest complete checkpoints beyond ``keep`` (at least 2) only after the new one is complete. The finished run's
``<run>/checkpoint.pt`` (weights, config and summary; no training progress) goes through the same store and gets the
same kind of manifest, ``<run>/checkpoint.json``, so ``--resume PATH`` verifies either kind alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from locallearn.errors import CheckpointError, UserError

CHECKPOINT_DIR = "checkpoints"
FINAL_CHECKPOINT = "checkpoint.pt"
_NAME = re.compile(r"step-(\d+)\.json$")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically and durably (temporary file, fsync, rename, fsync of the directory)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` with the guarantees of :func:`atomic_write`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_keep(keep: int) -> None:
    """Rotation must keep at least two complete checkpoints: a crash while one is written leaves the other."""
    if keep < 2:
        raise UserError(f"keep_checkpoints must be at least 2, got {keep}: a crash while writing one must leave one")


@dataclass
class Found:
    """A checkpoint that verified, and those newer ones that did not (with the reason)."""

    path: Path | None
    manifest: dict[str, Any] | None
    skipped: list[tuple[str, str]]


class CheckpointStore:
    """The rotating checkpoints of one run directory."""

    def __init__(self, run_dir: Path, keep: int = 2) -> None:
        check_keep(keep)
        self.dir = Path(run_dir) / CHECKPOINT_DIR
        self.keep = keep

    def save(self, state: dict[str, Any], step: int, info: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` (data, then manifest), then delete the oldest beyond ``keep``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = _write_with_manifest(state, self.dir / f"step-{step:09d}.pt", {"step": step, **info})
        self._rotate()
        return path

    def save_final(self, state: dict[str, Any], step: int) -> Path:
        """Write the finished run's ``checkpoint.pt`` beside ``checkpoints/`` (data, then its manifest); it is never
        rotated away."""
        return _write_with_manifest(state, self.dir.parent / FINAL_CHECKPOINT, {"step": step, "final": True})

    def manifests(self) -> list[Path]:
        """Manifest paths, newest step first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def _rotate(self) -> None:
        complete = [m for m in self.manifests() if verify(m) is None]
        for manifest in complete[self.keep :]:
            data = manifest.with_suffix(".pt")
            manifest.unlink(missing_ok=True)  # the manifest first: a half-deleted checkpoint is never "complete"
            data.unlink(missing_ok=True)
        for tmp in self.dir.glob(".*.tmp"):  # left by a write that was killed
            tmp.unlink(missing_ok=True)

    def newest_valid(self) -> Found:
        """The newest checkpoint whose manifest verifies, and the newer ones skipped (name, why)."""
        skipped = []
        for manifest in self.manifests():
            problem = verify(manifest)
            if problem is None:
                return Found(manifest.with_suffix(".pt"), json.loads(manifest.read_text()), skipped)
            skipped.append((manifest.with_suffix(".pt").name, problem))
        return Found(None, None, skipped)


def _write_with_manifest(state: dict[str, Any], path: Path, info: dict[str, Any]) -> Path:
    """``state`` to ``path`` atomically, then its manifest (file name, SHA-256, size, ``info``) beside it."""
    atomic_torch_save(state, path)
    manifest = {"file": path.name, "sha256": sha256_of(path), "bytes": path.stat().st_size, **info}
    atomic_write(path.with_suffix(".json"), json.dumps(manifest, indent=1) + "\n")
    return path


def verify(manifest_path: Path) -> str | None:
    """None when the checkpoint of ``manifest_path`` is complete and intact, else why not."""
    try:
        manifest = json.loads(Path(manifest_path).read_text())
    except (OSError, ValueError):
        return "its manifest is unreadable"
    data = Path(manifest_path).with_name(str(manifest.get("file", "")))
    if not data.is_file():
        return f"{data.name} is missing"
    size = data.stat().st_size
    if size != manifest.get("bytes"):
        return f"{data.name} has {size} bytes, its manifest says {manifest.get('bytes')} (truncated?)"
    if sha256_of(data) != manifest.get("sha256"):
        return f"{data.name} does not match its manifest's SHA-256 (damaged)"
    return None


def resolve_resume(resume: str, run_dir: Path, log) -> Path | None:
    """The checkpoint ``--resume`` names: "auto" (the newest that verifies in ``run_dir``, or None for a fresh run)
    or a path (an error if it does not exist or, with a manifest beside it, does not verify)."""
    if resume == "auto":
        found = CheckpointStore(run_dir).newest_valid()
        for name, why in found.skipped:
            log.warning("resume: skipped checkpoint %s: %s", name, why)
        if found.path is None:
            log.info("resume: no complete checkpoint in %s: starting a fresh run", Path(run_dir) / CHECKPOINT_DIR)
            return None
        log.info("resume: taking %s (step %d)", found.path, found.manifest["step"])
        return found.path
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such file: pass a checkpoint's .pt, or --resume auto")
    manifest = path.with_suffix(".json")
    if manifest.is_file():
        problem = verify(manifest)
        if problem is not None:
            raise CheckpointError(
                f"--resume {path} does not verify: {problem}; pass another checkpoint or --resume auto"
            )
    return path
