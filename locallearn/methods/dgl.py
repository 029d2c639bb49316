"""DGL: Decoupled Greedy Learning (Belilovsky, Eickenberg & Oyallon, ICML 2020, arXiv 1901.08164).

Each block k < K-1 is trained only by the cross-entropy of its own auxiliary classifier on its output; the input of
block k+1 is the *detached* output of block k. The auxiliary net is DGL's own "MLP-SR" (methods.md §4, the official
``auxiliary_nets_study`` default), built by :func:`locallearn.heads.dgl_mlp_sr`.

Paper symbols: block k is the module θ_j, the head is the auxiliary problem γ_j; ``n_conv`` is DGL's ``n_lin`` and
``n_mlp`` its ``mlp_layers``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from locallearn.feature_heads import MAPS, sequence_head, with_layout
from locallearn.heads import dgl_mlp_sr
from locallearn.methods.base import LocalMethod, LocalOutput, MethodConfig, SetupInfo, register_method


@dataclass
class DGLConfig(MethodConfig):
    """Attributes:
    n_conv: conv1x1 layers of MLP-SR after the spatial pooling (DGL's ``n_lin``).
    n_mlp: hidden Linear-BN-ReLU layers before the output layer (DGL's ``mlp_layers``).
    """

    n_conv: int = 3
    n_mlp: int = 3


@register_method("dgl")
class DGL(LocalMethod):
    config_class = DGLConfig
    config: DGLConfig

    def build_aux(self, info: SetupInfo) -> None:
        self.heads = nn.ModuleList(self._head(k, info) for k in range(len(info.blocks) - 1))

    def _head(self, k: int, info: SetupInfo) -> nn.Module:
        """MLP-SR on a feature map; on tokens or a vector (a transformer, or a cut after pooling) the same MLP
        (``n_mlp`` × Linear-BN1d-ReLU at the model width, then Linear) after a LayerNorm and the model's pooling."""
        shape, layout = self.aux_shape(k, info), self.aux_layout(k, info)
        cfg = self.config
        if layout in MAPS:
            return with_layout(layout, dgl_mlp_sr(shape, info.num_classes, cfg.n_conv, cfg.n_mlp))
        return sequence_head(
            shape, layout, info.num_classes, hidden_layers=cfg.n_mlp, token_pool=info.token_pool, batch_norm=True
        )

    def block_params(self, k: int) -> list[nn.Parameter]:
        return list(self.heads[k].parameters()) if k < len(self.heads) else []

    def aux_loss(self, k: int, h: Tensor, batch: Any) -> LocalOutput:
        logits = self.aux_segment((self.heads[k],), self.heads[k], self.aux_input(k, h))
        return LocalOutput(self.task_loss(logits, batch), logits)

    def aux_logits(self, k: int, h: Tensor) -> Tensor | None:
        return self.heads[k](self.aux_input(k, h)) if k < len(self.heads) else None
