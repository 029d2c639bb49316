"""A network as an ordered list of atomic layers: the unit the splitter cuts into blocks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn


class LayeredModel(nn.Module):
    """``forward(x)`` runs ``layers`` in order; the last layer produces the logits.

    Attributes:
        layers: the atomic layers (stem, residual blocks, …, classifier), an ``nn.ModuleList``.
        names: a readable name per layer (``"layer2.3"``), used in split reports.
        stage_of: the stage index of each layer (0 for the stem); MAN's λ schedule is ramped by stage.
        arch: the registered architecture name.
        block_factory: ``(in_channels, out_channels, stride) -> nn.Module`` building a fresh layer of the kind the
            network is made of (a residual block); AugLocal builds its auxiliary nets with it. None if unknown.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        *,
        names: Sequence[str],
        stage_of: Sequence[int],
        arch: str,
        block_factory: Callable[[int, int, int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if not (len(layers) == len(names) == len(stage_of)):
            raise ValueError("layers, names and stage_of must have the same length")
        self.layers = nn.ModuleList(layers)
        self.names = list(names)
        self.stage_of = list(stage_of)
        self.arch = arch
        self.block_factory = block_factory

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def num_layers(self) -> int:
        return len(self.layers)
