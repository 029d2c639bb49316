"""``locallearn compare``: train several configurations over several seeds and write one markdown table.

A benchmark, not a test: it measures accuracy (mean ± std over seeds), throughput and peak memory, and names the
machine. Two suites:

* ``parity`` — methods.md §9: the official MAN/InfoPro code's protocol on Fashion-MNIST (3×32×32 padded, ResNet-32,
  3 epochs of the first 10,000 images, batch 128); rows E2E, InfoPro (K=16) and the faithful InfoPro+MAN (MAN's
  15-block "K=16"), each against the official figure.
* ``methods`` — all seven methods on Fashion-MNIST with ResNet-32 at the requested K, each at the split its paper
  uses for that K (so the true block count can differ: MAN's "K=16" is 15 blocks, AugLocal's K=16/d=2 is 14), under
  one stated schedule.

Each suite is a grid of :mod:`locallearn.sweep` (:func:`suite_grid`): every run is its own process, and running the
same command again after a stop skips the finished runs and continues the stopped one from its checkpoint.

``--merge`` trains nothing: it joins the ``results.json`` of earlier runs of the command (say one seed per process,
run side by side, or one per machine session) into one table, naming each source's command.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from locallearn.config import parse_value
from locallearn.errors import UserError
from locallearn.provenance import cpu_model
from locallearn.runner import atomic_write, git_commit
from locallearn.sweep import Entry, Grid, sweep

log = logging.getLogger("locallearn")

OFFICIAL_PARITY = {"e2e": 83.83, "infopro": 74.53, "infopro+man": 75.31}  # methods.md §9, one seed each


@dataclass
class Row:
    name: str
    presets: list[str]
    overrides: list[str] = field(default_factory=list)
    reference: float | None = None


def parity_rows() -> list[Row]:
    return [
        Row("E2E", ["parity/e2e"], reference=OFFICIAL_PARITY["e2e"]),
        Row("InfoPro, K=16 (stem alone), 1c2f", ["parity/infopro"], reference=OFFICIAL_PARITY["infopro"]),
        Row(
            "InfoPro+MAN, MAN's 'K=16' = 15 blocks, 2c2f",
            ["parity/infopro_man"],
            reference=OFFICIAL_PARITY["infopro+man"],
        ),
    ]


# method -> (split, true K) at a nominal K, following each paper's own bookkeeping
def paper_split(method: str, k: int) -> tuple[str, int]:
    if k == 16:
        return {
            "dgl+man": ("man", 15),
            "infopro+man": ("man", 15),
            "man++": ("man++", 16),
            "auglocal": ("layerwise", 14),
        }.get(method, ("infopro", 16))
    return "even", k


PROTOCOLS = {"default": [], "parity": ["parity/common"]}  # base presets of the methods suite


def method_rows(ks: list[int], protocol: str = "default") -> list[Row]:
    """E2E and six local methods at each nominal K. ``protocol="parity"`` runs them under methods.md §9's protocol
    exactly (preset ``parity/common``: 3×32×32 padded Fashion-MNIST, first 10,000 images, 3 epochs, batch 128, the
    official optimizer, schedule and step order), each method with its own defaults otherwise."""
    base = PROTOCOLS[protocol]
    rows = [Row("E2E", base, ["train.method=e2e", "train.K=1"])]
    for k in ks:
        for method in ("dgl", "infopro", "dgl+man", "infopro+man", "man++", "auglocal"):
            split, true_k = paper_split(method, k)
            rows.append(
                Row(
                    f"{method}, K={k} ({split}: {true_k} blocks)",
                    base,
                    [f"train.method={method}", f"train.K={true_k}", f"train.split={split}"],
                )
            )
    return rows


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}"
    return f"{cpu_model()}, {os.cpu_count()} cores, CPU only"


def suite_grid(rows: list[Row], seeds: list[int], common: list[str], name: str) -> Grid:
    """A suite as a sweep grid (one named configuration per row, crossed with the seeds): compare runs through
    :func:`locallearn.sweep.sweep`, so a stopped comparison resumes and skips the runs it finished."""
    shared = {"train.save_checkpoint": False}
    for item in common:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r} needs a value: write SECTION.KEY=VALUE")
        shared[key] = parse_value(text)
    entries = []
    for row in rows:
        overrides = {}
        for item in row.overrides:
            key, _, text = item.partition("=")
            overrides[key] = parse_value(text)
        entries.append(Entry(row.name, list(row.presets), overrides, {"reference": row.reference}))
    return Grid(set=shared, seeds=list(seeds), runs=entries, source=f"compare suite {name}")


def run_suite(rows: list[Row], seeds: list[int], common: list[str], out: Path, name: str) -> list[dict[str, Any]]:
    return sweep(suite_grid(rows, seeds, common, name), out)


def fmt_acc(values: list[float]) -> str:
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.2f}"
    return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| configuration | blocks | test acc % (mean ± std) | per seed | official % | train img/s | s/epoch "
        "| peak mem (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    e2e_rate = None
    for name in dict.fromkeys(r["row"] for r in results):
        runs = [r for r in results if r["row"] == name]
        accs = [r["test_accuracy"] for r in runs]
        rate = statistics.mean(r["images_per_second"] for r in runs)
        e2e_rate = rate if runs[0]["method"] == "e2e" else e2e_rate
        ratio = f" ({rate / e2e_rate:.2f}× E2E)" if e2e_rate and runs[0]["method"] != "e2e" else ""
        epoch_s = statistics.mean(r["wall_seconds"] / max(r["epochs"], 1) for r in runs)
        ref = "–" if runs[0]["reference"] is None else f"{runs[0]['reference']:.2f}"
        lines.append(
            f"| {name} | {runs[0]['K']} | {fmt_acc(accs)} | {' / '.join(f'{100 * a:.2f}' for a in accs)} "
            f"| {ref} | {rate:.0f}{ratio} | {epoch_s:.0f} | {max(r['peak_memory_bytes'] for r in runs) / 2**20:.0f} |"
        )
    return "\n".join(lines)


def compare(
    suite: str,
    seeds: list[int],
    ks: list[int],
    common: list[str],
    out: Path,
    command: str,
    only: list[str] | None = None,
    protocol: str = "default",
) -> str:
    out.mkdir(parents=True, exist_ok=True)
    rows = parity_rows() if suite == "parity" else method_rows(ks, protocol)
    if only:
        rows = [r for r in rows if any(word in r.name for word in only)]
    start = time.time()
    results = run_suite(rows, seeds, common, out, suite)
    header = [
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}; torch {torch.__version__}; git {git_commit() or 'unknown'}; "
        f"{len(results)} runs in {(time.time() - start) / 60:.1f} min.",
    ]
    return write_table(suite, header, results, out)


def gap_recovered(results: list[dict[str, Any]]) -> list[str]:
    """MAN's effect, the quantity its paper reports: for every base method B with a B+MAN row at the same nominal K
    (the ``K=<n>`` in the row name), the share of B's accuracy gap to E2E that MAN closes,
    (acc(B+MAN) − acc(B)) / (acc(E2E) − acc(B)), on the seed means and per seed (seeds present in all three rows)."""
    by_row: dict[tuple[str, int | None], dict[int, float]] = {}
    for r in results:
        match = re.search(r"K=(\d+)", r["row"])
        key = (r["method"], int(match.group(1)) if match else None)
        by_row.setdefault(key, {})[r["seed"]] = r["test_accuracy"]
    e2e = next((accs for (method, _), accs in by_row.items() if method == "e2e"), None)
    lines = []
    for (method, k), man in by_row.items():
        base = by_row.get((method.removesuffix("+man"), k)) if method.endswith("+man") else None
        if e2e is None or base is None:
            continue
        seeds = sorted(set(e2e) & set(base) & set(man))
        if not seeds:
            continue
        means = [statistics.mean(accs[s] for s in seeds) for accs in (e2e, base, man)]
        per_seed = ", ".join(_share(e2e[s], base[s], man[s]) for s in seeds)
        lines.append(
            f"- K={k}: {method} closes {_share(*means)} of {method.removesuffix('+man')}'s gap to E2E on the means "
            f"of seeds {seeds} (per seed: {per_seed})."
        )
    return lines


def _share(e2e: float, base: float, man: float) -> str:
    return f"{100 * (man - base) / (e2e - base):.0f} %" if e2e != base else "– (no gap)"


def write_table(suite: str, header: list[str], results: list[dict[str, Any]], out: Path) -> str:
    effect = gap_recovered(results)
    text = "\n".join(
        [
            f"## `{suite}` suite",
            "",
            *header,
            "",
            table(results),
            "",
            *effect,
            *([""] if effect else []),
            "s/epoch includes the per-epoch test evaluation; img/s counts training only. Peak memory is "
            f"{results[0]['peak_memory_kind']}.",
            "",
        ]
    )
    atomic_write(out / "table.md", text)
    return text


def _source_command(directory: Path) -> str | None:
    """The ``Command:`` line of an earlier run's table.md, if it wrote one."""
    table_md = directory / "table.md"
    if table_md.is_file():
        for line in table_md.read_text().splitlines():
            if line.startswith("Command: `"):  # a merged table's line goes on after the closing backtick
                return line[len("Command: `") :].split("`")[0]
    return None


def merge(directories: list[Path], out: Path, command: str) -> str:
    """One table from the ``results.json`` of several earlier ``compare`` runs (no training).

    Rows with the same name are pooled across sources, so seeds trained in separate processes get one mean ± std.
    The throughput of runs trained side by side shares the machine; each source's command is listed.
    """
    results: list[dict[str, Any]] = []
    header = [f"Command: `{command}`, merging:", ""]
    for directory in directories:
        path = directory / "results.json"
        if not path.is_file():
            raise UserError(f"--merge {directory}: no results.json there; give the --out of an earlier compare run")
        try:
            runs = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"--merge {directory}: results.json is not JSON ({err}): was it cut off?") from err
        if not isinstance(runs, list) or not all(isinstance(r, dict) and "row" in r for r in runs):
            raise UserError(f"--merge {directory}: results.json is not a list of compare results")
        results += runs
        header.append(f"- `{directory}`: `{_source_command(directory) or 'command unknown'}`")
    if not results:
        raise UserError("--merge: the given directories hold no finished runs")
    seen = {(r["row"], r["seed"]) for r in results}
    if len(seen) < len(results):
        raise UserError("--merge: the same row and seed appear twice; merge each run once")
    devices = sorted({r.get("device_name", "?") for r in results})
    commits = sorted({(r.get("git_commit") or "unknown")[:7] for r in results})
    header += [
        "",
        f"Merged on {machine()}; runs on {', '.join(devices)}; torch "
        f"{', '.join(sorted({r.get('torch', '?') for r in results}))}; git {', '.join(commits)}; {len(results)} runs.",
    ]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", json.dumps(results, indent=1))
    return write_table("merged", header, results, out)
