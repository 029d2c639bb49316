"""VGG-13 with BatchNorm (Simonyan & Zisserman, ICLR 2015, arXiv 1409.1556), DGL's ImageNet network (methods.md §4).

The network is torchvision's ``vgg13_bn`` (10 conv3x3 layers in 5 stages of 2, a 2×2 max-pool after each stage, a
7×7 adaptive average pool and the 4096-4096 MLP classifier with dropout). Its modules are reused as the atomic
layers::

    [conv1_1, conv1_2 (+pool), conv2_1, conv2_2 (+pool), …, conv5_2 (+pool), classifier = avgpool + flatten + MLP]

Each conv unit is conv3x3 + BN + ReLU; each MaxPool is appended to the unit before it, so there are 10 feature
layers, and ``stage_of`` is the pooling stage 1..5 (5 for the classifier). The papers' cut "after conv unit n"
(1-based, n = 1..10) is the cut ``(stage, index in stage)`` of :mod:`locallearn.models.split`.

DGL's splits (eugenium/DGL README): K=10 is layer-wise, one conv unit per block, i.e. ``--split layerwise --K 10``
(no table); K=4 is "block size 3", read as groups of 3 conv units, blocks of 3, 3, 3 and 1 units (the last with
the classifier), which is ``--split dgl --K 4``. Two differences from DGL's own code (``imagenet_dgl/models/vgg.py``)
remain: it prepends each max-pool to the *next* block, so its cut after conv3_2 reads the 28×28 map where ours
reads the pooled 14×14 one (the other K=4 cuts, after conv2_1 and conv5_1, are not next to a pool); and its final
classifier is max-pool + MLP without dropout, where torchvision's is avgpool(7×7) + MLP with dropout.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from torch import Tensor, nn

from locallearn.models.layered import LayeredModel
from locallearn.models.registry import MODELS
from locallearn.models.resnet_imagenet import Classifier, build_torchvision, torchvision_key_map

if TYPE_CHECKING:  # torchvision is imported where it is used: it costs 1.6 s at start-up
    from torchvision.models import VGG


def init_like_torchvision(module: nn.Module) -> None:
    """torchvision's VGG initialisation: conv kaiming-normal (fan-out, ReLU), bias 0; BN weight 1, bias 0, fresh
    running statistics; linear N(0, 0.01), bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def conv_unit(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    """A fresh VGG layer: conv3x3 (stride 1, with bias as in torchvision) + BN + ReLU, for AugLocal's heads.

    VGG never uses strided convolutions, so ``stride > 1`` appends a max-pool of kernel and stride ``stride``
    (``MaxPool2d(2)`` for the usual stride 2) instead. It uses ``ceil_mode=True``, so the output side is
    ``ceil(H / stride)``, the size AugLocal's bookkeeping assumes; on even sides this equals VGG's own pooling.
    """
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, 1, 1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
    if stride > 1:
        layers.append(nn.MaxPool2d(stride, stride, ceil_mode=True))
    unit = nn.Sequential(*layers)
    init_like_torchvision(unit)
    return unit


def from_torchvision(tv_model: VGG, arch: str = "vgg13") -> LayeredModel:
    """Wrap a torchvision VGG with BatchNorm (``vgg13_bn`` and kin) as a :class:`LayeredModel` sharing its modules.

    Args:
        tv_model: e.g. ``torchvision.models.vgg13_bn(weights=None, num_classes=1000)``.
        arch: the name recorded as ``model.arch`` (it selects the split presets).
    """
    units: list[list[nn.Module]] = []
    stage_of: list[int] = []
    names: list[str] = []
    stage, index = 1, 0
    for m in tv_model.features:
        if isinstance(m, nn.Conv2d):
            index += 1
            units.append([m])
            stage_of.append(stage)
            names.append(f"conv{stage}_{index}")
        elif not units:
            raise ValueError(f"{type(m).__name__} before the first convolution: not a VGG feature stack")
        else:
            units[-1].append(m)
            if isinstance(m, nn.MaxPool2d):
                stage, index = stage + 1, 0
    layers: list[nn.Module] = [nn.Sequential(*u) for u in units]
    layers.append(Classifier(tv_model.avgpool, tv_model.classifier))
    names.append("classifier")
    stage_of.append(stage_of[-1])
    return LayeredModel(layers, names=names, stage_of=stage_of, arch=arch, block_factory=conv_unit)


def vgg13(num_classes: int = 1000, in_channels: int = 3) -> LayeredModel:
    """torchvision's ``vgg13_bn`` (untrained) as a :class:`LayeredModel`; ``in_channels != 3`` replaces the first conv.

    The classifier flattens a 512×7×7 map (adaptive pooling, so any input of side ≥ 32 works) into 4096-4096 → classes.
    """
    import torchvision

    tv_model = build_torchvision(torchvision.models.vgg13_bn, init_like_torchvision, num_classes=num_classes)
    if in_channels != 3:
        first = tv_model.features[0]
        tv_model.features[0] = nn.Conv2d(in_channels, first.out_channels, 3, 1, 1)
        init_like_torchvision(tv_model.features[0])
    return from_torchvision(tv_model, "vgg13")


def load_torchvision_state_dict(model: LayeredModel, state_dict: dict[str, Tensor], strict: bool = True) -> None:
    """Load a torchvision ``vgg13_bn`` ``state_dict`` (keys ``features.0.weight``, ``classifier.6.bias``, …)."""
    import torchvision

    key_map = torchvision_key_map(torchvision.models.vgg13_bn, partial(from_torchvision, arch=model.arch))
    model.load_state_dict({key_map.get(k, k): v for k, v in state_dict.items()}, strict=strict)


MODELS.register("vgg13")(vgg13)
