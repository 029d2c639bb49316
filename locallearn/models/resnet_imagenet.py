"""ImageNet ResNets and ResNeXts, built by torchvision and exposed as :class:`LayeredModel`s.

Architectures: ResNet-18/34/50/101/152 (He et al., CVPR 2016, arXiv 1512.03385) and ResNeXt-101 32x8d (Xie et al.,
CVPR 2017, arXiv 1611.05431), the backbones of InfoPro's and MAN's ImageNet experiments (methods.md §1.4, §3.4). The
network is torchvision's own (``torchvision.models.resnet101(weights=None, num_classes=...)``); no copy of it is
written here. Its module objects are reused as the atomic layers::

    [stem = conv1 + bn1 + relu + maxpool, layer1[0], …, layer4[-1], classifier = avgpool + flatten + fc]

named ``"stem"``, ``"layer1.0"``, …, ``"classifier"``, with ``stage_of`` 0 for the stem, 1..4 for layer1..layer4 and
4 for the classifier. The papers' cut "after layerS[i]" is the cut ``(S, i)`` of :mod:`locallearn.models.split`.
Because the modules are torchvision's, its weights map onto ours one to one (:func:`from_torchvision`,
:func:`load_torchvision_state_dict`). The average pooling is adaptive, so any input size works (57×57 as well as
224×224), and ``in_channels != 3`` replaces ``conv1`` by a fresh 7×7 stride-2 convolution.

Registered names: ``resnet18, resnet34, resnet50, resnet101, resnet152, resnext101_32x8d`` (the CIFAR ResNets are
``resnet20/32/56/110``, so the names do not clash).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from locallearn.models.layered import LayeredModel
from locallearn.models.registry import MODELS

if TYPE_CHECKING:  # torchvision is imported where it is used: it costs 1.6 s at start-up
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext101_32x8d")


class Classifier(nn.Module):
    """Pooling, flatten, then the classifier proper: torchvision's ``avgpool`` and ``fc`` (or VGG's MLP), reused."""

    def __init__(self, avgpool: nn.Module, fc: nn.Module) -> None:
        super().__init__()
        self.avgpool = avgpool
        self.fc = fc

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))


def init_like_torchvision(module: nn.Module) -> None:
    """torchvision's ResNet initialisation: conv kaiming-normal (fan-out, ReLU); norm weight 1, bias 0 and fresh
    running statistics; linear layers PyTorch's default (torchvision leaves ``fc`` at it)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.Linear)):
            m.reset_parameters()


def build_torchvision(
    constructor: Callable[..., nn.Module], init: Callable[[nn.Module], None], **kwargs: Any
) -> nn.Module:
    """``constructor(weights=None, **kwargs)`` built on the meta device, then allocated and initialised once by
    ``init``. Same network and same initial distribution as torchvision's own construction, 2-3× faster on CPU
    (torchvision initialises every layer twice: PyTorch's default, then its own)."""
    from torch._guards import detect_fake_mode

    if detect_fake_mode() is not None:  # memory estimation: meta tensors cannot enter FakeTensorMode
        model = constructor(weights=None, **kwargs)
    else:
        with torch.device("meta"):
            model = constructor(weights=None, **kwargs)
        model = model.to_empty(device=torch.get_default_device())
    init(model)
    return model


def make_block(
    block: type[BasicBlock] | type[Bottleneck], groups: int, base_width: int, in_ch: int, out_ch: int, stride: int
) -> nn.Module:
    """A fresh torchvision residual block mapping ``in_ch`` to ``out_ch`` channels at ``stride`` (AugLocal's heads).

    A Bottleneck's output is ``planes·4`` channels, so ``planes = out_ch // 4``; ResNeXt keeps its ``groups`` and
    width per group. A 1×1 conv + BN shortcut is added when the stride or the width changes, as torchvision does.
    """
    planes = out_ch
    from torchvision.models.resnet import Bottleneck

    if block is Bottleneck:
        if out_ch % Bottleneck.expansion:
            raise ValueError(f"a Bottleneck outputs a multiple of 4 channels, not {out_ch}")
        planes = out_ch // Bottleneck.expansion
    downsample = None
    if stride != 1 or in_ch != out_ch:
        downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
    layer = block(in_ch, planes, stride, downsample, groups, base_width)
    init_like_torchvision(layer)
    return layer


def from_torchvision(tv_model: ResNet, arch: str) -> LayeredModel:
    """Wrap a torchvision ``ResNet`` as a :class:`LayeredModel` that *shares* its modules (no copies).

    Args:
        tv_model: e.g. ``torchvision.models.resnet101(weights=None, num_classes=1000)``, pretrained or not.
        arch: the name recorded as ``model.arch`` (it selects the split presets).
    """
    stem = nn.Sequential(
        OrderedDict(conv1=tv_model.conv1, bn1=tv_model.bn1, relu=tv_model.relu, maxpool=tv_model.maxpool)
    )
    layers: list[nn.Module] = [stem]
    names, stage_of = ["stem"], [0]
    for stage in range(1, 5):
        for i, block in enumerate(getattr(tv_model, f"layer{stage}")):
            layers.append(block)
            names.append(f"layer{stage}.{i}")
            stage_of.append(stage)
    layers.append(Classifier(tv_model.avgpool, tv_model.fc))
    names.append("classifier")
    stage_of.append(4)
    factory = partial(make_block, type(tv_model.layer1[0]), tv_model.groups, tv_model.base_width)
    return LayeredModel(layers, names=names, stage_of=stage_of, arch=arch, block_factory=factory)


def imagenet_resnet(arch: str, num_classes: int = 1000, in_channels: int = 3) -> LayeredModel:
    """Build torchvision's ``arch`` (untrained, torchvision's initialisation) as a :class:`LayeredModel`.

    Args:
        arch: one of :data:`ARCHS`.
        num_classes: outputs of ``fc``.
        in_channels: image channels; other than 3 replaces ``conv1`` (7×7, stride 2, 64 filters).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown ImageNet ResNet {arch!r}: choose one of {', '.join(ARCHS)}")
    import torchvision

    tv_model = build_torchvision(getattr(torchvision.models, arch), init_like_torchvision, num_classes=num_classes)
    if in_channels != 3:
        tv_model.conv1 = nn.Conv2d(in_channels, tv_model.conv1.out_channels, 7, 2, 3, bias=False)
        init_like_torchvision(tv_model.conv1)
    return from_torchvision(tv_model, arch)


def torchvision_key_map(build: Callable[[], nn.Module], wrap: Callable[[nn.Module], LayeredModel]) -> dict[str, str]:
    """torchvision state-dict key → our key, found by tensor identity on a meta-device copy (no memory, no init).

    Args:
        build: makes the torchvision model (e.g. ``torchvision.models.resnet50``).
        wrap: turns it into a LayeredModel sharing its modules (e.g. :func:`from_torchvision`).
    """
    with torch.device("meta"):
        tv_model = build()
        ours = wrap(tv_model)
    key_of = {id(t): k for k, t in ours.state_dict(keep_vars=True).items()}
    return {k: key_of[id(t)] for k, t in tv_model.state_dict(keep_vars=True).items()}


def load_torchvision_state_dict(model: LayeredModel, state_dict: dict[str, Tensor], strict: bool = True) -> None:
    """Load a torchvision ResNet ``state_dict`` (e.g. pretrained ImageNet weights) into ``model``.

    Args:
        model: built by ``create_model("resnet50", ...)`` with the checkpoint's ``num_classes`` and ``in_channels``.
        state_dict: keys as torchvision names them (``conv1.weight``, ``layer2.3.bn1.running_mean``, ``fc.bias``).
        strict: as in ``nn.Module.load_state_dict``.
    """
    import torchvision

    key_map = torchvision_key_map(getattr(torchvision.models, model.arch), partial(from_torchvision, arch=model.arch))
    model.load_state_dict({key_map.get(k, k): v for k, v in state_dict.items()}, strict=strict)


for _arch in ARCHS:
    MODELS.register(_arch)(partial(imagenet_resnet, _arch))
