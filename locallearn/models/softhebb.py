"""The SoftHebb networks (Journé et al., "Hebbian Deep Learning Without Feedback", ICLR 2023, arXiv 2209.11883).

Each Hebbian layer is one atomic layer, ``SoftHebbBlock``: BatchNorm without affine parameters → a SoftHebb
convolution (reflect padding, stride 1, no bias) → Triangle(p) → pool. The last layer is the classifier:
flatten → dropout → linear. So ``--split layerwise`` (K = layers + 1) puts one Hebbian layer in each block, the
layout :mod:`locallearn.methods.softhebb` trains. The widths, kernels, 1/τ (``t_invert``), η0, q, Triangle's p and
pools below are the paper's presets (``presets.json`` of the authors' code, as described in
``shared/reference/softhebb.md`` §2); any input size and number of channels work (the classifier's width follows
from one probe at construction).

Paper symbol ↔ code: u = ``HebbConv2d`` output (the layer's pre-activation), W = ``HebbConv2d.weight`` (C, Cin, k, k),
1/τ = ``t_invert``, η0 = ``eta0``, q = ``power_lr``, r0 = ``radius`` (initial filter norm).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from locallearn.errors import UserError
from locallearn.models.layered import LayeredModel
from locallearn.models.registry import MODELS


@dataclass(frozen=True)
class HebbLayerSpec:
    """One Hebbian layer of a preset: ``channels``, kernel ``k``, 1/τ ``t_invert``, η0 ``eta0``, Triangle ``p``,
    ``pool`` written kind_kernel_stride_padding, and ``pre_triangle`` (the preset's ``e1``: Triangle(1) applied to u
    before the competition, and output by the layer)."""

    channels: int
    k: int
    t_invert: float
    eta0: float
    p: float
    pool: str
    pre_triangle: bool = False


# shared/reference/softhebb.md §2 (the authors' presets.json)
PRESETS: dict[str, tuple[tuple[HebbLayerSpec, ...], float, float]] = {
    # name: (layers, dropout, q)
    "softhebb1": ((HebbLayerSpec(96, 5, 1.0, 0.08, 0.7, "avg_4_2_1"),), 0.5, 0.5),  # 2SoftHebbCnnCIFAR
    "softhebb2": (  # 3SoftHebbCnnCIFAR
        (
            HebbLayerSpec(96, 5, 1.0, 0.08, 0.7, "avg_4_2_1"),
            HebbLayerSpec(384, 3, 0.65, 0.005, 1.4, "max_4_2_1", pre_triangle=True),
        ),
        0.5,
        0.5,
    ),
    "softhebb3": (  # 4SoftHebbCnnCIFAR: the paper's 80.3 % on CIFAR-10
        (
            HebbLayerSpec(96, 5, 1.0, 0.08, 0.7, "max_4_2_1"),
            HebbLayerSpec(384, 3, 0.65, 0.005, 1.4, "max_4_2_1"),
            HebbLayerSpec(1536, 3, 0.25, 0.01, 1.0, "avg_2_2_0"),
        ),
        0.5,
        0.5,
    ),
    "softhebb-stl4": (  # 5SoftHebbCnnSTL: 76.2 % on STL-10
        (
            HebbLayerSpec(96, 5, 1.0, 0.08, 0.7, "avg_4_2_1"),
            HebbLayerSpec(384, 3, 0.65, 0.005, 0.7, "max_4_2_1"),
            HebbLayerSpec(1536, 3, 0.45, 0.01, 1.4, "avg_4_2_1"),
            HebbLayerSpec(6144, 3, 0.25, 0.01, 1.0, "avg_2_2_0"),
        ),
        0.5,
        0.5,
    ),
    "softhebb-imagenet5": (  # 6SoftHebbCnnImNet: 27.3 % on ImageNet at 160 px; q = 0.75 (the CNN default)
        (
            HebbLayerSpec(48, 5, 1.1, 0.08, 0.7, "max_4_2_1"),
            HebbLayerSpec(192, 3, 0.7, 0.01, 0.7, "max_4_2_1"),
            HebbLayerSpec(768, 3, 0.5, 0.01, 0.7, "max_4_2_1"),
            HebbLayerSpec(3072, 3, 0.4, 0.01, 1.4, "max_4_2_1"),
            HebbLayerSpec(12288, 3, 0.25, 0.01, 1.0, "avg_2_2_0"),
        ),
        0.5,
        0.75,
    ),
}


def triangle(u: Tensor, p: float) -> Tensor:
    """Triangle(p)(u) = ReLU(u − mean over channels of u)^p (the paper's activation).

    Written so that its gradient is finite everywhere (end-to-end backprop through the same network is one of the
    controls): ``relu(v)**p`` has an infinite slope at 0 for p < 1 and autograd then gives 0·∞ = NaN. Values are
    exactly ReLU(v)^p."""
    v = u - u.mean(dim=1, keepdim=True)
    if not (torch.is_grad_enabled() and v.requires_grad):  # no gradient wanted: the plain form, a third of the work
        return torch.relu_(v).pow_(p)
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)) ** p, torch.zeros_like(v))


class Triangle(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, u: Tensor) -> Tensor:
        return triangle(u, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class HebbConv2d(nn.Module):
    """The SoftHebb convolution: reflect padding k//2, stride 1, no bias; ``forward`` returns u (linear).

    Holds the layer's rule constants (1/τ, η0, q, ``pre_triangle``) for the method; the weights are an ordinary
    parameter, so end-to-end backprop can train the same network. Initialised with W ~ N(0, r0²/fan_in), every
    filter at norm ≈ r0 (the paper's r0 = 25: PyTorch's default init, norm < 1, stops this rule from learning)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        t_invert: float,
        eta0: float,
        power_lr: float,
        radius: float = 25.0,
        pre_triangle: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.t_invert, self.eta0, self.power_lr, self.radius = t_invert, eta0, power_lr, radius
        self.pre_triangle = pre_triangle
        fan_in = in_channels * kernel_size * kernel_size
        self.weight = nn.Parameter(
            torch.randn(out_channels, in_channels, kernel_size, kernel_size) * (radius / fan_in**0.5)
        )

    def pad(self, x: Tensor) -> Tensor:
        p = self.kernel_size // 2
        return F.pad(x, (p, p, p, p), mode="reflect") if p else x

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(self.pad(x), self.weight)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, t_invert={self.t_invert}, "
            f"eta0={self.eta0}, power_lr={self.power_lr}, pre_triangle={self.pre_triangle}"
        )


def make_pool(spec: str) -> nn.Module:
    """``max_4_2_1`` → ``MaxPool2d(4, 2, 1)``; ``avg_2_2_0`` → ``AvgPool2d(2, 2, 0)``."""
    try:
        kind, kernel, stride, padding = spec.split("_")
        args = (int(kernel), int(stride), int(padding))
    except ValueError:
        raise UserError(f"pool {spec!r} is not kind_kernel_stride_padding (e.g. max_4_2_1)") from None
    if kind == "max":
        return nn.MaxPool2d(*args)
    if kind == "avg":
        return nn.AvgPool2d(*args)
    raise UserError(f"pool kind {kind!r} in {spec!r}: use max or avg")


class SoftHebbBlock(nn.Module):
    """BatchNorm (no affine) → SoftHebb conv → [Triangle(1)] → Triangle(p) → pool: one Hebbian layer."""

    def __init__(
        self, in_channels: int, spec: HebbLayerSpec, power_lr: float, radius: float, activation: str = "triangle"
    ) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels, affine=False)
        self.conv = HebbConv2d(
            in_channels,
            spec.channels,
            spec.k,
            t_invert=spec.t_invert,
            eta0=spec.eta0,
            power_lr=power_lr,
            radius=radius,
            pre_triangle=spec.pre_triangle,
        )
        relu = activation == "relu"  # the paper's backprop baseline: ReLU nets of the same widths
        self.pre = Triangle(1.0) if spec.pre_triangle and not relu else nn.Identity()
        self.act = nn.ReLU() if relu else Triangle(spec.p)
        self.pool = make_pool(spec.pool)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.act(self.pre(self.conv(self.bn(x)))))


class HebbClassifier(nn.Module):
    """flatten → dropout → linear: the only layer that sees labels.

    ``standardise`` puts a BatchNorm1d without affine parameters after the flatten (each feature at mean 0 / var 1:
    batch statistics while the classifier trains, their running averages in evaluation). Not in the paper: a
    probe that takes the features' scale out of a comparison (random filters at norm 25 give features, and logits,
    hundreds of times larger than converged ones), like shared/reference/softhebb.md §7's "std" probe, which
    standardises with statistics of the whole training set instead."""

    def __init__(self, in_features: int, num_classes: int, dropout: float, standardise: bool = False) -> None:
        super().__init__()
        self.standardise = nn.BatchNorm1d(in_features, affine=False) if standardise else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.standardise(torch.flatten(x, 1))))


def softhebb_net(
    preset: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int | tuple[int, int] = 32,
    widths: list[int] | None = None,
    t_invert: list[float] | None = None,
    eta0: list[float] | None = None,
    layers: int | None = None,
    radius: float = 25.0,
    dropout: float | None = None,
    activation: str = "triangle",
    standardise: bool = False,
) -> LayeredModel:
    """A SoftHebb network of ``preset`` for inputs of ``in_channels`` × ``image_size``.

    Args:
        widths: channels per Hebbian layer, replacing the preset's (e.g. ``[32, 128]`` for a CPU run); the other
            constants of each layer stay the preset's.
        t_invert: 1/τ per Hebbian layer, replacing the preset's (the paper's appendix B.1/B.2 sweeps it: the
            preset's values were chosen for CIFAR's 3-channel 5×5 patches).
        eta0: η0 per Hebbian layer, replacing the preset's.
        layers: keep only the preset's first ``layers`` Hebbian layers (e.g. 2 of ``softhebb3``: the reference's CPU
            "Net B"); applied before ``widths``.
        radius: initial filter norm r0.
        dropout: the classifier's dropout, replacing the preset's.
        activation: "triangle" (the paper's Triangle(p)) or "relu" (its end-to-end backprop baseline, with
            ``radius=1``: Triangle's powers above 1 and filters at norm 25 make plain SGD diverge).
        standardise: standardise the classifier's input features (:class:`HebbClassifier`; not in the paper).
    """
    if not isinstance(standardise, bool):
        raise UserError(f"standardise={standardise!r}: use true or false")
    if activation not in ("triangle", "relu"):
        raise UserError(f"activation={activation!r}: use triangle or relu")
    specs, preset_dropout, power_lr = PRESETS[preset]
    if layers is not None:
        if not isinstance(layers, int) or not 1 <= layers <= len(specs):
            raise UserError(f"{preset} has {len(specs)} Hebbian layers: layers={layers} must be 1 .. {len(specs)}")
        specs = specs[:layers]
    for field, values, kind in (("channels", widths, int), ("t_invert", t_invert, float), ("eta0", eta0, float)):
        if values is None:
            continue
        values = list(values)
        name = "widths" if field == "channels" else field
        allowed = int if kind is int else (int, float)
        ok = [isinstance(v, allowed) and not isinstance(v, bool) and v > 0 for v in values]
        if len(values) != len(specs) or not all(ok):
            what = "positive integers" if kind is int else "positive numbers"
            raise UserError(f"{preset} has {len(specs)} Hebbian layers: {name}={values} must be {len(specs)} {what}")
        specs = tuple(dataclasses.replace(s, **{field: kind(v)}) for s, v in zip(specs, values))
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    layers: list[nn.Module] = []
    channels = in_channels
    for spec in specs:
        layers.append(SoftHebbBlock(channels, spec, power_lr, radius, activation))
        channels = spec.channels
    with torch.no_grad():  # the classifier's width: one probe of the Hebbian layers (eval: BN stays untouched)
        probe = nn.Sequential(*layers).eval()
        try:
            features = probe(torch.zeros(2, in_channels, *size)).flatten(1).shape[1]
        except RuntimeError as err:
            detail = " ".join(str(err).split())[:160]
            raise UserError(
                f"{preset} cannot run on {in_channels}×{size[0]}×{size[1]} inputs ({detail}): "
                "each pool halves the size, so use larger images or fewer layers"
            ) from None
        probe.train()
    layers.append(
        HebbClassifier(features, num_classes, preset_dropout if dropout is None else dropout, standardise=standardise)
    )
    names = [f"hebb{i + 1}" for i in range(len(specs))] + ["classifier"]
    model = LayeredModel(layers, names=names, stage_of=list(range(len(layers))), arch=preset)
    model.classifier_block = True  # K = Hebbian layers + 1: the classifier learns alone on frozen features
    return model


def hebbian_convs(model: nn.Module) -> list[HebbConv2d]:
    return [m for m in model.modules() if isinstance(m, HebbConv2d)]


for _name in PRESETS:
    _factory = MODELS.register(_name)(lambda _n=_name, **kw: softhebb_net(_n, **kw))
    _factory.sized = True  # create_model passes image_size: the classifier's width depends on it
    # what create_model passes through
    _factory.options = ("widths", "t_invert", "eta0", "layers", "radius", "dropout", "activation", "standardise")
