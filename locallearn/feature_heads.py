"""Auxiliary heads for any feature layout a cut can carry: NCHW and channels-last maps, token sequences, vectors.

A traced model's cuts carry (N, C, H, W) maps (CNNs), (N, H, W, C) maps (Swin stages), (N, T, D) tokens (vision
transformers) or (N, D) vectors. Shapes are stored *canonical* — (C, H, W) for both map layouts, (T, D) for
tokens, (D,) for vectors — and the layout says how the tensor is laid out:

* maps: the conv heads of :mod:`locallearn.heads` after a permute to NCHW for channels-last maps;
* tokens: a LayerNorm, then a pooling that follows the model's own head — the class token when the model reads its
  class token (timm ``global_pool='token'``, torchvision ViT), else the mean of the tokens after the prefix tokens
  (timm ``'avg'``), so the auxiliary heads read what the final classifier will read; then linear layers. With no
  hint, the mean over all tokens. The LayerNorm is there because transformer blocks output un-normalised residual
  streams (the models put their own norm before the head too);
* InfoPro's decoder on tokens: a per-patch linear reconstruction (:class:`PatchDecoder`).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from locallearn.errors import UserError

MAPS = ("nchw", "nhwc")


def canonical_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """(H, W, C) of a channels-last map → (C, H, W); every other layout as it is."""
    return (shape[2], shape[0], shape[1]) if layout == "nhwc" else tuple(shape)


def layout_of_rank(rank: int) -> str:
    """The layout a tensor of ``rank`` dimensions (batch included) has in locallearn's own models."""
    return {4: "nchw", 3: "tokens", 2: "vector"}.get(rank, f"rank{rank}")


def width_of(shape: tuple[int, ...], layout: str) -> int:
    """Channels of a map, model width D of tokens or a vector."""
    return shape[-1] if layout in ("tokens", "vector") else shape[0]


class ChannelsFirst(nn.Module):
    """(N, H, W, C) → (N, C, H, W), so the conv heads read channels-last maps."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)


class TokenPool(nn.Module):
    """(N, T, D) → (N, D): token ``index`` (the class token) or the mean of the tokens from ``start`` on."""

    def __init__(self, mode: str, start: int = 0) -> None:
        super().__init__()
        if mode not in ("token", "avg"):
            raise ValueError(f"unknown token pooling {mode!r}")
        self.mode, self.start = mode, start

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0] if self.mode == "token" else x[:, self.start :].mean(1)


def token_pool_module(token_pool: tuple[str, int] | None) -> TokenPool:
    if token_pool is None:
        return TokenPool("avg", 0)
    mode, prefix = token_pool
    return TokenPool("token") if mode == "token" and prefix > 0 else TokenPool("avg", prefix)


def with_layout(layout: str, head: nn.Module) -> nn.Module:
    """Prefix a conv head with a permute when the map it reads is channels-last."""
    return nn.Sequential(ChannelsFirst(), head) if layout == "nhwc" else head


def sequence_head(
    shape: tuple[int, ...],
    layout: str,
    num_outputs: int,
    *,
    hidden_layers: int,
    hidden: int | None = None,
    token_pool: tuple[str, int] | None = None,
    batch_norm: bool = False,
) -> nn.Sequential:
    """Head for tokens or a vector: [LayerNorm, pool] for tokens, then ``hidden_layers`` × [Linear → ``hidden``
    (default: the width D), (BN1d), ReLU], then Linear → ``num_outputs``."""
    if layout not in ("tokens", "vector"):
        raise ValueError(f"sequence_head reads tokens or vectors, not {layout}")
    width = shape[-1]
    layers: list[nn.Module] = []
    if layout == "tokens":
        layers += [nn.LayerNorm(width), token_pool_module(token_pool)]
    hidden = hidden or width
    for _ in range(hidden_layers):
        layers.append(nn.Linear(width, hidden, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.ReLU(inplace=True))
        width = hidden
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


class PatchDecoder(nn.Module):
    """InfoPro's reconstruction from tokens: each patch token is mapped linearly to its C·p·p pixels, then sigmoid.

    The patch grid is read from the token count: T = P + g² with g² patch tokens on a square g×g grid and P < g
    prefix tokens (class, distillation, register tokens), which are dropped; the patch size is (H/g, W/g).
    """

    def __init__(self, shape: tuple[int, int], image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        tokens, width = shape
        c, h, w = image_shape
        grid = math.isqrt(tokens)
        self.prefix = tokens - grid * grid
        if grid == 0 or h % grid or w % grid or self.prefix >= grid:
            raise UserError(
                f"cannot reconstruct a {h}×{w} image from {tokens} tokens (no square patch grid that divides the "
                "image): use a method without a decoder (dgl, dgl+man) for this model"
            )
        self.grid, self.patch = grid, (h // grid, w // grid)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, c * self.patch[0] * self.patch[1])
        self.channels = c

    def forward(self, x: Tensor) -> Tensor:
        n, g, (ph, pw), c = x.shape[0], self.grid, self.patch, self.channels
        y = self.proj(self.norm(x[:, self.prefix :]))  # (N, g·g, C·ph·pw)
        y = y.reshape(n, g, g, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, g * ph, g * pw)
        return y.sigmoid()
