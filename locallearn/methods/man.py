"""MAN: Momentum Auxiliary Network (Su et al., ECCV 2024, arXiv 2407.05623) and MAN++ (TPAMI 2026, arXiv 2507.16279).

MAN lets information from downstream reach block k without any gradient crossing a boundary. Before block k's
auxiliary heads, its output h_k goes through two copies of the *first layer of block k+1*:

* EMA_k — frozen (``requires_grad=False``, in no optimizer), updated after steps as
  p_ema ← m·p_ema + (1−m)·p_live (the paper's γ_j ← m·γ_j + (1−m)·θ_{j+1}, m = 0.995);
* LB_k — a trainable copy, the "learnable bias" b_j, trained by block k's local loss.

The heads read y_k = LB_k(h_k) + EMA_k(h_k) (MAN), or y_k = s_k·LB_k(h_k) + (2−s_k)·EMA_k(h_k) with a learnable
scalar s_k initialised to 1 (MAN++'s "learnable scaling bias"). The heads are those of the base method (DGL's MLP-SR
or InfoPro's decoder + classifier), sized for the next layer's output shape, found by probing.

Choices, each an option (methods.md §1.3, §8):

* ``copy_init="live"`` (default): EMA_k and LB_k start as copies of the live layer, so the EMA tracks it from step
  one. ``"random"`` re-initialises both independently, as the released code does (its init loop runs after the
  deep copies), so the EMA needs ~1/(1−m) = 200 steps to forget its random start.
* ``ema_timing="after_next_step"`` (default, the paper's order): EMA_k is updated right after block k+1's optimizer
  step, from the just-updated live layer. ``"before_next_step"`` updates it after block k's step, before block k+1's
  (the released code's one-step lag: one ``optimizer.step()`` after all backwards, EMA inside the forward).
* BatchNorm running statistics are not averaged: each copy keeps its own, from its own forward passes (the EMA copy
  runs in train mode, so it normalises with batch statistics during training, as in the reference).
* λ ramp (InfoPro heads): InfoPro's by-block ramp by default; ``lambda_ramp="stage"`` reproduces MAN's code.

MAN++'s other change, the stem as a block of its own, is a split: ``--split man++`` (or ``infopro`` for ResNet-32
K=16).

Deeper auxiliary nets (``aux_blocks``): MAN++'s released ViT code (``vit_man.py``, methods.md §2.1) follows the fused
copies with one more trainable transformer block — a copy of the *second* layer of block k+1 — before a LayerNorm and a
linear head on the class token. ``aux_blocks=n`` adds copies of layers 2 .. n+1 of block k+1 (counting from its
first) behind the copies, for any model: trainable, in block k's optimizer, initialised as ``copy_init`` says. The
released ViT form is ``--method dgl+man++ --method.aux_blocks=1 --method.n_mlp=0`` (DGL's head on tokens with no
hidden layer is exactly LayerNorm → class token → Linear), with ``copy_init=random`` and
``ema_timing=before_next_step`` as released (presets ``manpp/imagenet_vit_*_k4``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from locallearn.errors import UserError
from locallearn.heads import Shape
from locallearn.methods.base import MethodConfig, SetupInfo, register_method
from locallearn.methods.dgl import DGL, DGLConfig
from locallearn.methods.infopro import InfoPro, InfoProConfig
from locallearn.models.resnet_cifar import init_weights
from locallearn.module_copy import clone_module


@torch.no_grad()
def reinitialise(module: nn.Module) -> None:
    """``copy_init="random"``: fresh weights for a copy, drawn as the released code's init loop draws them — the
    InfoPro/MAN CIFAR init for convolutions and BatchNorm (:func:`init_weights`), and for the transformer layers of
    MAN++'s ViT code truncated-normal linear weights (std 0.02) with zero biases and LayerNorm at weight 1, bias 0.
    A parameter no rule covers (a LayerScale) keeps its copied value, which is its initial value when the model is
    new."""
    init_weights(module)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@dataclass
class MANOptions(MethodConfig):
    """Attributes:
    ema_momentum: m in p_ema ← m·p_ema + (1−m)·p_live (0.995 in the paper and README).
    copy_init: "live" (copies of block k+1's first layer) or "random" (re-initialised, the released code).
    ema_timing: "after_next_step" (paper) or "before_next_step" (released code's one-step lag).
    aux_blocks: trainable copies of the layers after block k+1's first one that follow the fused copies (MAN++'s
        released ViT auxiliary net has 1); 0 (default): the heads read the fused copies directly.
    """

    ema_momentum: float = 0.995
    copy_init: str = "live"
    ema_timing: str = "after_next_step"
    aux_blocks: int = 0


class MomentumAuxiliary:
    """Mixin that puts MAN's EMA and learnable copies of block k+1's first layer in front of the base heads."""

    learnable_scale = False  # MAN++ sets True
    config: MANOptions

    def build_aux(self, info: SetupInfo) -> None:
        cfg = self.config
        if cfg.copy_init not in ("live", "random"):
            raise UserError(f"unknown copy_init {cfg.copy_init!r}: use live or random")
        if cfg.ema_timing not in ("after_next_step", "before_next_step"):
            raise UserError(f"unknown ema_timing {cfg.ema_timing!r}: use after_next_step or before_next_step")
        if cfg.aux_blocks < 0:
            raise UserError(f"aux_blocks={cfg.aux_blocks} must be >= 0 (MAN++'s released ViT auxiliary net uses 1)")
        live = info.next_layers[:-1]
        self._live = list(live)  # a plain list: the live layers belong to the backbone, not to the method
        self.ema = nn.ModuleList(clone_module(layer) for layer in live)
        self.learnable = nn.ModuleList(clone_module(layer) for layer in live)
        self.following = nn.ModuleList(self._following_copies(k, info) for k in range(len(live)))
        if cfg.copy_init == "random":
            for module in (*self.ema, *self.learnable, *self.following):
                reinitialise(module)
        self.ema.requires_grad_(False)
        self.scales = nn.ParameterList(nn.Parameter(torch.ones(())) for _ in live) if self.learnable_scale else None
        super().build_aux(info)

    def _following_copies(self, k: int, info: SetupInfo) -> nn.Sequential:
        """Copies of layers 2 .. aux_blocks + 1 of block k+1, trainable (``aux_blocks``)."""
        first, n = info.bounds[k], self.config.aux_blocks
        last_feature_layer = len(info.layer_shapes) - 2  # the last layer is the classifier (pooling + linear)
        if first + n > last_feature_layer:
            raise UserError(
                f"aux_blocks={n}: block {k}'s auxiliary net would copy layers {first + 1}..{first + n} after block "
                f"{k + 1}'s first layer {first}, but the feature layers end at {last_feature_layer}: lower "
                "aux_blocks, or cut earlier"
            )
        copies = nn.Sequential(*(clone_module(info.model.layers[j]) for j in range(first + 1, first + n + 1)))
        return copies.requires_grad_(True)

    def aux_shape(self, k: int, info: SetupInfo) -> Shape:
        # the output of block k+1's first layer (of the last layer copied after it, with aux_blocks)
        return info.layer_shapes[info.bounds[k] + self.config.aux_blocks]

    def aux_layout(self, k: int, info: SetupInfo) -> str:
        return info.layout(info.bounds[k] + self.config.aux_blocks)

    def aux_input(self, k: int, h: Tensor) -> Tensor:
        return self.aux_segment((self.learnable[k], self.ema[k], self.following[k]), self._copies, k, h)

    def _copies(self, k: int, h: Tensor) -> Tensor:
        if self.scales is None:
            y = self.learnable[k](h) + self.ema[k](h)
        else:
            s = self.scales[k]
            y = s * self.learnable[k](h) + (2 - s) * self.ema[k](h)
        return self.following[k](y)  # an empty Sequential (aux_blocks=0) returns y itself

    def block_params(self, k: int) -> list[nn.Parameter]:
        own = super().block_params(k)
        if k >= len(self.learnable):
            return own
        extra = [*self.learnable[k].parameters()] + ([self.scales[k]] if self.scales is not None else [])
        return own + extra + [*self.following[k].parameters()]

    @torch.no_grad()
    def update_ema(self, k: int) -> None:
        """p_ema ← m·p_ema + (1−m)·p_live for every parameter of EMA_k (buffers are left to each copy)."""
        ema = list(self.ema[k].parameters())
        live = [p.detach() for p in self._live[k].parameters()]
        torch._foreach_lerp_(ema, live, 1.0 - self.config.ema_momentum)

    def after_step(self, k: int) -> None:
        if self.config.ema_timing == "after_next_step":
            self.downstream_stepped(k - 1)  # block k stepped: EMA_{k-1} follows its first layer
        elif k < len(self.ema):
            self.update_ema(k)  # the released code's lag: EMA_k from block k+1's layer before block k+1 steps

    def downstream_reads(self) -> dict[int, nn.Module]:
        return dict(enumerate(self._live))

    def downstream_stepped(self, k: int) -> None:
        if self.config.ema_timing == "after_next_step" and 0 <= k < len(self.ema):
            self.update_ema(k)


@dataclass
class DGLMANConfig(MANOptions, DGLConfig):
    """DGL's MLP-SR heads behind MAN's copies; see :class:`DGLConfig` and :class:`MANOptions`."""


@dataclass
class InfoProMANConfig(MANOptions, InfoProConfig):
    """InfoPro's decoder and classifier behind MAN's copies; see :class:`InfoProConfig` and :class:`MANOptions`."""


@register_method("dgl+man")
class DGLMAN(MomentumAuxiliary, DGL):
    config_class = DGLMANConfig


@register_method("infopro+man")
class InfoProMAN(MomentumAuxiliary, InfoPro):
    config_class = InfoProMANConfig


@register_method("man++")
class InfoProMANPlusPlus(MomentumAuxiliary, InfoPro):
    """MAN++ on InfoPro heads (the released CIFAR code's main configuration)."""

    config_class = InfoProMANConfig
    learnable_scale = True


@register_method("dgl+man++")
class DGLMANPlusPlus(MomentumAuxiliary, DGL):
    config_class = DGLMANConfig
    learnable_scale = True
