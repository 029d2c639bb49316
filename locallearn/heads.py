"""Auxiliary networks built from a probed feature shape ``(C, H, W)``, never from width tables (STYLE.md §4).

Each builder takes the shape of the tensor the head reads and the number of outputs, so the same code serves a
16-channel 32×32 CIFAR block, a 28×28×1 Fashion-MNIST block and a 1024-channel 14×14 ImageNet block.
"""

from __future__ import annotations

import itertools
import math
import re

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from locallearn.errors import UserError

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


def bilinear_matrix(n_in: int, n_out: int) -> Tensor:
    """``[n_out, n_in]`` float64 matrix of 1-D bilinear resampling with ``align_corners=True``: row i holds the weights
    ``F.interpolate`` gives to the inputs around ``src = i·(n_in − 1)/(n_out − 1)``."""
    src = torch.arange(n_out, dtype=torch.float64) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    lo = src.floor().long().clamp(max=n_in - 1)
    frac = src - lo
    rows = torch.arange(n_out)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, (lo + 1).clamp(max=n_in - 1)), frac, accumulate=True)
    return m


def shifted_taps(m: Tensor) -> Tensor:
    """``[3, n_out, n_in]``: tap t of a 3-tap, padding-1 convolution reads row ``i + t − 1`` of ``m``; rows outside
    are zero, which is exactly the convolution's zero padding of the upsampled image."""
    n = m.shape[0]
    padded = F.pad(m, (0, 0, 1, 1))
    return torch.stack([padded[t : t + n] for t in range(3)])


def upsampled_conv_macs(c_in: int, c_out: int, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[int, int]:
    """Multiply-adds per image of "upsample to ``out_hw``, then conv3x3 ``c_in → c_out``": (direct, factored)."""
    (p, q), (h, w) = in_hw, out_hw
    direct = 9 * c_out * c_in * h * w
    factored = 9 * c_out * c_in * p * q + 9 * c_out * p * q * w + 3 * c_out * p * h * w
    return direct, factored


class Decoder(nn.Module):
    """InfoPro's reconstruction decoder: bilinear upsampling to the image size, conv3x3 (C → ``width``) + BN + ReLU,
    conv3x3 (→ image channels), sigmoid. Its output is compared with the un-normalised image in [0, 1].

    Two exact forms of "upsample, then the first conv3x3" (``form``):

    * ``"direct"``: ``F.interpolate`` to the image size, then the conv at full resolution (the released code).
    * ``"factored"``: the same linear map evaluated in the cheaper order. Upsampling acts on each channel alone and
      the conv's nine taps are each a channel mix followed by a one-pixel shift, so the channel mix commutes with the
      upsampling: a conv1x1 with 9·width outputs at the block's own (low) resolution, then, per axis, one matrix
      product that upsamples and applies the tap shifts (and the conv's zero padding) at once. For a 64-channel 8×8
      map decoded to 32×32 that is 7× fewer multiply-adds and far less memory traffic (no 64-channel 32×32 tensor);
      it agrees with the direct form to float64 rounding (``tests/test_decoder.py``). Same parameters, same
      ``state_dict``: only the order of arithmetic differs.
    * ``"auto"`` (default): factored where it needs at most half the direct form's multiply-adds
      (:func:`upsampled_conv_macs`), else direct. On a 32×32 ResNet that is the 8×8 maps (×4 upsampling) but not the
      16×16 ones, where the two forms measured about equal on a CPU.
    """

    def __init__(self, shape: Shape, image_shape: Shape, width: int = 12, form: str = "auto") -> None:
        super().__init__()
        if form not in ("auto", "direct", "factored"):
            raise UserError(f"unknown decoder form {form!r}: use auto, direct or factored")
        self.size = tuple(image_shape[1:])
        self.body = nn.Sequential(
            *conv_bn_relu(shape[0], width), nn.Conv2d(width, image_shape[0], 3, 1, 1), nn.Sigmoid()
        )
        self.in_hw = tuple(shape[1:])
        direct, factored = upsampled_conv_macs(shape[0], width, self.in_hw, self.size)
        self.factored = self.in_hw != self.size and (form == "factored" or (form == "auto" and 2 * factored <= direct))
        if self.factored:
            (p, q), (h, w) = self.in_hw, self.size
            # row_map[i, (ky, p)] and col_map[(kx, q), j]: upsampling and tap shift of each axis as one matrix. The
            # float64 originals are kept so that every dtype conversion rounds them once (see _apply); the buffers
            # are not persistent, so checkpoints stay exactly those of the direct form.
            self._exact = {
                "row_map": shifted_taps(bilinear_matrix(p, h)).permute(1, 0, 2).reshape(h, 3 * p),
                "col_map": shifted_taps(bilinear_matrix(q, w)).permute(0, 2, 1).reshape(3 * q, w),
            }
            for name, exact in self._exact.items():
                self.register_buffer(name, exact.float(), persistent=False)

    def _apply(self, fn, recurse=True):
        """Follow ``.to()``/``.double()``/… like any buffer, but re-round the maps from float64 each time, so that
        ``.float()`` then ``.double()`` does not leave float32-rounded maps in a float64 decoder."""
        super()._apply(fn, recurse)
        if self.factored:
            for name, exact in self._exact.items():
                target = getattr(self, name)  # already converted by super(): the dtype and device wanted
                setattr(self, name, exact.to(target.device, target.dtype))
        return self

    def _factored_conv(self, h: Tensor) -> Tensor:
        conv = self.body[0]
        b, c, p, q = h.shape
        o = conv.out_channels
        taps = F.conv2d(h, conv.weight.permute(0, 2, 3, 1).reshape(o * 9, c, 1, 1))  # [B, (o, ky, kx), P, Q]
        taps = taps.reshape(b, o, 3, 3, p, q).transpose(3, 4).reshape(b, o, 3, p, 3 * q)  # [B, o, ky, P, (kx, Q)]
        along_x = taps @ self.col_map.to(taps.dtype)  # [B, o, ky, P, W]; .to is a no-op unless under autocast
        y = self.row_map.to(taps.dtype) @ along_x.reshape(b, o, 3 * p, -1)  # [B, o, H, W]
        return y if conv.bias is None else y + conv.bias.view(1, -1, 1, 1)

    def forward(self, h: Tensor) -> Tensor:
        if self.factored and tuple(h.shape[-2:]) == self.in_hw:
            h = self._factored_conv(h)
            for module in itertools.islice(self.body, 1, None):  # body[1:] would build a Sequential every step
                h = module(h)
            return h
        if tuple(h.shape[-2:]) != self.size:
            h = nn.functional.interpolate(h, size=self.size, mode="bilinear", align_corners=True)
        return self.body(h)


def bottleneck_head(shape: Shape, num_outputs: int, final_width: int) -> nn.Sequential:
    """MAN's and InfoPro*'s ImageNet auxiliary classifier (MAN ``Exp on ImageNet/networks/InfoProAux.py``, methods.md
    §1.4; InfoPro's Table 4 runs use the same one, §3.4).

    conv1x1 C → C/4, BN, ReLU; conv3x3 stride 2 → F/8, BN, ReLU; conv3x3 stride 2 → F/4, BN, ReLU; conv1x1 → F, BN,
    ReLU; global average pooling; Linear F → ``num_outputs``; F is ``final_width`` (2048 in a Bottleneck ResNet),
    convs without bias. On a 512-channel layer2 map this is §1.4's head, 512→128→256→512→2048. On a 1024-channel
    layer3 map it is 1024→256→256→512→2048, which is what the released code builds for 1024 channels (§1.4 only says
    "the same pattern starting with 1024→256"): the middle widths follow the network's final width, not C, so the
    literal C/4→C/2→C reading (256→512→1024) is *not* used.

    Args:
        shape: (C, H, W) of the input.
        num_outputs: classes, or the contrastive feature dimension.
        final_width: channels of the network's last feature map (the probed classifier input width).
    """
    c, f = shape[0], final_width
    w1, w2, w3 = max(1, c // 4), max(1, f // 8), max(1, f // 4)
    return nn.Sequential(
        *conv_bn_relu(c, w1, kernel=1),
        *conv_bn_relu(w1, w2, stride=2),
        *conv_bn_relu(w2, w3, stride=2),
        *conv_bn_relu(w3, f, kernel=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(f, num_outputs),
    )


def _ladder_width(level: int) -> int:
    """Decoder width of a conv whose output is 1/2**level of the image side: 12, 32, 64, then doubling."""
    return {1: 12, 2: 32}.get(level, 64 * 2 ** max(0, level - 3))


class UpsamplingDecoder(nn.Sequential):
    """MAN's and InfoPro*'s ImageNet reconstruction decoder (MAN ``InfoProAux.py``, methods.md §1.4).

    conv1x1 C → w0, BN, ReLU; then n times [bilinear upsampling (``align_corners=True``) to about twice the size,
    conv → w, BN, ReLU], the last of them replaced by conv3x3 → image channels and a sigmoid. n is the number of
    doublings that reach the image size; the upsampling targets are ``ceil(S / 2**j)``, so the last lands exactly on
    the image size even when the ratio is not a power of two. The rule, chosen to reproduce the released code:

    * w0 = 64 + C/8: 128 for C = 512 (§1.4) and 192 for C = 1024 (§1.4's "1024→192");
    * a conv whose output is 1/2**j of the image side has width 12 (j = 1), 32 (j = 2), 64 (j = 3) and doubles for
      each further level; it is 3×3 for j ≤ 2 and 1×1 for j ≥ 3;
    * convs keep their bias (the released decoder's do).

    So 512×28×28 → 3×224×224 is §1.4's 128 → (56) 32 → (112) 12 → (224) 3, and 1024×14×14 is 192 → (28, 1×1) 64 →
    (56) 32 → (112) 12 → (224) 3. §1.4 gives only the 192 start for 1024 channels; the 64-wide 1×1 stage at 28×28 is
    read from the released ``InfoProAux.py``. Other C and sizes follow the same rule, unpublished.

    Args:
        shape: (C, H, W) of the input features.
        image_shape: (C, H, W) of the image to reconstruct.
    """

    def __init__(self, shape: Shape, image_shape: Shape) -> None:
        c, h, w = shape
        image_c, image_h, image_w = image_shape
        n = 0
        while h * 2**n < image_h or w * 2**n < image_w:
            n += 1
        width = 64 + c // 8
        layers: list[nn.Module] = [nn.Conv2d(c, width, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        for level in range(n - 1, 0, -1):
            size = (math.ceil(image_h / 2**level), math.ceil(image_w / 2**level))
            out, kernel = _ladder_width(level), 3 if level <= 2 else 1
            layers += [
                nn.Upsample(size=size, mode="bilinear", align_corners=True),
                nn.Conv2d(width, out, kernel, 1, kernel // 2),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            width = out
        if (h, w) != (image_h, image_w):
            layers.append(nn.Upsample(size=(image_h, image_w), mode="bilinear", align_corners=True))
        layers += [nn.Conv2d(width, image_c, 3, 1, 1), nn.Sigmoid()]
        super().__init__(*layers)


def infopro_head(spec: str, shape: Shape, num_outputs: int, final_width: int, hidden: int = 128) -> nn.Sequential:
    """InfoPro's auxiliary classifier by name: ``"bottleneck"`` (:func:`bottleneck_head`, ImageNet) or a
    ``"<n>c<m>f"`` spec (:func:`conv_fc_head`, CIFAR)."""
    if spec == "bottleneck":
        return bottleneck_head(shape, num_outputs, final_width)
    if not re.fullmatch(r"\d+c\d+f", spec):
        raise UserError(f"head {spec!r} is neither 'bottleneck' nor of the form <n>c<m>f (e.g. 1c2f, 2c2f)")
    return conv_fc_head(spec, shape, num_outputs, final_width, hidden)


def infopro_decoder(kind: str, shape: Shape, image_shape: Shape, width: int = 12, form: str = "auto") -> nn.Module:
    """InfoPro's reconstruction decoder by name: ``"infopro"`` (:class:`Decoder`, CIFAR; ``form`` is its order of
    arithmetic) or ``"upsampling"`` (:class:`UpsamplingDecoder`, ImageNet; ``width`` and ``form`` are not used)."""
    if kind == "infopro":
        return Decoder(shape, image_shape, width, form)
    if kind == "upsampling":
        return UpsamplingDecoder(shape, image_shape)
    raise UserError(f"unknown decoder {kind!r}: use infopro (CIFAR) or upsampling (ImageNet)")
