"""CIFAR-style ResNets (He et al. 2016, §4.2): ResNet-20/32/56/110 with stage widths 16/32/64.

The network is exposed as a flat list of *atomic layers* — ``[stem, block(1,0), …, block(3,n-1), classifier]`` — which
is what the splitter cuts (STYLE.md §3). The stem is conv3x3 + BN + ReLU; each residual block is a post-activation
BasicBlock; the classifier is global average pooling + a linear layer. Any number of input channels and any input
size work (the classifier pools globally), so 28×28×1 Fashion-MNIST runs without padding.

Layer index ↔ the papers' (stage, block) names: the stem is layer 0, and block (s, i) with s ∈ {1,2,3},
0 ≤ i < n is layer ``1 + (s-1)·n + i``; the classifier is the last layer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from locallearn.models.layered import LayeredModel
from locallearn.models.registry import MODELS


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut, then ReLU. Downsampling uses a 1×1 conv + BN shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Stem(nn.Sequential):
    """conv3x3 (stride 1) + BN + ReLU: the CIFAR ResNet's first layer."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )


class Classifier(nn.Module):
    """Global average pooling + linear layer: the network's real head, always part of the last block."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def reference_conv_init(module: nn.Module) -> None:
    """The InfoPro/MAN init loop: conv weight ~ N(0, 2/(k·k·C_out)) (He, fan-out), conv bias and linear layers left as
    PyTorch made them, BN weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_weights(module: nn.Module) -> None:
    """The InfoPro/MAN CIFAR initialisation (:func:`reference_conv_init`), plus linear biases set to 0."""
    reference_conv_init(module)
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def cifar_resnet(
    depth: int, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, ...] = (16, 16, 32, 64)
) -> LayeredModel:
    """Build a CIFAR ResNet of ``depth = 6n + 2`` as a :class:`LayeredModel`.

    Args:
        depth: 20, 32, 56, 110, or any 6n+2.
        num_classes: outputs of the classifier.
        in_channels: channels of the input image.
        widths: stem width, then the width of stages 1, 2, 3 (the papers use 16, 16, 32, 64).
    """
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110), got {depth}")
    n = (depth - 2) // 6
    layers: list[nn.Module] = [Stem(in_channels, widths[0])]
    in_planes = widths[0]
    for stage, planes in enumerate(widths[1:]):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(BasicBlock(in_planes, planes, stride))
            in_planes = planes
    layers.append(Classifier(in_planes, num_classes))
    names = ["stem"] + [f"layer{s + 1}.{i}" for s in range(3) for i in range(n)] + ["classifier"]
    stage_of = [0] + [s + 1 for s in range(3) for _ in range(n)] + [3]
    model = LayeredModel(layers, names=names, stage_of=stage_of, arch=f"resnet{depth}", block_factory=BasicBlock)
    init_weights(model)
    return model


def stage_block_to_layer(depth: int, stage: int, block: int) -> int:
    """Map the papers' (stage, block) coordinates to a layer index; (0, 0) is the stem."""
    n = (depth - 2) // 6
    if stage == 0:
        return 0
    if not (1 <= stage <= 3 and 0 <= block < n):
        raise ValueError(f"no block ({stage}, {block}) in resnet{depth}")
    return 1 + (stage - 1) * n + block


for _depth in (20, 32, 56, 110):
    MODELS.register(f"resnet{_depth}")(lambda _d=_depth, **kw: cifar_resnet(_d, **kw))
