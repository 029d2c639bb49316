"""Auxiliary networks built from a probed feature shape ``(C, H, W)``, never from width tables (STYLE.md §4).

Each builder takes the shape of the tensor the head reads and the number of outputs, so the same code serves a
16-channel 32×32 CIFAR block, a 28×28×1 Fashion-MNIST block and a 1024-channel 14×14 ImageNet block.
"""

from __future__ import annotations

import math

from torch import nn

Shape = tuple[int, int, int]  # (C, H, W) of one example


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


def dgl_mlp_sr(shape: Shape, num_outputs: int, n_conv: int = 3, n_mlp: int = 3) -> nn.Sequential:
    """DGL's auxiliary net "MLP-SR" (Belilovsky et al., ICML 2020; eugenium/DGL ``auxiliary_nets_study``).

    Average-pool to ``ceil(S/4)`` per side (16× fewer positions), ``n_conv`` × [conv1x1 C→C, BN, ReLU], average-pool
    to 2×2, flatten to 4C, ``n_mlp`` × [Linear 4C→4C, BN1d, ReLU], Linear → ``num_outputs``. Spatial reduction first is
    what keeps this head cheap next to the block it trains.
    """
    c, h, w = shape
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d((math.ceil(h / 4), math.ceil(w / 4)))]
    for _ in range(n_conv):
        layers += conv_bn_relu(c, c, kernel=1)
    layers += [nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten()]
    width = 4 * c
    for _ in range(n_mlp):
        layers += [nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)
