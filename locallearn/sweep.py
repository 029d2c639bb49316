"""``locallearn sweep GRID.yaml --out DIR``: a user-defined grid of runs, one after another, that resumes when stopped.

A grid file says what every run shares and what varies::

    # sweep over methods and K on a small Fashion-MNIST subset, two seeds each
    base: [fashion_mnist]              # presets or YAML files, applied in order (optional)
    set:                               # fields every run shares (dotted names, as --section.key=value)
      data.limit_train: 2000
      train.epochs: 2
    grid:                              # every combination of these values ...
      train.method: [e2e, dgl, dgl+man]
      train.K: [1, 4]
    exclude:                           # ... less the combinations that match one of these
      - {train.method: e2e, train.K: 4}
    seeds: [0, 1]                      # each configuration once per seed (train.seed; omitted: its own seed)

A field's value replaces the base's; ``method: {...}`` replaces the whole set of method options (``method: {}``
clears them) and ``method.NAME: value`` sets one. Instead of (or crossed with) ``grid``, ``runs`` lists named
configurations, each with its own ``base`` and ``set``
(how ``locallearn compare``'s suites are written: :func:`locallearn.compare.suite_grid`).

Every run is its own ``locallearn train`` process (so its peak memory is its own, and a crash ends only that run)
with its resolved config written to ``DIR/configs/<run>.yaml`` and its output in ``DIR/runs/<run>/``; its log goes to
``DIR/logs/<run>.log``. A run whose ``summary.json`` is there (for the same configuration) is skipped, and a run that
was stopped part-way continues from its newest checkpoint (``--resume auto``), so a killed sweep, started again with
the same command, redoes nothing it finished. A run whose directory holds a *different* configuration (the grid was
edited) is an error naming it, never overwritten. When several GPUs are visible, ``--jobs`` (default: one per GPU)
runs that many at once, one per GPU. The sweep ends by writing ``DIR/report.md`` (:mod:`locallearn.report`).
"""

from __future__ import annotations

import copy
import fcntl
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from locallearn.config import RunConfig, load_yaml, set_field, validate
from locallearn.durable import atomic_write
from locallearn.errors import UserError
from locallearn.report import write_report
from locallearn.results import result_view

log = logging.getLogger("locallearn")

GRID_KEYS = {"base", "set", "grid", "exclude", "seeds", "runs", "name"}


@dataclass
class Entry:
    """One named configuration of ``runs`` (or the single unnamed one when the grid has no ``runs``)."""

    name: str | None
    base: list[str] = field(default_factory=list)
    set: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # carried into results (e.g. compare's published figure)


@dataclass
class Grid:
    """A parsed grid file (module docstring)."""

    base: list[str] = field(default_factory=list)
    set: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    exclude: list[dict[str, Any]] = field(default_factory=list)
    seeds: list[int] | None = None  # None: each configuration once, at its own train.seed (a preset's, else 0)
    runs: list[Entry] = field(default_factory=list)
    source: str = "grid"


@dataclass
class Trial:
    """One run of the sweep: a configuration at one seed."""

    name: str  # the directory name under runs/ (unique in the sweep)
    label: str  # the configuration, without the seed (the report's grouping)
    seed: int
    cfg: RunConfig
    meta: dict[str, Any] = field(default_factory=dict)


def _as_list(value: Any, what: str, source: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [value]
    if not isinstance(value, list):
        raise UserError(f"{source}: {what} must be a list, got {type(value).__name__}")
    return value


def _as_mapping(value: Any, what: str, source: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{source}: {what} must be a mapping of field: value (e.g. train.epochs: 2)")
    return _flatten(value)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{train: {epochs: 2}}`` and ``{train.epochs: 2}`` alike → ``{"train.epochs": 2}``; ``method`` and
    ``model.kwargs`` stay dicts below their section (they are free mappings)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and "." not in dotted and dotted != "method":
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def parse_grid(tree: Any, source: str) -> Grid:
    """A :class:`Grid` from a parsed grid file, with every error naming the file and the key."""
    if not isinstance(tree, dict):
        raise UserError(f"{source}: a grid file holds a mapping with base, set, grid, exclude, seeds or runs")
    unknown = sorted(set(tree) - GRID_KEYS)
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(unknown)}: a grid has {', '.join(sorted(GRID_KEYS))}")
    grid = Grid(source=source)
    grid.base = [str(b) for b in _as_list(tree.get("base"), "base", source)]
    grid.set = _as_mapping(tree.get("set"), "set", source)
    axes = _as_mapping(tree.get("grid"), "grid", source)
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{source}: grid.{key} must be a non-empty list of values, e.g. [1, 4]")
    grid.grid = axes
    for rule in _as_list(tree.get("exclude"), "exclude", source):
        if not isinstance(rule, dict) or not rule:
            raise UserError(f"{source}: every exclude entry is a mapping of grid fields, e.g. {{train.K: 4}}")
        rule = _flatten(rule)
        stray = sorted(set(rule) - set(axes))
        if stray:
            raise UserError(f"{source}: exclude names {', '.join(stray)}, which the grid does not vary")
        grid.exclude.append(rule)
    seeds = _as_list(tree.get("seeds"), "seeds", source) if "seeds" in tree else None
    if seeds is None:
        pass  # each configuration at its own seed: a preset that fixes one (AugLocal's 1234) keeps it
    elif not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise UserError(f"{source}: seeds must be a list of non-negative integers, e.g. [0, 1]")
    elif len(set(seeds)) < len(seeds):
        raise UserError(f"{source}: seeds {seeds} repeat a seed")
    grid.seeds = seeds
    for i, run in enumerate(_as_list(tree.get("runs"), "runs", source)):
        if not isinstance(run, dict) or not isinstance(run.get("name"), str):
            raise UserError(f"{source}: runs[{i}] must be a mapping with a name (and base / set)")
        extra = sorted(set(run) - {"name", "base", "set"})
        if extra:
            raise UserError(f"{source}: runs[{i}] has unknown key(s) {', '.join(extra)}: use name, base, set")
        grid.runs.append(
            Entry(
                run["name"],
                [str(b) for b in _as_list(run.get("base"), "base", source)],
                _as_mapping(run.get("set"), f"runs[{i}].set", source),
            )  # fmt: skip
        )
    if len({r.name for r in grid.runs}) < len(grid.runs):
        raise UserError(f"{source}: two runs share a name; give each configuration its own")
    return grid


GRID_DIR = Path(__file__).resolve().parent / "grids"


def grid_names() -> list[str]:
    """Packaged grids (``locallearn/grids/<name>.yaml``), by name."""
    return sorted(p.stem for p in GRID_DIR.glob("*.yaml"))


def _grid_title(source: str) -> str:
    """A packaged grid by its name (the install path says nothing to a reader), any other grid by its path."""
    path = Path(source)
    return f"{path.stem} (packaged grid)" if path.parent == GRID_DIR else source


def load_grid(path: str | Path) -> Grid:
    """Read a grid file: a path, or the name of a packaged grid (:func:`grid_names`)."""
    path = Path(path)
    if not path.is_file():
        packaged = GRID_DIR / f"{path}.yaml"
        if not packaged.is_file():
            raise UserError(
                f"grid file {path} not found: pass the path of a YAML grid, or a packaged grid "
                f"({', '.join(grid_names()) or 'none'}; see `locallearn sweep --help`)"
            )
        path = packaged
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"grid file {path} is not valid YAML ({err.__class__.__name__}): fix its syntax") from None
    return parse_grid(tree, str(path))


def _value_text(value: Any) -> str:
    return str(value) if not isinstance(value, float) else f"{value:g}"


def _part(key: str, value: Any) -> str:
    """A grid value in a label: the method bare, every other field as ``name=value`` (e.g. ``dgl+man, K=4``)."""
    return _value_text(value) if key == "train.method" else f"{key.split('.')[-1]}={_value_text(value)}"


def _slug(text: str) -> str:
    return re.sub(r"-+", "-", "".join(c if c.isalnum() or c in "+.=" else "-" for c in text)).strip("-")[:80]


def _resolve(grid: Grid, entry: Entry, combo: dict[str, Any]) -> RunConfig:
    """The configuration of one (entry, grid combination): the defaults, then the bases, then the set fields."""
    cfg = RunConfig()
    for base in [*grid.base, *entry.base]:
        load_yaml(cfg, base)
    for key, value in {**grid.set, **entry.set, **combo}.items():
        _set(cfg, key, value, grid.source)
    return cfg


def expand(grid: Grid) -> list[Trial]:
    """Every (entry × grid combination − excluded) × seed (the grid's seeds, else each configuration's own), each
    with its resolved and validated config."""
    entries = grid.runs or [Entry(None)]
    keys = list(grid.grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(grid.grid[k] for k in keys))]
    combos = [c for c in combos if not any(all(c[k] == v for k, v in rule.items()) for rule in grid.exclude)]
    if not combos:
        raise UserError(f"{grid.source}: exclude leaves no configuration to run")
    trials: list[Trial] = []
    for entry, combo in itertools.product(entries, combos):
        parts = ([entry.name] if entry.name else []) + [_part(k, v) for k, v in combo.items()]
        label = ", ".join(parts) or "run"
        seeds = grid.seeds if grid.seeds is not None else [_resolve(grid, entry, combo).train.seed]
        for seed in seeds:
            cfg = _resolve(grid, entry, combo)
            cfg.train.seed = seed
            validate(cfg)
            trials.append(Trial(_slug(f"{label}-s{seed}"), label, seed, cfg, dict(entry.meta)))
    names = [t.name for t in trials]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise UserError(f"{grid.source}: configurations give the same run name ({', '.join(clash)}): rename them")
    return trials


def _set(cfg: RunConfig, key: str, value: Any, source: str) -> None:
    if key == "method":
        if not isinstance(value, dict):
            raise UserError(f"{source}: method must be a mapping of method options")
        cfg.method = dict(value)  # the whole option set (``{}`` clears a base's options, e.g. for --method e2e)
        return
    if key.startswith("method."):
        cfg.method = {**cfg.method, key.split(".", 1)[1]: value}
        return
    if key == "train.seed":
        raise UserError(f"{source}: set the seeds with `seeds: [...]`, not train.seed")
    try:
        set_field(cfg, key, value)
    except UserError as err:
        raise UserError(f"{source}: {err}") from None


# -- running ---------------------------------------------------------------------------------------------------------
def _finished(trial: Trial, run_dir: Path) -> bool:
    """True when ``run_dir`` holds this trial's finished run; an error when it holds another configuration's."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return False
    try:
        theirs = yaml.safe_load(config.read_text())
    except yaml.YAMLError:
        theirs = None
    if not isinstance(theirs, dict) or result_view(theirs) != result_view(trial.cfg.to_dict()):
        raise UserError(
            f"{run_dir} holds a run of a different configuration than the grid's {trial.label} (seed {trial.seed}): "
            "the grid changed since it ran; sweep into a new --out, or delete that run directory to redo it"
        )
    return (run_dir / "summary.json").is_file()


def _child_preexec() -> None:  # pragma: no cover - runs in the child
    """The run gets SIGTERM when the sweep dies, even by SIGKILL (Linux), so it checkpoints and stops instead of
    running on beside the next sweep started on the same --out."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no CUDA runtime: a CPU sweep
        return 0


class _Lock:
    """One sweep per --out at a time (an advisory lock on ``DIR/.sweep.lock``, released when the process ends)."""

    def __init__(self, out: Path) -> None:
        self.file = open(out / ".sweep.lock", "a+")  # noqa: SIM115 - held for the sweep's lifetime
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another sweep is running into {out} now: wait for it, or use another --out") from None

    def release(self) -> None:
        self.file.close()


def run_trial(trial: Trial, out: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run (or continue) one trial as ``python -m locallearn train --config DIR/configs/<name>.yaml`` and return its
    summary. Raises :class:`UserError` when the run fails, naming its log."""
    run_dir, config, log_path = out / "runs" / trial.name, out / "configs" / f"{trial.name}.yaml", out / "logs"
    cfg = copy.deepcopy(trial.cfg)
    cfg.train.out, cfg.train.resume, cfg.train.progress = str(run_dir), "auto", False
    config.parent.mkdir(parents=True, exist_ok=True)
    log_path.mkdir(parents=True, exist_ok=True)
    atomic_write(config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    argv = [sys.executable, "-m", "locallearn", "train", "--config", str(config)]
    log_file = log_path / f"{trial.name}.log"
    with open(log_file, "a") as sink:
        sink.write(f"$ {' '.join(argv)}\n")
        sink.flush()
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env, preexec_fn=_child_preexec)
        try:
            code = proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGTERM)  # the run saves a checkpoint and stops; the next sweep continues it
            proc.wait()
            raise
    if code != 0:
        raise UserError(
            f"run {trial.name} failed (exit {code}); its log: {log_file}. Fix the cause and run the same sweep "
            "command again: finished runs are kept, this one continues from its last checkpoint"
        )
    return json.loads((run_dir / "summary.json").read_text())


def sweep(grid: Grid, out: Path, jobs: int | None = None, report: bool = True) -> list[dict[str, Any]]:
    """Run every trial of ``grid`` into ``out`` (skipping finished ones) and return their summaries in grid order,
    each with ``row`` (the configuration's label), ``seed`` and the entry's ``meta``. Writes ``out/results.json``
    after every run and, with ``report``, ``out/report.md``."""
    trials = expand(grid)
    out.mkdir(parents=True, exist_ok=True)
    lock = _Lock(out)
    try:
        atomic_write(out / "grid.json", json.dumps({"source": grid.source, "trials": [
            {"name": t.name, "label": t.label, "seed": t.seed} for t in trials]}, indent=1))  # fmt: skip
        todo = [t for t in trials if not _finished(t, out / "runs" / t.name)]
        log.info("sweep %s: %d runs, %d finished already, %d to run", out, len(trials), len(trials) - len(todo),
                 len(todo))  # fmt: skip
        gpus = _gpus()
        jobs = jobs or max(gpus, 1)
        if jobs > 1 and gpus < jobs:
            raise UserError(f"--jobs {jobs} runs one run per GPU, and {gpus} GPU(s) are visible: pass --jobs 1")
        _run_all(todo, out, jobs)
        results = []
        for trial in trials:
            summary = json.loads((out / "runs" / trial.name / "summary.json").read_text())
            results.append({"row": trial.label, **trial.meta, **summary, "seed": trial.seed, "run": trial.name})
        atomic_write(out / "results.json", json.dumps(results, indent=1))
    finally:
        lock.release()
    if report:
        write_report([out / "runs" / t.name for t in trials], out, title=f"Sweep {_grid_title(grid.source)}")
    return results


def _run_all(todo: list[Trial], out: Path, jobs: int) -> None:
    """Run ``todo`` in order; with ``jobs`` > 1 (one per GPU) that many at once, each pinned to its GPU."""
    if jobs == 1:
        for i, trial in enumerate(todo, start=1):
            log.info("[%d/%d] %s (seed %d) → %s", i, len(todo), trial.label, trial.seed, out / "runs" / trial.name)
            start = time.perf_counter()
            summary = run_trial(trial, out, dict(os.environ))
            log.info("  test accuracy %.4f in %.0f s", summary["test_accuracy"] or 0.0, time.perf_counter() - start)
        return
    queue = list(todo)
    errors: list[BaseException] = []
    guard = threading.Lock()

    def worker(gpu: int) -> None:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
        while True:
            with guard:
                if not queue or errors:
                    return
                trial = queue.pop(0)
            log.info("GPU %d: %s (seed %d)", gpu, trial.label, trial.seed)
            try:
                run_trial(trial, out, env)
            except BaseException as err:  # noqa: BLE001 - reported after the other workers stop
                with guard:
                    errors.append(err)

    threads = [threading.Thread(target=worker, args=(g,), daemon=True) for g in range(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
