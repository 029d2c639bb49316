"""What a run's configuration means for its result: the fields that decide what it computes, apart from the ones
that only say where and how it ran. ``locallearn train --resume`` (:mod:`locallearn.runner`), ``locallearn sweep``
(is this run directory the grid's configuration?) and ``locallearn report`` (which runs are the same configuration)
all ask this one question."""

from __future__ import annotations

import copy
from typing import Any

from locallearn.config import RunConfig

RESUMABLE_DIFFERENCES = {
    "train.resume", "train.out", "train.overwrite", "train.progress", "train.checkpoint_every",
    "train.keep_checkpoints", "train.device", "train.malloc_mmap_threshold", "data.data_dir", "data.workers",
    "data.download", "dist.timeout_s", "train.tensorboard", "train.log_every",
}  # fmt: skip
"""Config fields a resumed run may change: where and how it runs, not what it computes."""


def with_defaults(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """``cfg_dict`` (a ``RunConfig.to_dict()`` as a run wrote it) with every field it lacks at its default: a run
    written before a field existed computed what that field's default computes."""
    full = RunConfig().to_dict()
    out = copy.deepcopy(cfg_dict)
    for section, defaults in full.items():
        if isinstance(defaults, dict) and section != "method" and isinstance(out.get(section), dict):
            for key, value in defaults.items():
                out[section].setdefault(key, value)
    return out


def result_view(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The config without the fields that say where and how a run ran (:data:`RESUMABLE_DIFFERENCES`: out, resume,
    device, checkpointing cadence, logging, …), missing fields at their defaults: what decides its result."""
    view = with_defaults(cfg_dict)
    for dotted in RESUMABLE_DIFFERENCES:
        section, _, key = dotted.partition(".")
        view.get(section, {}).pop(key, None)
    return view


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``section.key: checkpoint A, now B`` for every field that decides the result and differs between a saved
    config and the current one (a field the saved one lacks counts as its default)."""
    a_all, b_all = result_view(saved), result_view(current)
    diffs = []
    for section in sorted(set(a_all) | set(b_all)):
        a, b = a_all.get(section), b_all.get(section)
        if a is None and section == "dist":
            continue  # written before the section existed: a single-process run
        if not isinstance(a, dict) or not isinstance(b, dict):
            if a != b:
                diffs.append(f"{section}: checkpoint {a!r}, now {b!r}")
            continue
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: checkpoint {saved.get(section, {}).get(key)!r}, now {b.get(key)!r}")
    return diffs
