"""``locallearn list --cuts ARCH``: where a model can be cut, as a table a person reads before choosing K."""

from __future__ import annotations

from locallearn.models import create_model
from locallearn.models.layered import LayeredModel
from locallearn.models.traced import plan_cuts


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape)


def describe_cuts(arch: str, image_size: int, in_channels: int, num_classes: int) -> str:
    """The segments of ``arch`` (what K counts) and every valid cut, with shapes and activation sizes."""
    model = create_model(arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    shape = (in_channels, image_size, image_size)
    if isinstance(model, LayeredModel):
        lines = [f"{arch} at {_shape(shape)} is a built-in layered model: {model.num_layers()} atomic layers"]
        lines += [f"  {i:>3}  {name}" for i, name in enumerate(model.names)]
        return "\n".join(lines)
    plan = plan_cuts(model, shape, arch)
    ends = set(plan.ends["train"])
    lines = [
        f"{arch} at {_shape(shape)}: {len(plan.cuts)} valid cuts, {len(plan.names)} segments, largest K = "
        f"{plan.max_blocks}",
        "",
        "segments (K blocks are K runs of consecutive segments; --split NAME,NAME cuts after named modules):",
        f"  {'#':>3}  {'starts at':<32} {'output':<16} {'layout':<7} {'KiB/example':>11}  stage",
    ]
    for i, (name, out, layout, stage) in enumerate(zip(plan.names, plan.shapes, plan.layouts, plan.stage_of)):
        cut = next((c for c in plan.cuts if i < len(plan.ends["train"]) and c.node == plan.ends["train"][i]), None)
        size = f"{cut.bytes_per_example / 1024:.1f}" if cut else "–"
        lines.append(f"  {i:>3}  {name:<32} {_shape(out):<16} {layout:<7} {size:>11}  {stage}")
    lines += ["", "valid cuts (* ends a segment):", f"  {'node':<28} {'inside module':<36} {'shape':<16} KiB/example"]
    for cut in plan.cuts:
        mark = "*" if cut.node in ends else " "
        lines.append(
            f"{mark} {cut.node:<28} {cut.module:<36} {_shape(cut.shape):<16} {cut.bytes_per_example / 1024:.1f}"
        )
    if plan.unused:
        lines += ["", f"parameters the forward never reads (trained by no block): {', '.join(plan.unused)}"]
    return "\n".join(lines)
