"""``locallearn bench``: peak training memory and throughput of end-to-end, end-to-end with activation
checkpointing, and local learning at several K and split strategies, on synthetic data, in one run.

Memory: on every device an estimate from fake tensors (:func:`locallearn.memory.estimate_peak`: real training
steps, no storage), split into parameters, gradients, optimizer state, activations and temporaries; and, beside it,
a measurement of the same configuration for real in a fresh process (:mod:`locallearn.measure`; ``--no-measure``
skips it): on CPU the growth of peak RSS over the measured steps, on a GPU ``max_memory_allocated`` and
``max_memory_reserved`` after ``reset_peak_memory_stats``. The estimate comparable to the CPU growth is the estimated
peak less the parameters, buffers and optimizer state, which exist before the steps ("est. step"). Throughput:
warm-up steps, then timed steps, in the same fresh process (``--time-steps 0``: one untimed measured step).
Arithmetic: the floating-point operations of one training step per image (``torch.utils.flop_counter``, on fake
tensors), whose ratio to end-to-end's is the throughput ratio a compute-bound device would give.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from locallearn import measure
from locallearn.bench_row import BenchConfig, bench_model, learner_builder, measure_row
from locallearn.data import Batch
from locallearn.errors import UserError
from locallearn.measure import estimated_step_bytes
from locallearn.memory import balanced_boundaries, estimate_peak, split_cost, split_costs
from locallearn.models import resolve_split
from locallearn.options import CHECKPOINTING

MiB = 2**20


@dataclass
class Row:
    label: str
    method: str
    K: int
    split: str
    checkpointing: str
    bounds: list[int]
    estimated_peak_bytes: int
    parts: dict[str, int]
    estimated_step_bytes: int = 0  # the estimated peak less parameters, buffers and optimizer state
    measured_growth_bytes: int | None = None  # CPU: peak RSS growth over the measured steps; CUDA: allocated growth
    measured_peak_bytes: int | None = None  # CUDA: max_memory_allocated (CPU: the process's peak RSS)
    measured_reserved_bytes: int | None = None  # CUDA: max_memory_reserved
    images_per_second: float | None = None
    flops_per_image: float | None = None


def _rows(cfg: BenchConfig) -> list[tuple[str, str, int, str, str]]:
    rows = [("E2E", "e2e", 1, "even", "none"), ("E2E + checkpointing per stage", "e2e", 1, "even", "stage")]
    for k in cfg.ks:
        for split in cfg.splits:
            for ckpt in cfg.local_checkpointing:
                rows.append((f"{cfg.method} K={k} {split}{CHECKPOINTING[ckpt]}", cfg.method, k, split, ckpt))
    return rows


def _costs(cfg: BenchConfig, recompute_aux: bool = False) -> tuple[list[int], list[int]]:
    """Per-layer and per-cut activation bytes of the benchmarked method, measured at batch 2."""
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    return split_costs(bench_model(cfg), cfg.method, cfg.method_options, shape, recompute_aux)


def _bounds(cfg: BenchConfig, k: int, split: str, costs: tuple[list[int], list[int]] | None) -> list[int]:
    if split == "balanced":
        return balanced_boundaries(*costs, k)
    return resolve_split(bench_model(cfg), split, k)


def lower_bound(cfg: BenchConfig, e2e: Row, costs: tuple[list[int], list[int]]) -> dict[str, int]:
    """Parameters + optimizer state + the smallest largest-block activation any split reaches (over every K)."""
    layers, cuts = costs
    n = len(layers) - 1
    best = min(split_cost(layers, cuts, balanced_boundaries(layers, cuts, k)) for k in range(1, n + 1))
    act = best * cfg.batch_size // 2  # costs were measured at batch 2; activation memory is linear in the batch
    fixed = e2e.parts.get("Parameter", 0) + e2e.parts.get("Optstate", 0) + e2e.parts.get("Buffer", 0)
    return {"total": fixed + act, "fixed": fixed, "activations": act}


def _measure(cfg: BenchConfig, row: Row, log) -> None:
    """Measure ``row`` for real in a fresh process and fill in its measured and timed fields."""
    try:
        m = measure.measure_in_subprocess(measure_row, asdict(cfg), row.method, row.bounds, row.checkpointing)
    except RuntimeError as err:  # an out-of-memory kill of one row must not lose the others
        log(f"{row.label:<40} not measured: {err}")
        return
    row.measured_growth_bytes, row.measured_peak_bytes = m.growth_bytes, m.peak_bytes
    row.measured_reserved_bytes, row.images_per_second = m.reserved_bytes, m.images_per_second


def train_flops_per_image(build, input_shape: tuple[int, ...], num_classes: int, batch_size: int = 2) -> float:
    """Floating-point operations of one training step (forward, backward, optimizer) per image, counted by
    ``FlopCounterMode`` on fake tensors (shapes only, nothing computed). Convolutions and matrix products are
    counted (2 per multiply-add); element-wise work is not, which is why this is the compute-bound view."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode():
        learner = build()
        x = torch.rand(batch_size, *input_shape)
        batch = Batch(x, torch.randint(0, num_classes, (batch_size,)), x)
        with FlopCounterMode(display=False) as counter:
            learner.train_step(batch)
    return counter.get_total_flops() / batch_size


def run_bench(cfg: BenchConfig, log=print) -> list[Row]:
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    results = []
    # cut costs differ when the auxiliary nets are recomputed (only their largest segment counts)
    aux_modes = sorted({"aux" in c for c in cfg.local_checkpointing}) if "balanced" in cfg.splits else []
    costs = {aux: _costs(cfg, recompute_aux=aux) for aux in aux_modes}
    for label, method, k, split, ckpt in _rows(cfg):
        try:
            bounds = [] if method == "e2e" else _bounds(cfg, k, split, costs.get("aux" in ckpt))
        except UserError as err:  # a published preset without this K: skip the row, keep the rest of the run
            log(f"{label:<40} skipped: {err}")
            continue
        # the memory format changes kernels, not tensor sizes; fake tensors cannot be re-laid out, so estimate NCHW
        estimate_build = learner_builder(cfg, method, bounds, ckpt, torch.device("cpu"), channels_last=False)
        est = estimate_peak(estimate_build, shape, cfg.batch_size, cfg.num_classes)
        row = Row(label, method, k, split, ckpt, bounds, est.peak, est.parts)
        row.estimated_step_bytes = estimated_step_bytes(est.peak, est.parts)
        row.flops_per_image = train_flops_per_image(estimate_build, shape, cfg.num_classes)
        if cfg.measure or cfg.time_steps > 0:
            _measure(cfg, row, log)
        results.append(row)
        log(format_row(row, results[0]))
    for aux, cost in costs.items():
        bound = lower_bound(cfg, results[0], cost)
        log(
            f"lower bound{' with aux recompute' if aux else ''} {bound['total'] / MiB:.0f} MiB (params + optimizer "
            f"{bound['fixed'] / MiB:.0f}, smallest largest-block activations {bound['activations'] / MiB:.0f})"
        )
        results[0].parts["lower_bound_aux_recompute" if aux else "lower_bound"] = bound["total"]
    return results


def format_row(row: Row, e2e: Row) -> str:
    ratio = row.estimated_peak_bytes / e2e.estimated_peak_bytes
    speed = "" if row.images_per_second is None else f"  {row.images_per_second:8.1f} img/s"
    if row.images_per_second and e2e.images_per_second:
        speed += f" ({row.images_per_second / e2e.images_per_second:.2f}×)"
    if row.flops_per_image and e2e.flops_per_image:
        speed += f"  {row.flops_per_image / 1e9:.3g} GFLOP/img (bound {e2e.flops_per_image / row.flops_per_image:.2f}×)"
    measured = ""
    if row.measured_growth_bytes is not None:
        measured = (
            f"  step: est. {row.estimated_step_bytes / MiB:.0f} MiB, measured {row.measured_growth_bytes / MiB:.0f} MiB"
        )
        if e2e.measured_growth_bytes:
            measured += f" ({row.measured_growth_bytes / e2e.measured_growth_bytes:.2f}× E2E)"
    return f"{row.label:<40} {row.estimated_peak_bytes / MiB:10.0f} MiB ({ratio:.2f}× E2E){measured}{speed}"


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / MiB:.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if not (a and b) else f"{a / b:.2f}"


def markdown(cfg: BenchConfig, rows: list[Row], machine: str, command: str) -> str:
    e2e = rows[0]
    cuda = any(r.measured_reserved_bytes is not None for r in rows)
    gpu_head = " measured max allocated MiB | measured max reserved MiB |" if cuda else ""
    head = (
        "| configuration | blocks | boundaries | est. peak MiB | × E2E | params | grads | optimizer | activations "
        "| temp | est. step MiB | measured step MiB | measured / est. | measured step × E2E |"
        + gpu_head
        + " img/s | × E2E | GFLOP/img | compute bound × E2E |"
    )
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {machine}. {cfg.arch}, {cfg.in_channels}×{cfg.image_size}×"
        f"{cfg.image_size}, batch {cfg.batch_size}, {cfg.num_classes} classes.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in rows:
        p = r.parts
        gpu = f" {_mib(r.measured_peak_bytes)} | {_mib(r.measured_reserved_bytes)} |" if cuda else ""
        speed = "–" if r.images_per_second is None else f"{r.images_per_second:.1f}"
        flops = "–" if not r.flops_per_image else f"{r.flops_per_image / 1e9:.3g}"
        lines.append(
            f"| {r.label} | {r.K} | {r.bounds} | {r.estimated_peak_bytes / MiB:.0f} | "
            f"{r.estimated_peak_bytes / e2e.estimated_peak_bytes:.2f} | {p.get('Parameter', 0) / MiB:.0f} | "
            f"{p.get('Gradient', 0) / MiB:.0f} | {p.get('Optstate', 0) / MiB:.0f} | "
            f"{p.get('Activation', 0) / MiB:.0f} | {p.get('Temp', 0) / MiB:.0f} | {_mib(r.estimated_step_bytes)} | "
            f"{_mib(r.measured_growth_bytes)} | {_ratio(r.measured_growth_bytes, r.estimated_step_bytes)} | "
            f"{_ratio(r.measured_growth_bytes, e2e.measured_growth_bytes)} |{gpu} {speed} | "
            f"{_ratio(r.images_per_second, e2e.images_per_second)} | {flops} | "
            f"{_ratio(e2e.flops_per_image, r.flops_per_image)} |"
        )
    measured_what = (
        "growth of `max_memory_allocated` over the bytes allocated before the measured steps"
        if cuda
        else "growth of the process's peak resident set (VmHWM) over its resident set just before the measured steps"
    )
    lines += [
        "",
        "est. step: the fake-tensor estimated peak less parameters, buffers and optimizer state (which exist before a "
        f"step); measured step: {measured_what}, in a fresh process per row after the warm-up steps "
        "(`locallearn/measure.py`). "
        "GFLOP/img: one training step's floating-point operations per image (convolutions and matrix products, "
        "counted by `torch.utils.flop_counter`); compute bound: E2E's count over the row's, the throughput ratio a "
        "device bound by arithmetic alone would give.",
    ]
    bound = e2e.parts.get("lower_bound")
    if bound:
        lines += [
            "",
            f"Lower bound: {bound / MiB:.0f} MiB = parameters + optimizer state + the smallest largest-block "
            f"activation (with its auxiliary net) that any split reaches "
            f"({bound / e2e.estimated_peak_bytes:.2f}× E2E).",
        ]
    bound_aux = e2e.parts.get("lower_bound_aux_recompute")
    if bound_aux:
        lines += [
            "",
            f"Lower bound with the auxiliary nets recomputed (`aux`): {bound_aux / MiB:.0f} MiB "
            f"({bound_aux / e2e.estimated_peak_bytes:.2f}× E2E).",
        ]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path, title: str) -> None:
    """Estimated peak; measured beside estimated step memory (when measured); throughput (when timed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e2e, ckpt = rows[0], rows[1]
    gib = 2**30
    panels = [("estimated peak memory (GiB)", lambda r: r.estimated_peak_bytes / gib, None)]
    if all(r.measured_growth_bytes is not None for r in rows):
        panels.append(
            (
                "training-step memory (GiB): measured (solid), estimated (dotted)",
                lambda r: r.measured_growth_bytes / gib,
                lambda r: r.estimated_step_bytes / gib,
            )
        )
    if all(r.images_per_second for r in rows):
        panels.append(("training throughput (img/s)", lambda r: r.images_per_second, None))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (ylabel, value, estimate) in zip(axes[0], panels):
        for split, recomputed in dict.fromkeys((r.split, r.checkpointing) for r in rows[2:]):
            series = [r for r in rows[2:] if (r.split, r.checkpointing) == (split, recomputed)]
            plain = recomputed == "none"
            label = f"local, {split} split" + ("" if plain else f", {recomputed} recomputed")
            (line,) = ax.plot(
                [r.K for r in series], [value(r) for r in series], marker="o", linestyle="-" if plain else "--",
                label=label,
            )  # fmt: skip
            if estimate is not None:
                ax.plot([r.K for r in series], [estimate(r) for r in series], marker="x", linestyle=":",
                        color=line.get_color())  # fmt: skip
        ax.axhline(value(e2e), color="k", linestyle="--", label="E2E")
        ax.axhline(value(ckpt), color="gray", linestyle="-.", label="E2E + checkpointing")
        if estimate is not None:
            ax.axhline(estimate(e2e), color="k", linestyle=":", linewidth=0.8)
        ax.set_xlabel("K (blocks)")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(cfg: BenchConfig, rows: list[Row], out: Path, machine: str, command: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(
        json.dumps(
            {"config": asdict(cfg), "machine": machine, "command": command, "rows": [asdict(r) for r in rows]}, indent=1
        )
    )
    text = markdown(cfg, rows, machine, command)
    (out / "bench.md").write_text(text)
    plot(rows, out / "bench.png", f"{cfg.arch} {cfg.image_size}px batch {cfg.batch_size}: {cfg.method}")
    return text
