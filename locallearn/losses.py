"""Loss functions of the local methods that ``torch.nn.functional`` does not have."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def at_least_fp32(t: Tensor) -> Tensor:
    """``t`` in float32 if it is in a half type (bf16 autocast), else unchanged: a loss computed in float64 stays in
    float64 (casting it down would round sigmoid outputs near 1 to exactly 1, where BCE's gradient is clamped)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


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
