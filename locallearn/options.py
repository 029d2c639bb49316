"""Names of choices that both the CLI and the library check, in one torch-free place.

The CLI builds its argument parser before importing torch (``locallearn --help`` stays instant), so these cannot live
in the torch-importing modules that use them (:mod:`locallearn.learner`, :mod:`locallearn.bench`; the step
orders themselves are described in :mod:`locallearn.engine`).
"""

from __future__ import annotations

# what to recompute in the backward pass instead of storing (locallearn.recompute), and the suffix a benchmark row's
# label gets for it
CHECKPOINTING: dict[str, str] = {
    "none": "",
    "stage": " + stage ckpt",
    "aux": " + aux recompute",
    "stage+aux": " + stage ckpt + aux",
}

# when each block's optimizer steps (locallearn.engine)
STEP_ORDERS: tuple[str, ...] = ("per_block", "after_all")

# mixed precision: none, bf16 autocast, or fp16 autocast with one gradient scaler per block (CUDA only)
AMP: tuple[str, ...] = ("none", "bf16", "fp16")

MIXUP_MODES: tuple[str, ...] = ("batch", "pair", "elem")
"""How timm's ``Mixup`` draws its mixing: one λ per batch, per pair of images, or per image."""

NONFINITE = ("stop", "skip", "off")
"""What a non-finite block loss or gradient does (``LocalLearner(nonfinite=...)``, ``--train.nonfinite``)."""

TENSORBOARD = ("auto", "on", "off")
"""TensorBoard event files (``--tensorboard``, :mod:`locallearn.tensorboard_log`): "auto" writes them when the
``tensorboard`` package imports, "on" requires it, "off" never writes them."""

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
"""``--train.compile``: no compilation, or the ``torch.compile`` mode of every block's graph
(:mod:`locallearn.compiled`)."""
