"""InfoPro: Information Propagation (Wang, Ni, Song, Yang & Huang, ICLR 2021, arXiv 2101.10832).

Greedy local training with cross-entropy alone collapses task-relevant information early. InfoPro's local loss keeps
information about the input: for block k < K-1 with output h_k,

    L_k = λ1_k · BCE(Dec(h_k), x̃) + λ2_k · L_y(Head(h_k), y)

where x̃ is the un-normalised image in [0, 1], L_y is cross-entropy ("InfoPro (Softmax)") or supervised contrastive
("InfoPro (Contrast)"), and λ is interpolated linearly from the first to the last local block
(methods.md §3.1): r_k = k/(K−2), λ1_k = λ1_first·(1−r_k) + λ1_last·r_k, likewise λ2.

Code names ↔ paper/reference: ``lambda_recon_first/last`` = ixx_1/ixx_2 (λ1), ``lambda_task_first/last`` =
ixy_1/ixy_2 (λ2), ``head`` = ``aux_net_config`` ("1c2f"), ``decoder_width`` = 12·``aux_net_widen``.

Defaults are InfoPro's published CIFAR-10 ResNet-32 K=16 λ (5, 0.05 → 0.2, 0.5; ``comand.sh``). A schedule that
ends at (0, 0), as MAN's README values do with InfoPro's block ramp, gives the last local block no loss at all (it then
moves by weight decay only, as in the reference code); a warning says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from locallearn.errors import UserError
from locallearn.feature_heads import MAPS, PatchDecoder, sequence_head, with_layout
from locallearn.heads import infopro_decoder, infopro_head, parse_head_spec
from locallearn.losses import at_least_fp32, supcon_loss
from locallearn.methods.base import LocalMethod, LocalOutput, MethodConfig, SetupInfo, register_method
from locallearn.models.resnet_cifar import reference_conv_init

log = logging.getLogger("locallearn")


@dataclass
class InfoProConfig(MethodConfig):
    """Attributes:
    loss_mode: "cross_entropy" (InfoPro Softmax) or "contrast" (InfoPro Contrast, SupCon on ``feature_dim`` outputs).
    head: auxiliary classifier: "auto" (default: "bottleneck" for inputs whose sides are both at least
        :data:`LARGE_INPUT_SIDE` pixels, else "1c2f"; the run log says which), a spec "<n>c<m>f" (InfoPro's CIFAR
        head 1c2f; MAN's CIFAR code uses 2c2f), or "bottleneck", the ImageNet head of InfoPro*/MAN (conv1x1 C→C/4,
        two stride-2 conv3x3, conv1x1 → the network's final width, GAP, Linear; methods.md §1.4,
        :func:`locallearn.heads.bottleneck_head`).
    feature_dim: hidden width of the head's linear layers and the contrastive embedding size (f = 128).
    decoder: reconstruction decoder: "auto" (default: "upsampling" for large inputs as for ``head``, else
        "infopro"), "infopro" (CIFAR: upsample to the image size, conv3x3 → ``decoder_width``,
        conv3x3 → image; :class:`locallearn.heads.Decoder`) or "upsampling" (ImageNet: conv1x1, then bilinear ×2 stages
        with shrinking widths, 128 → 32 → 12 → 3 from a 512×28×28 map; methods.md §1.4,
        :class:`locallearn.heads.UpsamplingDecoder`).
    decoder_width: channels of the "infopro" decoder's hidden conv (12).
    decoder_form: order of arithmetic of the "infopro" decoder's upsampling and first conv: "auto" (default),
        "direct" (the released code's) or "factored"; all three compute the same function
        (:class:`locallearn.heads.Decoder`).
    lambda_recon_first: λ1 (reconstruction weight) at the first local block (ixx_1).
    lambda_task_first: λ2 (task-loss weight) at the first local block (ixy_1).
    lambda_recon_last: λ1 at the last local block (ixx_2).
    lambda_task_last: λ2 at the last local block (ixy_2).
    lambda_ramp: "block" (InfoPro: r = k/(K−2)) or "stage" (MAN's released code: r = s/(K−2) with s the stage of
        the next block's first layer, 0 for a stem-only block).
    lambda_ramp_k: the K in those formulas; None means the true block count. MAN's code uses its nominal "K=16"
        for its 15-block ResNet-32 split, so the faithful preset sets 16.
    temperature: SupCon temperature τ (and base temperature), 0.07.
    head_init: "reference" (default): the heads' and decoders' convolutions are drawn as the backbone's,
        N(0, 2/(k·k·C_out)), BN weight 1 / bias 0, linear layers keep PyTorch's default, because both released
        codebases (InfoPro's and MAN's, CIFAR and ImageNet) build their auxiliary nets before their global init loop;
        "torch": PyTorch's default initialisation for every head layer.
    """

    loss_mode: str = "cross_entropy"
    head: str = "auto"
    decoder: str = "auto"
    feature_dim: int = 128
    decoder_width: int = 12
    decoder_form: str = "auto"
    lambda_recon_first: float = 5.0
    lambda_task_first: float = 0.05
    lambda_recon_last: float = 0.2
    lambda_task_last: float = 0.5
    lambda_ramp: str = "block"
    lambda_ramp_k: int | None = None
    temperature: float = 0.07
    head_init: str = "reference"


LARGE_INPUT_SIDE = 128
"""Inputs at least this many pixels on both sides get the ImageNet auxiliary nets by default ("auto"): MAN's and
InfoPro*'s bottleneck head and upsampling decoder. The CIFAR decoder upsamples every block's features to the full
image before its convolutions, which at 224×224 costs more memory than the blocks themselves; the ImageNet decoder
climbs back in ×2 stages with shrinking widths. STL-10 (96×96), which InfoPro trains with its CIFAR nets, stays
below."""


def auxiliary_nets(cfg: InfoProConfig, image_shape: tuple) -> tuple[str, str, str]:
    """The (head, decoder) that ``cfg`` asks for on inputs of ``image_shape``, "auto" resolved, and why (a line for
    the run log)."""
    large = len(image_shape) == 3 and min(image_shape[1:]) >= LARGE_INPUT_SIDE
    head = cfg.head if cfg.head != "auto" else ("bottleneck" if large else "1c2f")
    decoder = cfg.decoder if cfg.decoder != "auto" else ("upsampling" if large else "infopro")
    size = "×".join(str(s) for s in image_shape[1:])
    chosen = [name for name, value in (("head", cfg.head), ("decoder", cfg.decoder)) if value == "auto"]
    if not chosen:
        why = "as configured"
    else:
        family = "ImageNet" if large else "CIFAR"
        why = (
            f"{' and '.join(chosen)} chosen for {size} inputs: {family} auxiliary nets "
            f"({'both sides ≥' if large else 'a side <'} {LARGE_INPUT_SIDE} px; set --method.head / --method.decoder "
            "to choose)"
        )
    return head, decoder, why


def ramp_positions(cfg: InfoProConfig, info: SetupInfo) -> list[float]:
    """r_k ∈ [0, 1] for each local block k = 0..K−2 (see ``lambda_ramp``)."""
    k_total = cfg.lambda_ramp_k or len(info.blocks)
    denom = k_total - 2
    if cfg.lambda_ramp == "block":
        return [k / denom if denom > 0 else 0.0 for k in range(len(info.blocks) - 1)]
    if cfg.lambda_ramp == "stage":
        stage_of = info.model.stage_of
        last_stage = [stage_of[b - 1] for b in info.bounds]  # stage of block k's last layer
        return [
            0.0 if last_stage[k] == 0 or denom <= 0 else info.layer_stages[k + 1] / denom
            for k in range(len(info.blocks) - 1)
        ]
    raise UserError(f"unknown lambda_ramp {cfg.lambda_ramp!r}: use block or stage")


@register_method("infopro")
class InfoPro(LocalMethod):
    config_class = InfoProConfig
    uses_raw = True  # the decoder reconstructs the [0, 1] images
    config: InfoProConfig

    def build_aux(self, info: SetupInfo) -> None:
        cfg = self.config
        if cfg.loss_mode not in ("cross_entropy", "contrast"):
            raise UserError(f"unknown loss_mode {cfg.loss_mode!r}: use cross_entropy or contrast")
        if cfg.head_init not in ("reference", "torch"):
            raise UserError(f"unknown head_init {cfg.head_init!r}: use reference or torch")
        outputs = info.num_classes if cfg.loss_mode == "cross_entropy" else cfg.feature_dim
        self.head_kind, self.decoder_kind, why = auxiliary_nets(cfg, info.image_shape)
        self.aux_summary = f"auxiliary nets: {self.head_kind} head, {self.decoder_kind} decoder ({why})"
        local = range(len(info.blocks) - 1)
        features = [(self.aux_shape(k, info), self.aux_layout(k, info)) for k in local]
        self.heads = nn.ModuleList(self._head(s, layout, outputs, info) for s, layout in features)
        self.decoders = nn.ModuleList(self._decoder(s, layout, info) for s, layout in features)
        if cfg.head_init == "reference":
            for module in (*self.heads, *self.decoders):
                reference_conv_init(module)
        r = ramp_positions(cfg, info)
        self.lambdas = [
            (
                cfg.lambda_recon_first * (1 - x) + cfg.lambda_recon_last * x,
                cfg.lambda_task_first * (1 - x) + cfg.lambda_task_last * x,
            )
            for x in r
        ]
        for k, (l1, l2) in enumerate(self.lambdas):
            if l1 == 0 and l2 == 0:
                log.warning("infopro: block %d has λ1 = λ2 = 0, so only weight decay moves it", k)

    def soft_target_refusal(self) -> str | None:
        if self.config.loss_mode == "contrast":
            return (
                "infopro's contrastive mode (loss_mode=contrast) has no soft-target form (SupCon's positives are the "
                "images of one class): use --method.loss_mode=cross_entropy, or train without mixup and cutmix"
            )
        return None

    def _head(self, shape: tuple, layout: str, outputs: int, info: SetupInfo) -> nn.Module:
        """The configured head on a feature map; on tokens or a vector its fully connected part only (``<n>c<m>f``
        reads as m linear layers; convolutions do not apply to tokens), after a LayerNorm and the model's pooling."""
        cfg = self.config
        if layout in MAPS:
            return with_layout(
                layout, infopro_head(self.head_kind, shape, outputs, info.feature_width, cfg.feature_dim)
            )
        n_fc = parse_head_spec(self.head_kind)[1] if self.head_kind != "bottleneck" else 2
        return sequence_head(
            shape, layout, outputs, hidden_layers=n_fc - 1, hidden=cfg.feature_dim, token_pool=info.token_pool
        )

    def _decoder(self, shape: tuple, layout: str, info: SetupInfo) -> nn.Module:
        """The configured decoder on a feature map; a per-patch linear reconstruction from tokens."""
        cfg = self.config
        if layout in MAPS:
            return with_layout(
                layout, infopro_decoder(self.decoder_kind, shape, info.image_shape, cfg.decoder_width, cfg.decoder_form)
            )
        if layout == "tokens":
            return PatchDecoder(shape, info.image_shape)
        raise UserError(f"infopro cannot reconstruct the image from a {layout} cut: cut before global pooling")

    def block_params(self, k: int) -> list[nn.Parameter]:
        if k >= len(self.heads):
            return []
        return [*self.heads[k].parameters(), *self.decoders[k].parameters()]

    def aux_loss(self, k: int, h: Tensor, batch: Any) -> LocalOutput:
        y = self.aux_input(k, h)
        l1, l2 = self.lambdas[k]
        both = l1 == 0 and l2 == 0  # the reference computes both terms; keep their (zero) gradients then
        loss = torch.zeros((), device=h.device)
        logits = None
        if l1 != 0 or both:
            loss = loss + l1 * self.aux_segment((self.decoders[k],), self._reconstruction_loss, k, y, batch.raw)
        if l2 != 0 or both:
            out = self.aux_segment((self.heads[k],), self.heads[k], y)
            if self.config.loss_mode == "cross_entropy":
                logits = out
                loss = loss + l2 * self.task_loss(out, batch)
            else:
                loss = loss + l2 * supcon_loss(out, batch.y, self.config.temperature, self.config.temperature)
        return LocalOutput(loss, logits)

    def _reconstruction_loss(self, k: int, y: Tensor, raw: Tensor) -> Tensor:
        out = at_least_fp32(self.decoders[k](y))
        # BCE in float32 (or float64), outside autocast: CUDA's autocast refuses binary_cross_entropy outright.
        with torch.autocast(out.device.type, enabled=False):
            return F.binary_cross_entropy(out, raw.to(out.dtype))

    def aux_logits(self, k: int, h: Tensor) -> Tensor | None:
        if k >= len(self.heads) or self.config.loss_mode != "cross_entropy":
            return None
        return self.heads[k](self.aux_input(k, h))
