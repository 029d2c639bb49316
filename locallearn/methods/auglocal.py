"""AugLocal: augmented local learning (Ma et al., ICLR 2024, arXiv 2402.17318).

Each block k < K-1 is trained by the cross-entropy of an auxiliary net built from the *primary network itself*: a
uniformly spaced subset of the layers that follow block k's last layer, always ending with the last feature layer, so
the head sees roughly the features the rest of the network would compute. The selected layers are fresh instances of
the network's own layer type (``model.block_factory``, no weight sharing), followed by global average pooling, BN1d
when the head is one layer deep, and a linear classifier. With ``pyramid`` the depth falls linearly from d at the first
block to about d(1-τ)+τ at the last local block, since later blocks have fewer layers left to imitate.

K bookkeeping quirk: the reference merges the last d layers into the final module (``local_module_num = K - d``), so
its "ResNet-32, K=16, d=2" is ``--split layerwise --K 14`` here. This method takes whatever split it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from locallearn.errors import UserError
from locallearn.feature_heads import MAPS, ChannelsFirst, sequence_head
from locallearn.methods.base import LocalMethod, LocalOutput, MethodConfig, SetupInfo, register_method
from locallearn.models.resnet_cifar import init_weights


@dataclass
class AugLocalConfig(MethodConfig):
    """Attributes:
    depth: auxiliary depth d, the number of primary layers sampled into the first block's head (``--aux_net_depth``).
    pyramid: shrink the depth linearly with the block index (the paper's pyramidal depth, ``--pyramid``).
    pyramid_coeff: τ, how far the depth falls: the last local block gets about d(1-τ)+τ (``--pyramid_coeff``).
    """

    depth: int = 2
    pyramid: bool = True
    pyramid_coeff: float = 0.5


def sampled_layers(last: int, num_layers: int, depth: int) -> list[int]:
    """Indices of the feature layers that make the head of a block ending at layer ``last``.

    Args:
        last: index l of the block's last layer (stem = 0).
        num_layers: L, the number of feature layers (the classifier excluded).
        depth: d, the auxiliary depth.
    """
    if depth >= num_layers - 1 - last:
        return list(range(last + 1, num_layers))
    # Python 3 ``round`` (banker's rounding, 2.5 -> 2) on purpose: it is what the reference code evaluates, so the
    # sampled layers match it exactly; math.floor(x + 0.5) would pick a later layer on exact ties.
    return [round(last + (num_layers - last - 1) * i / depth) for i in range(1, depth + 1)]


def pyramid_depths(num_blocks: int, depth: int, coeff: float, pyramid: bool = True) -> list[int]:
    """Auxiliary depth d_i of each local block i = 0..K-2 (the last block uses the real classifier)."""
    local = max(num_blocks - 1, 0)
    if not pyramid or num_blocks <= 2:
        return [depth] * local
    steps = [i * coeff / (num_blocks - 2) for i in range(local)]
    return [max(1, round(depth * (1 - s) + s)) for s in steps]  # Python round, as in sampled_layers


@register_method("auglocal")
class AugLocal(LocalMethod):
    config_class = AugLocalConfig
    config: AugLocalConfig

    def build_aux(self, info: SetupInfo) -> None:
        cfg = self.config
        if cfg.depth < 1:
            raise UserError(f"auglocal depth={cfg.depth} must be at least 1 (the paper uses 1, 2, 3 or 5)")
        num_heads = len(info.blocks) - 1
        factory = getattr(info.model, "block_factory", None)
        fresh = getattr(info.model, "fresh_layer", None)
        if num_heads > 0 and ((factory is None and fresh is None) or info.layer_shapes is None or info.bounds is None):
            arch = getattr(info.model, "arch", type(info.model).__name__)
            raise UserError(
                f"auglocal needs a model that can build fresh layers (a block_factory or a traced model), and {arch} "
                "has none: use a CIFAR ResNet (resnet20/32/56/110), your own nn.Module, or another method"
            )
        depths = pyramid_depths(len(info.blocks), cfg.depth, cfg.pyramid_coeff, cfg.pyramid)
        build = self._build_head if factory is not None else self._build_copied_head
        self.heads = nn.ModuleList(build(k, depths[k], info) for k in range(num_heads))

    def _build_head(self, k: int, depth: int, info: SetupInfo) -> nn.Sequential:
        """Fresh copies of the sampled later layers, then GAP, (BN1d if depth <= 1), Linear → classes."""
        channels, height, _ = self.aux_shape(k, info)
        layers: list[nn.Module] = []
        for j in sampled_layers(info.bounds[k] - 1, len(info.layer_shapes) - 1, depth):
            out_channels, out_height, _ = info.layer_shapes[j]
            # Shape-driven stride, so skipping a stage still downsamples. Ceiling division reproduces the backbone's
            # stride-2 rounding (7 -> 4) on odd sizes; it equals H // H' whenever H' divides H (32, 28, 96 inputs).
            stride = max(1, -(-height // out_height))
            layers.append(info.model.block_factory(channels, out_channels, stride))
            channels, height = out_channels, (height - 1) // stride + 1
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if depth <= 1:  # the reference adds BN1d only to the shallowest heads
            layers.append(nn.BatchNorm1d(channels))
        layers.append(nn.Linear(channels, info.num_classes))
        head = nn.Sequential(*layers)
        init_weights(head)
        return head

    def _build_copied_head(self, k: int, depth: int, info: SetupInfo) -> nn.Sequential:
        """For a traced model: fresh, re-initialised copies of the sampled later segments (each layer's own
        ``reset_parameters``), an adapter wherever the tensor a copy reads differs from what precedes it
        (:func:`adapter`: a skipped stage), then the classifier for the last copy's output."""
        shape, layout = self.aux_shape(k, info), self.aux_layout(k, info)
        layers: list[nn.Module] = []
        for j in sampled_layers(info.bounds[k] - 1, len(info.layer_shapes) - 1, depth):
            want, want_layout = info.layer_shapes[j - 1], info.layout(j - 1)
            if (shape, layout) != (want, want_layout):
                layers.append(adapter(shape, layout, want, want_layout))
            layers.append(info.model.fresh_layer(j))
            shape, layout = info.layer_shapes[j], info.layout(j)
        if layout in MAPS:
            layers += [*([ChannelsFirst()] if layout == "nhwc" else []), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            if depth <= 1:
                layers.append(nn.BatchNorm1d(shape[0]))
            layers.append(nn.Linear(shape[0], info.num_classes))
        else:
            layers.append(sequence_head(shape, layout, info.num_classes, hidden_layers=0, token_pool=info.token_pool))
        return nn.Sequential(*layers)

    def block_params(self, k: int) -> list[nn.Parameter]:
        return list(self.heads[k].parameters()) if k < len(self.heads) else []

    def aux_loss(self, k: int, h: Tensor, batch: Any) -> LocalOutput:
        logits = self.aux_segment((self.heads[k],), self.heads[k], self.aux_input(k, h))
        return LocalOutput(self.task_loss(logits, batch), logits)

    @torch.no_grad()
    def aux_logits(self, k: int, h: Tensor) -> Tensor | None:
        return self.heads[k](self.aux_input(k, h)) if k < len(self.heads) else None


class _Resize(nn.Module):
    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) == self.size:
            return x
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


class _ChannelsLast(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


def adapter(shape: tuple, layout: str, want: tuple, want_layout: str) -> nn.Module:
    """Map a block's output to the input a later (copied) segment expects: for maps, conv1x1 to its width and a
    bilinear resize to its resolution (in its layout); for tokens of another width, a Linear."""
    if layout in MAPS and want_layout in MAPS:
        layers: list[nn.Module] = [ChannelsFirst()] if layout == "nhwc" else []
        if shape[0] != want[0]:
            layers.append(nn.Conv2d(shape[0], want[0], 1, bias=False))
        layers.append(_Resize(tuple(want[1:])))
        if want_layout == "nhwc":
            layers.append(_ChannelsLast())
        return nn.Sequential(*layers)
    if layout == want_layout == "tokens" and shape[0] == want[0]:
        return nn.Linear(shape[1], want[1])
    raise UserError(
        f"auglocal cannot feed a {layout} {tuple(shape)} block output to a later segment that reads {want_layout} "
        f"{tuple(want)}: use --method.depth=1 or another method"
    )
