"""``locallearn report RUN_DIR… [-o DIR]``: a markdown report with plots from any set of run directories.

A run directory is what ``locallearn train`` writes (``config.yaml``, ``metrics.jsonl``, ``summary.json``); a
directory that holds run directories below it (a sweep's ``--out``, a ``compare`` output) stands for all of them.
Runs are grouped into configurations by their resolved config less the seed and the fields that only say where they
ran (:func:`locallearn.results.result_view`); a configuration's label names the fields that differ between the
configurations of the report (the method first), so any set of runs gets readable labels without naming them.

The report (``report.md`` and PNGs in ``-o``, the table also printed):

* ``accuracy_per_epoch.png`` — test accuracy against epoch, one line per configuration (mean over seeds, band ±1 sd),
  E2E dashed;
* ``block_accuracy.png`` — each block's auxiliary-head test accuracy after the last epoch against block index (mean,
  ±1 sd bars): how separability grows through the network; E2E's final accuracy as a reference line;
* ``accuracy_vs_memory.png`` — final test accuracy against the training steps' memory (the process peak for runs
  that did not measure it);
* a table: test accuracy mean ± sd over seeds, per seed, peak memory, throughput; and for every base method B with a
  B+MAN configuration equal in all else, the share of B's gap to E2E that MAN closes,
  (acc(B+MAN) − acc(B)) / (acc(E2E) − acc(B)), as the MAN paper reports it.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from locallearn.durable import atomic_write
from locallearn.errors import UserError
from locallearn.results import result_view

log = logging.getLogger("locallearn")

PLOT_SIZE = (9.0, 4.5)  # inches; at PLOT_DPI: 1080 × 540 pixels (the legend sits right of the axes)
PLOT_DPI = 120


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    epochs: list[dict[str, Any]]
    label: str | None = None  # the configuration's label in the sweep that made the run (its grid.json), if any
    machine: str = "?"
    exits: dict[str, Any] | None = None  # exits.json beside the checkpoint (locallearn exits), if calibrated

    @property
    def seed(self) -> int:
        return int(self.config["train"]["seed"])

    @property
    def method(self) -> str:
        return str(self.config["train"]["method"])


@dataclass
class Group:
    """The runs of one configuration (its seeds)."""

    view: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    label: str = ""

    @property
    def method(self) -> str:
        return self.runs[0].method

    def final(self) -> list[float]:
        return [r.summary["test_accuracy"] for r in self.runs if r.summary.get("test_accuracy") is not None]


def find_runs(paths: list[Path]) -> list[Path]:
    """The run directories at or below ``paths`` (a directory with ``summary.json``), in a stable order: a sweep's
    runs in its grid's order (its ``grid.json``), any others by path."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise UserError(f"{path} is not a directory: give run directories or a sweep's --out")
        if (path / "summary.json").is_file():
            found.append(path)
            continue
        below = sorted(p.parent for p in path.rglob("summary.json") if (p.parent / "config.yaml").is_file())
        if not below:
            raise UserError(f"{path} holds no finished run (no summary.json at or below it): has it finished?")
        found += sorted(below, key=_grid_order(path))
    return list(dict.fromkeys(found))


def _grid_order(sweep_out: Path):
    """A sort key putting a sweep's runs (``sweep_out/runs/<name>``) in the order its grid.json lists them."""
    try:
        trials = json.loads((sweep_out / "grid.json").read_text())["trials"]
        index = {(sweep_out / "runs" / t["name"]).resolve(): i for i, t in enumerate(trials)}
    except (OSError, ValueError, KeyError, TypeError):  # not a sweep (or an unreadable grid.json): by path
        index = {}
    return lambda run: (index.get(run.resolve(), len(index)), str(run))


def load_run(path: Path) -> Run:
    try:
        summary = json.loads((path / "summary.json").read_text())
        config = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise UserError(f"{path}: cannot read summary.json / config.yaml ({err}): is it a locallearn run?") from None
    epochs = []
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        epochs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    exits = json.loads((path / "exits.json").read_text()) if (path / "exits.json").is_file() else None
    return Run(path, config, summary, epochs, _sweep_label(path), _machine(path, summary), exits)


def _machine(path: Path, summary: dict[str, Any]) -> str:
    """The device a run trained on, with the CPU's name and cores from its ``run.json`` when it has one."""
    device = str(summary.get("device_name", "?"))
    try:
        start = json.loads((path / "run.json").read_text())["starts"][-1]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return device
    if device == "cpu" and start.get("cpu"):
        return f"{start['cpu']} ({start.get('cpu_count', '?')} cores, {start.get('torch_threads', '?')} threads)"
    return device


def _sweep_label(path: Path) -> str | None:
    """A sweep writes ``grid.json`` beside ``runs/``: the label it gave this run's configuration."""
    grid = path.parent.parent / "grid.json"
    if path.parent.name != "runs" or not grid.is_file():
        return None
    try:
        trials = json.loads(grid.read_text())["trials"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return next((t.get("label") for t in trials if isinstance(t, dict) and t.get("name") == path.name), None)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and prefix.count(".") < 1:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs with the same config but the seed, in first-seen order, labelled by what tells them apart."""
    groups: list[Group] = []
    for run in runs:
        view = result_view(run.config)
        view["train"].pop("seed", None)
        for group in groups:
            if group.view == view:
                group.runs.append(run)
                break
        else:
            groups.append(Group(view, [run]))
    flats = [_flat(g.view) for g in groups]
    keys = sorted({k for f in flats for k in f})
    varying = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
    varying.sort(key=lambda k: (k != "train.method", k))
    for group, flat in zip(groups, flats):
        group.label = _derived_label(flat, varying)
        named = {r.label for r in group.runs}
        if len(named) == 1 and None not in named:  # the sweep's own name for it (e.g. a compare row)
            group.label = named.pop()
    if len({g.label for g in groups}) < len(groups):  # two sweeps used one name: the derived labels then
        for group, flat in zip(groups, flats):
            group.label = _derived_label(flat, varying)
    return groups


def _derived_label(flat: dict[str, Any], varying: list[str]) -> str:
    """The method bare, then ``name=value`` for every other field that differs between the report's configurations
    and that this configuration sets (a method option it leaves at its default is not named)."""
    parts = [f"{k.split('.')[-1]}={_text(flat[k])}" for k in varying if k in flat and k != "train.method"]
    return ", ".join([str(flat.get("train.method", "?")), *parts])


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ",".join(f"{k}:{_text(v)}" for k, v in value.items()) or "{}"
    return str(value)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt_acc(values: list[float]) -> str:
    if not values:
        return "–"
    mean, sd = _mean_sd([100 * v for v in values])
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {sd:.2f}"


def _e2e_for(group: Group, groups: list[Group]) -> Group | None:
    """The E2E configuration to compare ``group`` with: the E2E group that shares the most fields with it."""
    candidates = [g for g in groups if g.method == "e2e" and g.final()]
    if not candidates:
        return None
    mine = _flat(group.view)
    return max(candidates, key=lambda g: sum(_flat(g.view).get(k) == v for k, v in mine.items()))


def gap_closed(groups: list[Group]) -> list[str]:
    """For every B+MAN configuration whose config equals a B configuration's but for the method: the share of B's gap
    to E2E that MAN closes, on the seed means and per seed (seeds that all three have)."""
    lines = []
    for man in groups:
        if not man.method.endswith("+man") or not man.final():
            continue
        base_method = man.method.removesuffix("+man")
        want = json.loads(json.dumps(man.view))
        want["train"]["method"] = base_method
        base = next((g for g in groups if g.view == want and g.final()), None)
        e2e = _e2e_for(man, groups)
        if base is None or e2e is None:
            continue
        accs = [{r.seed: r.summary["test_accuracy"] for r in g.runs} for g in (e2e, base, man)]
        seeds = sorted(set(accs[0]) & set(accs[1]) & set(accs[2]))
        if not seeds:
            continue
        e, b, m = (statistics.mean(a[s] for s in seeds) for a in accs)
        per_seed = ", ".join(_share(accs[0][s], accs[1][s], accs[2][s]) for s in seeds)
        lines.append(
            f"- **{man.label}** closes {_share(e, b, m)} of **{base.label}**'s gap to **{e2e.label}** "
            f"({100 * b:.2f} → {100 * m:.2f} % against {100 * e:.2f} %; seeds {seeds}; per seed: {per_seed})."
        )
    return lines


def _share(e2e: float, base: float, man: float) -> str:
    return f"{100 * (man - base) / (e2e - base):.0f} %" if e2e != base else "– (no gap)"


def _train_memory(g: Group) -> list[float] | None:
    """What the training steps alone took per run, in MiB (``summary.json``'s ``train_steps_memory_growth_bytes``:
    RSS growth over the memory in use before the first step on CPU, the CUDA peak's growth on a GPU), or None when a
    run did not measure it (older runs): the figure local learning reduces, which the process peak (model, data,
    evaluation and the interpreter included) hides."""
    values = [r.summary.get("train_steps_memory_growth_bytes") for r in g.runs]
    return None if any(v is None for v in values) else [v / 2**20 for v in values]


def _top5(g: Group) -> list[float]:
    return [v for r in g.runs if (v := r.summary.get("test_top5_accuracy")) is not None]


def table(groups: list[Group]) -> str:
    """The markdown table; a top-5 column when an ImageNet run is among them (its papers report top-5 error too; on
    10-class data top-5 is close to 100 % and says nothing)."""
    top5 = any(r.summary.get("dataset") == "imagenet" and _top5(g) for g in groups for r in g.runs)
    lines = [
        "| configuration | blocks | seeds | test acc % (mean ± sd) | per seed | "
        + ("top-5 % | " if top5 else "")
        + "best epoch % | peak memory MiB | training steps MiB | train img/s | wall min |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if top5 else ""),
    ]
    for g in groups:
        accs = g.final()
        best = [r.summary.get("best_test_accuracy") for r in g.runs if r.summary.get("best_test_accuracy") is not None]
        peak = max((r.summary.get("peak_memory_bytes") or 0) for r in g.runs) / 2**20
        steps = _train_memory(g)
        rate = statistics.mean(r.summary.get("images_per_second") or 0.0 for r in g.runs)
        wall = statistics.mean(r.summary.get("wall_seconds") or 0.0 for r in g.runs) / 60
        lines.append(
            f"| {g.label} | {g.runs[0].summary.get('K', '?')} | {len(g.runs)} | {fmt_acc(accs)} "
            f"| {' / '.join(f'{100 * a:.2f}' for a in accs) or '–'} | "
            + (f"{fmt_acc(_top5(g))} | " if top5 else "")
            + f"{fmt_acc(best)} | {peak:.0f} "
            f"| {'–' if steps is None else f'{max(steps):.0f}'} | {rate:.0f} "
            f"| {wall:.1f} |"
        )
    return "\n".join(lines)


# -- plots -------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (servers, CI)
    import matplotlib.pyplot as plt

    return plt


def _style(group: Group, index: int) -> dict[str, Any]:
    if group.method == "e2e":
        return {"color": "black", "linestyle": "--", "linewidth": 2}
    return {"color": f"C{index % 10}", "linestyle": "-", "linewidth": 1.6}


def holdout_warning(runs: list[Run]) -> list[str]:
    """A line naming the runs that evaluated on a held-out part of the training set (``--holdout``), so their
    "test" figures are not read as test figures; empty when every run read the test set."""
    held = [r for r in runs if r.summary.get("evaluated_on", "test") != "test"]
    if not held:
        return []
    names = ", ".join(f"`{r.path}`" for r in held)
    return [
        f"**Validation, not test**: {len(held)} of {len(runs)} runs evaluated on a held-out part of their training "
        f"set (`--holdout`), so their 'test' figures are validation figures: {names}.",
        "",
    ]


def plot_accuracy_per_epoch(groups: list[Group], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=PLOT_SIZE)
    for i, g in enumerate(groups):
        curves = [[row["test_accuracy"] for row in r.epochs] for r in g.runs if r.epochs]
        if not curves:
            continue
        n = min(len(c) for c in curves)  # epochs that every seed has
        means = [statistics.mean(100 * c[e] for c in curves) for e in range(n)]
        sds = [statistics.stdev([100 * c[e] for c in curves]) if len(curves) > 1 else 0.0 for e in range(n)]
        x = list(range(1, n + 1))
        style = _style(g, i)
        ax.plot(x, means, marker="o", markersize=3, label=f"{g.label} (n={len(curves)})", **style)
        if len(curves) > 1:
            ax.fill_between(x, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)],
                            color=style["color"], alpha=0.15, linewidth=0)  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy per epoch (mean over seeds, band ±1 sd)")
    ax.grid(alpha=0.3)
    _finish(ax, integer_x=True)
    _save(fig, path)


def plot_block_accuracy(groups: list[Group], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=PLOT_SIZE)
    for i, g in enumerate(groups):
        rows = [r.summary.get("block_accuracies") or [] for r in g.runs]
        rows = [row for row in rows if row]
        if g.method == "e2e":
            if g.final():
                ax.axhline(100 * statistics.mean(g.final()), label=f"{g.label} (final)", **_style(g, i))
            continue
        if not rows:
            continue
        k = min(len(row) for row in rows)
        xs, means, sds = [], [], []
        for b in range(k):
            values = [100 * row[b] for row in rows if row[b] is not None]
            if values:
                xs.append(b + 1)
                means.append(statistics.mean(values))
                sds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        if xs:
            ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=g.label, **_style(g, i))
    ax.set_xlabel("block (1 = nearest the input)")
    ax.set_ylabel("head test accuracy after the last epoch (%)")
    ax.set_title("Auxiliary-head accuracy through the network (mean over seeds, ±1 sd)")
    ax.grid(alpha=0.3)
    _finish(ax, integer_x=True)
    _save(fig, path)


def plot_accuracy_vs_memory(groups: list[Group], path: Path) -> None:
    """Final accuracy against the training steps' memory where every run measured it, else the runs' peaks."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=PLOT_SIZE)
    steps = {id(g): _train_memory(g) for g in groups}
    use_steps = all(v is not None for v in steps.values())
    kinds = set()
    for i, g in enumerate(groups):
        accs = [100 * a for a in g.final()]
        if use_steps:
            memory = steps[id(g)]
        else:
            memory = [(r.summary.get("peak_memory_bytes") or 0) / 2**20 for r in g.runs]
        kinds |= {r.summary.get("peak_memory_kind") for r in g.runs}
        if not accs:
            continue
        mean, sd = _mean_sd(accs)
        style = _style(g, i)
        ax.errorbar([statistics.mean(memory)], [mean], yerr=[sd], marker="D" if g.method == "e2e" else "o",
                    capsize=3, color=style["color"], linestyle="none", label=g.label)  # fmt: skip
    kind = ", ".join(sorted(str(k) for k in kinds if k)) or "peak memory"
    if use_steps:
        ax.set_xlabel(f"training steps' memory (MiB, mean over seeds; growth of {kind} over what was in use before)")
    else:
        ax.set_xlabel(f"peak memory (MiB, mean over seeds; {kind})")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("Accuracy against memory (mean over seeds, ±1 sd)")
    ax.grid(alpha=0.3)
    _finish(ax, integer_x=False)
    _save(fig, path)


def plot_accuracy_vs_compute(runs: list[Run], groups: list[Group], path: Path) -> None:
    """Each calibrated run's held-out accuracy against multiply-accumulates per image over the thresholds
    (``locallearn exits``), its full network (a diamond) and the chosen threshold on the test set (a star)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=PLOT_SIZE)
    for i, run in enumerate(r for r in runs if r.exits):
        curve, full, chosen = run.exits["curve_holdout"], run.exits["full_network"], run.exits["chosen"]
        color = f"C{i % 10}"
        label = f"{label_of(run, groups)}, seed {run.seed}"
        ax.plot([c["macs_per_image"] / 1e6 for c in curve], [100 * c["accuracy"] for c in curve], "o-", ms=3,
                color=color, label=f"{label}: held-out, over thresholds")  # fmt: skip
        ax.plot([full["macs_per_image"] / 1e6], [100 * full["test_accuracy"]], "D", color=color)
        ax.plot([chosen["test_macs_per_image"] / 1e6], [100 * chosen["test_accuracy"]], "*", ms=12, color=color,
                label=f"{label}: threshold {chosen['threshold']} on the test set")  # fmt: skip
    ax.set_xlabel("multiply-accumulates per image (M; the blocks and heads each sample ran)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Early exits: accuracy against compute (diamonds: full networks, test)")
    ax.grid(alpha=0.3)
    _finish(ax, integer_x=False)
    _save(fig, path)


def _finish(ax, integer_x: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    if integer_x:  # epochs and block indices
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.tight_layout()
    fig.savefig(tmp, dpi=PLOT_DPI, format="png")
    _pyplot().close(fig)
    tmp.replace(path)


# -- the report --------------------------------------------------------------------------------------------------
PLOTS = {
    "accuracy_per_epoch.png": plot_accuracy_per_epoch,
    "block_accuracy.png": plot_block_accuracy,
    "accuracy_vs_memory.png": plot_accuracy_vs_memory,
}


def write_report(paths: list[Path], out: Path, title: str = "locallearn report", command: str | None = None) -> str:
    """Read the runs at or below ``paths``, write ``out/report.md`` and its PNGs, and return the markdown."""
    runs = [load_run(p) for p in find_runs(paths)]
    groups = group_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    for name, plot in PLOTS.items():
        plot(groups, out / name)
    calibrated = [r for r in runs if r.exits]
    if calibrated:
        plot_accuracy_vs_compute(runs, groups, out / "accuracy_vs_compute.png")
    exits_section = [
        "## Early exits: accuracy against compute",
        "",
        "![accuracy against compute](accuracy_vs_compute.png)",
        "",
        *[
            f"- `{r.path}`: threshold {r.exits['chosen']['threshold']} (chosen on {r.exits['holdout']} held-out "
            f"training examples) gives {100 * r.exits['chosen']['test_accuracy']:.2f} % on the test set at "
            f"{r.exits['chosen']['test_macs_per_image'] / 1e6:.2f} M MACs per image, against the network's "
            f"{100 * r.exits['full_network']['test_accuracy']:.2f} % at "
            f"{r.exits['full_network']['macs_per_image'] / 1e6:.2f} M"
            for r in calibrated
        ],
        "",
    ] if calibrated else []  # fmt: skip
    first = runs[0].summary
    devices = sorted({r.machine for r in runs})
    commits = sorted({str(r.summary.get("git_commit") or "unknown")[:12] for r in runs})
    effect = gap_closed(groups)
    data = {(r.config["data"]["name"], r.config["model"]["arch"]) for r in runs}
    lines = [
        f"# {title}",
        "",
        *([f"Command: `{command}`", ""] if command else []),
        f"{len(runs)} runs in {len(groups)} configurations; "
        + "; ".join(f"{name} on {arch}" for name, arch in sorted(data))
        + f". Device: {', '.join(devices)}; torch {first.get('torch', '?')}; git {', '.join(commits)}.",
        "",
        table(groups),
        "",
        *holdout_warning(runs),
        *effect,
        *([""] if effect else []),
        "Test accuracy is the final epoch's (mean ± sd over seeds); best epoch is the best epoch's per run, averaged. "
        f"Peak memory is the whole process's {first.get('peak_memory_kind', 'peak as each run measured it')} (the "
        "largest over seeds: model, data, evaluation and interpreter included); training steps is what the training "
        "steps alone added to the memory in use before the first one (the largest over seeds), the figure local "
        "learning reduces; "
        "img/s counts training only and is a speed figure only when the runs had the machine to themselves.",
        "",
        "## Test accuracy per epoch",
        "",
        "![test accuracy per epoch](accuracy_per_epoch.png)",
        "",
        "## Auxiliary-head accuracy against depth",
        "",
        "![head accuracy per block](block_accuracy.png)",
        "",
        "## Accuracy against memory",
        "",
        "![accuracy against peak memory](accuracy_vs_memory.png)",
        "",
        *exits_section,
        "## Runs",
        "",
        *[
            f"- `{r.path}` ({label_of(r, groups)}, seed {r.seed}): {100 * (r.summary.get('test_accuracy') or 0):.2f} %"
            for r in runs
        ],  # fmt: skip
        "",
    ]
    text = "\n".join(lines)
    atomic_write(out / "report.md", text)
    log.info("report: %s (%d runs, %d configurations)", out / "report.md", len(runs), len(groups))
    return text


def label_of(run: Run, groups: list[Group]) -> str:
    return next(g.label for g in groups if run in g.runs)


def terminal_summary(paths: list[Path]) -> str:
    """The table and the gap lines only (what ``locallearn report`` prints)."""
    runs = [load_run(p) for p in find_runs(paths)]
    groups = group_runs(runs)
    return "\n".join([table(groups), *holdout_warning(runs)[:1], *gap_closed(groups)])
