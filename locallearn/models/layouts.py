"""What crosses a cut and how deep it sits: the memory layout of a frontier tensor, and stages from shapes.

A 4-D tensor crossing a cut is NCHW unless the layers that write or read it work over its last dimension (Swin's
channels-last stages); heads permute such maps first (:mod:`locallearn.feature_heads`). Stages (the stem, then a
new stage at each change of resolution) drive MAN's λ ramp by stage and activation checkpointing per stage.
"""

from __future__ import annotations

from torch import fx, nn

from locallearn.models import tracing

Layout = str  # "nchw", "nhwc", "tokens" (N, T, D) or "vector" (N, D)

_SHAPE_MOVERS = {"permute", "transpose", "reshape", "view", "flatten", "unflatten", "movedim"}


def _layer_layout(node: fx.Node, model: nn.Module, channels: int, producer: bool) -> Layout | None:
    """ "nchw" if ``node`` is a conv/BatchNorm, "nhwc" if it is a LayerNorm/Linear over the last dimension (whose
    output width, seen from its producer side, or input width, from its consumer side, is ``channels``)."""
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        if isinstance(module, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
            return "nchw"
        if isinstance(module, nn.LayerNorm):
            return "nhwc" if tuple(module.normalized_shape) == (channels,) else None
        if isinstance(module, nn.Linear):
            width = module.out_features if producer else module.in_features
            return "nhwc" if width == channels else None
    if node.op == "call_function":
        if node.target in (nn.functional.conv2d, nn.functional.batch_norm):
            return "nchw"
        if node.target is nn.functional.layer_norm:
            shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
            return "nhwc" if tuple(shape) == (channels,) else None
        if node.target is nn.functional.linear:
            return "nhwc"
    return None


def _is_mover(node: fx.Node, model: nn.Module | None = None) -> bool:
    if node.op == "call_module" and model is not None:
        return type(model.get_submodule(node.target)).__name__.lower() in _SHAPE_MOVERS  # torchvision's Permute
    if node.op == "call_method":
        return node.target in _SHAPE_MOVERS
    return node.op == "call_function" and getattr(node.target, "__name__", "") in _SHAPE_MOVERS


def _walk_layout(node: fx.Node, model: nn.Module, active: set[fx.Node], producer: bool) -> Layout | None:
    """Breadth-first from ``node`` towards its producers (or consumers) through element-wise glue; a node that moves
    dimensions (permute, reshape, …) ends a path, since past it the layout is another tensor's."""
    channels = node.meta["tensor_meta"].shape[-1]
    frontier = [node] if producer else list(node.users)
    seen: set[fx.Node] = set()
    while frontier:
        current = frontier.pop(0)
        if current in seen or current not in active:
            continue
        seen.add(current)
        found = _layer_layout(current, model, channels, producer)
        if found:
            return found
        if _is_mover(current, model):
            continue
        frontier.extend(current.all_input_nodes if producer else current.users)
    return None


def frontier_layout(node: fx.Node, model: nn.Module, active: set[fx.Node]) -> Layout:
    """Memory layout of the tensor crossing a cut: tokens (N, T, D), a vector (N, D), or a 4-D map, NCHW unless the
    layers that write or read it work over its last dimension (channels-last Swin stages); timm's ``output_fmt``
    decides when neither side tells."""
    rank = tracing.tensor_rank(node)
    if rank != 4:
        return {3: "tokens", 2: "vector"}.get(rank, f"rank{rank}")
    moved = _is_mover(node, model)  # a permute's producers see the other layout
    found = (None if moved else _walk_layout(node, model, active, producer=True)) or _walk_layout(
        node, model, active, producer=False
    )
    if found:
        return found
    return "nhwc" if str(getattr(model, "output_fmt", "")).upper() == "NHWC" else "nchw"


def _resolution(shape: tuple[int, ...], layout: Layout) -> tuple[int, ...] | None:
    if layout == "nchw":
        return tuple(shape[1:])
    if layout == "nhwc":
        return tuple(shape[:2])
    if layout == "tokens":
        return (shape[0],)
    return None


ISOTROPIC_STAGES = 4


def stages_from_shapes(shapes: list[tuple[int, ...]], layouts: list[Layout]) -> list[int]:
    """Stage of each segment: 0 for the first (the stem or patch embedding), then a new stage at each change of
    resolution (map size or token count). An isotropic model (a ViT, whose resolution never changes) has no stages
    of its own: its blocks are dealt into 4 equal groups, as MAN++ groups a ViT's depth, so that MAN's λ ramp by
    stage and activation checkpointing per stage mean what they mean for a CNN."""
    stages = _resolution_stages(shapes, layouts)
    features = len(shapes) - 2  # segments between the first one and the classifier's
    if max(stages) <= 1 and features >= ISOTROPIC_STAGES:
        stages = [0] + [1 + ISOTROPIC_STAGES * i // features for i in range(features)]
        stages.append(stages[-1])
    return stages


def _resolution_stages(shapes: list[tuple[int, ...]], layouts: list[Layout]) -> list[int]:
    stages, last = [], None
    for i, (shape, layout) in enumerate(zip(shapes, layouts)):
        res = _resolution(shape, layout)
        if i == 0:
            stages.append(0)
        elif i == 1:
            stages.append(1)
        else:
            stages.append(stages[-1] + (1 if res is not None and last is not None and res != last else 0))
        last = res if res is not None else last
    return stages
