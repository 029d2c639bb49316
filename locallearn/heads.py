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


def parse_head_spec(spec: str) -> tuple[int, int]:
    """``"1c2f"`` → (1 conv layer, 2 fully connected layers): InfoPro's auxiliary-classifier names as a grammar."""
    import re

    from locallearn.errors import UserError

    match = re.fullmatch(r"(\d+)c(\d+)f", spec)
    if not match or int(match.group(2)) < 1:
        raise UserError(f"head spec {spec!r} is not of the form <n>c<m>f with m >= 1 (e.g. 1c2f, 2c2f, 0c1f)")
    return int(match.group(1)), int(match.group(2))


def conv_fc_head(spec: str, shape: Shape, num_outputs: int, final_width: int, hidden: int = 128) -> nn.Sequential:
    """InfoPro's auxiliary classifier family (``auxiliary_nets.py``: 0c1f … 2c2f), read from ``spec``.

    The first conv doubles the width with stride 2 until the network's final width is reached (16→32, 32→64, then
    64→64 at stride 1 in a CIFAR ResNet); further convs keep width and stride 1. Then global average pooling and
    ``m`` linear layers: ``m-1`` of width ``hidden`` with ReLU, then one to ``num_outputs``.

    Args:
        spec: "<n>c<m>f".
        shape: (C, H, W) of the input.
        num_outputs: classes (cross-entropy) or the contrastive feature dimension.
        final_width: channels of the network's last feature map (the doubling stops there).
        hidden: width of the hidden linear layers (InfoPro's ``feature_dim``, 128).
    """
    n_conv, n_fc = parse_head_spec(spec)
    c = shape[0]
    layers: list[nn.Module] = []
    for i in range(n_conv):
        if i == 0 and c < final_width:
            layers += conv_bn_relu(c, min(2 * c, final_width), stride=2)
            c = min(2 * c, final_width)
        else:
            layers += conv_bn_relu(c, c)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    for _ in range(n_fc - 1):
        layers += [nn.Linear(c, hidden), nn.ReLU(inplace=True)]
        c = hidden
    layers.append(nn.Linear(c, num_outputs))
    return nn.Sequential(*layers)


class Decoder(nn.Module):
    """InfoPro's reconstruction decoder: bilinear upsampling to the image size, conv3x3 (C → ``width``) + BN + ReLU,
    conv3x3 (→ image channels), sigmoid. Its output is compared with the un-normalised image in [0, 1]."""

    def __init__(self, shape: Shape, image_shape: Shape, width: int = 12) -> None:
        super().__init__()
        self.size = tuple(image_shape[1:])
        self.body = nn.Sequential(
            *conv_bn_relu(shape[0], width), nn.Conv2d(width, image_shape[0], 3, 1, 1), nn.Sigmoid()
        )

    def forward(self, h):
        if tuple(h.shape[-2:]) != self.size:
            h = nn.functional.interpolate(h, size=self.size, mode="bilinear", align_corners=True)
        return self.body(h)
