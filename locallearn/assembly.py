"""A model cut into blocks with a method set up on them: the part of building a learner that the split planner
(:mod:`locallearn.memory`) needs too, so that it can cut throw-away copies without importing the learner.

:func:`setup_info` probes the layers (two dummy images, evaluation mode, so BatchNorm statistics stay untouched) for
what a method needs to build its auxiliary nets (:class:`locallearn.methods.SetupInfo`); :func:`assemble` cuts a
layered model at ``bounds`` and sets a method up on the blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from locallearn.feature_heads import canonical_shape
from locallearn.heads import Shape
from locallearn.methods import LocalMethod, SetupInfo, create_method
from locallearn.models import LayeredModel, layout_of, split_model


@torch.no_grad()
def setup_info(
    model: LayeredModel, blocks: list[nn.Module], bounds: list[int], input_shape: Shape, device: torch.device
) -> SetupInfo:
    """What a method's ``setup`` reads about ``model`` cut at ``bounds`` into ``blocks``, for inputs of
    ``input_shape`` (C, H, W): each layer's output shape and layout, each block's, its stage, the layer after it."""
    was_training = model.training
    model.eval()
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), None)  # a float64 model
    h = torch.zeros(2, *input_shape, device=device, dtype=dtype)
    layer_shapes, layouts = [], []
    for i, layer in enumerate(model.layers):
        h = layer(h)
        layout = layout_of(model, i, h)
        layouts.append(layout)
        layer_shapes.append(canonical_shape(tuple(h.shape[1:]), layout))
    model.train(was_training)
    ends = [b - 1 for b in bounds] + [model.num_layers() - 1]
    starts = [0, *bounds]
    return SetupInfo(
        blocks=blocks,
        shapes=[layer_shapes[e] for e in ends],
        num_classes=layer_shapes[-1][0],
        image_shape=tuple(input_shape),
        layer_stages=[model.stage_of[s] for s in starts],
        next_layers=[model.layers[b] for b in bounds] + [None],
        model=model,
        bounds=list(bounds),
        layer_shapes=layer_shapes,
        layouts=layouts,
        token_pool=getattr(getattr(model, "plan", None), "token_pool", None),
    )


def assemble(
    model: LayeredModel,
    method: str | LocalMethod,
    bounds: list[int],
    input_shape: Shape,
    options: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> tuple[list[nn.Sequential], LocalMethod]:
    """``model`` cut at ``bounds`` and ``method`` (a name, made with ``options``, or an instance) set up on the
    blocks; returns (blocks, method). The blocks share the model's layers."""
    blocks = split_model(model, bounds)
    method = create_method(method, options) if isinstance(method, str) else method
    method.setup(setup_info(model, blocks, bounds, input_shape, device or torch.device("cpu")))
    return blocks, method
