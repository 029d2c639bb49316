"""Loss functions of the local methods that ``torch.nn.functional`` does not have."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def at_least_fp32(t: Tensor) -> Tensor:
    """``t`` in float32 if it is in a half type (bf16 autocast), else unchanged: a loss computed in float64 stays in
    float64 (casting it down would round sigmoid outputs near 1 to exactly 1, where BCE's gradient is clamped)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def soft_target_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy against a distribution over classes (mixup's and cutmix's targets, which already hold any label
    smoothing): ``mean_i Σ_c −t_ic · log softmax(z_i)_c``. With a one-hot ``target`` it is ``F.cross_entropy``.

    Args:
        logits: [B, classes].
        target: [B, classes], rows summing to 1.
    """
    return torch.sum(-target * F.log_softmax(at_least_fp32(logits), dim=-1), dim=-1).mean()


def classification_loss(logits: Tensor, y: Tensor, soft: Tensor | None = None, label_smoothing: float = 0.0) -> Tensor:
    """The cross-entropy every classifier of every method is trained by: against ``soft`` targets when a batch
    carries them (mixup / cutmix), else against the labels ``y`` with ``label_smoothing`` (``F.cross_entropy``'s, so
    a run without smoothing computes exactly what it did before the option existed)."""
    if soft is not None:
        return soft_target_cross_entropy(logits, soft)
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing)


def supcon_loss(features: Tensor, labels: Tensor, temperature: float = 0.07, base_temperature: float = 0.07) -> Tensor:
    """Supervised contrastive loss (Khosla et al., NeurIPS 2020), one view per image, as InfoPro (Contrast) uses it.

    Features are L2-normalised; for anchor i the positives are the other images of its class in the batch:
    ``L_i = -(τ/τ_b) · mean_{p ∈ P(i)} [ z_i·z_p/τ − log Σ_{a ≠ i} exp(z_i·z_a/τ) ]``. Anchors with no positive in the
    batch are left out (the reference divides by zero there).

    Args:
        features: [B, D] head outputs.
        labels: [B] class indices.
    """
    z = F.normalize(at_least_fp32(features), dim=1)
    logits = z @ z.T / temperature  # [B, B]
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positives.sum(1)
    has_pos = n_pos > 0
    mean_log_prob_pos = log_prob.masked_fill(~positives, 0.0).sum(1)[has_pos] / n_pos[has_pos]
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()
