"""Models from torchvision and timm (``--arch torchvision:NAME``, ``--arch timm:NAME``), and any ``nn.Module`` as
a :class:`LayeredModel`.

Classes and input channels are adapted the way each library does it, *before* the model is cut (a later
``model.fc = …`` would leave the blocks pointing at the old module):

* torchvision: ``num_classes=`` to the builder (``weights=None``: nothing is downloaded); torchvision has no
  input-channel argument, so the first ``Conv2d`` that reads 3 channels is replaced by a fresh one reading
  ``in_channels`` (same kernel, stride, padding and bias); ViT builders also take ``image_size``.
* timm: ``timm.create_model(name, num_classes=, in_chans=)``, and ``img_size=`` for the models that take it
  (vision transformers); ``pretrained=False``.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

from locallearn.errors import UserError
from locallearn.feature_heads import layout_of_rank
from locallearn.models.layered import LayeredModel
from locallearn.models.traced import TraceRefused, trace_model, whole_model

log = logging.getLogger("locallearn")


def _first_rgb_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)


def adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    """Replace the first 3-channel ``Conv2d`` by one that reads ``in_channels`` (freshly initialised)."""
    if in_channels == 3:
        return
    found = _first_rgb_conv(model)
    if found is None:
        raise UserError(f"{type(model).__name__} has no 3-channel first convolution to adapt to {in_channels} channels")
    name, conv = found
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        1 if conv.groups == 1 else in_channels,
        conv.bias is not None,
        conv.padding_mode,
    )
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _torchvision(name: str, num_classes: int, in_channels: int, image_size: int | None, **kwargs: Any) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise UserError(
            f"torchvision has no model {name!r}: see torchvision.models.list_models() (e.g. resnet18, "
            "mobilenet_v3_small, efficientnet_b0, convnext_tiny, vit_b_16, swin_t)"
        )
    if image_size is not None and name.startswith("vit_"):
        kwargs.setdefault("image_size", image_size)
    if name in ("inception_v3", "googlenet"):
        kwargs.setdefault("aux_logits", False)  # auxiliary logits make the train-mode output a tuple
        kwargs.setdefault("init_weights", True)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    adapt_input_channels(model, in_channels)
    return model


def _timm(name: str, num_classes: int, in_channels: int, image_size: int | None, **kwargs: Any) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise UserError(f"timm:{name} needs timm: pip install 'locallearn[timm]' (or pip install timm)") from None
    if not timm.is_model(name):
        raise UserError(f"timm has no model {name!r}: see timm.list_models() (e.g. resnet18, vit_tiny_patch16_224)")
    args = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels, **kwargs}
    if image_size is not None and "img_size" not in kwargs:
        try:
            return timm.create_model(name, img_size=image_size, **args)
        except TypeError:  # a model without an img_size argument (CNNs): any size works
            pass
    return timm.create_model(name, **args)


SOURCES = {"torchvision": _torchvision, "timm": _timm}


def create_external(
    name: str, *, num_classes: int, in_channels: int, image_size: int | None = None, **kwargs: Any
) -> nn.Module:
    """``"torchvision:resnet18"`` or ``"timm:vit_tiny_patch16_224"`` built for ``num_classes`` and ``in_channels``."""
    source, _, model_name = name.partition(":")
    if source not in SOURCES or not model_name:
        raise UserError(f"unknown arch {name!r}: use torchvision:NAME, timm:NAME or a built-in arch (locallearn list)")
    try:
        model = SOURCES[source](model_name, num_classes, in_channels, image_size, **kwargs)
    except TypeError as err:
        raise UserError(f"{name} does not take these options ({err}): check --model.kwargs") from None
    model.eval()  # as the user would get it; training switches it to train mode
    return model


def model_name(model: nn.Module) -> str:
    """A readable name: timm's architecture name, else the class name."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return f"timm:{cfg['architecture']}"
    return type(model).__name__


def as_layered(model: nn.Module, input_shape: tuple[int, ...], *, whole_ok: bool = False) -> LayeredModel:
    """``model`` itself when it is a :class:`LayeredModel`; else its traced segments
    (:func:`locallearn.models.traced.trace_model`). With ``whole_ok`` (K=1) a model that cannot be cut is one layer.
    """
    if isinstance(model, LayeredModel):
        return model
    try:
        traced = trace_model(model, input_shape, model_name(model))
    except TraceRefused:
        if whole_ok:
            return whole_model(model, model_name(model))
        raise
    if traced.plan.unused:
        log.warning(
            "%s: %d parameter tensors are never read by forward and no block trains them (%s)",
            traced.arch,
            len(traced.plan.unused),
            ", ".join(traced.plan.unused[:5]) + (", …" if len(traced.plan.unused) > 5 else ""),
        )
    return traced


def layout_of(model: nn.Module, index: int, output: Tensor) -> str:
    """Layout of layer ``index``'s output: the traced model's record, else read from the tensor's rank."""
    layouts = getattr(model, "layouts", None)
    return layouts[index] if layouts else layout_of_rank(output.dim())
