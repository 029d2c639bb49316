"""One ``locallearn bench`` row: its configuration, its learner, and its measurement in a fresh process.

``locallearn bench`` (:mod:`locallearn.bench`) plans and estimates every row and asks :mod:`locallearn.measure` to
measure each in a child process; the child runs ``python -m locallearn.bench_row SPEC``, which builds the row's
learner here and measures its training steps with :func:`locallearn.measure.measure_steps`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from locallearn.allocator import set_mmap_threshold
from locallearn.data import Batch
from locallearn.learner import LocalLearner
from locallearn.measure import Measurement, measure_steps
from locallearn.memory import active_fake_mode
from locallearn.models import MODELS, LayeredModel, as_layered, create_model
from locallearn.module_copy import fake_copy
from locallearn.optim import OptimConfig


@dataclass
class BenchConfig:
    arch: str = "resnet110"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # torchvision:/timm: constructor options
    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 10
    batch_size: int = 1024
    method: str = "infopro+man"
    method_options: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)  # OptimConfig fields (the optimizer's state is memory too)
    ks: list[int] = field(default_factory=lambda: [2, 3, 4])
    splits: list[str] = field(default_factory=lambda: ["even", "balanced"])
    local_checkpointing: list[str] = field(default_factory=lambda: ["none"])  # "aux": recompute auxiliary nets
    time_steps: int = 3
    warmup_steps: int = 1
    device: str = "cpu"
    channels_last: bool = True
    measure: bool = True  # measure every row for real in a fresh process (locallearn.measure)
    malloc_mmap_threshold: int | None = None  # glibc's fixed mmap threshold in the measuring processes (allocator.py)


def bench_model(cfg: BenchConfig) -> LayeredModel:
    """The benchmarked network as atomic layers (a torchvision/timm model is traced, which also caches its cut plan
    for the builds under fake tensors)."""
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    return as_layered(create_bench_model(cfg), shape)


def create_bench_model(cfg: BenchConfig) -> nn.Module:
    """A new instance of the benchmarked network."""
    return create_model(
        cfg.arch,
        num_classes=cfg.num_classes,
        in_channels=cfg.in_channels,
        image_size=cfg.image_size,
        **cfg.model_kwargs,
    )


def learner_builder(
    cfg: BenchConfig,
    method: str,
    bounds: list[int],
    checkpointing: str,
    device: torch.device,
    channels_last: bool = True,
) -> Callable[[], LocalLearner]:
    """A function that builds one bench row's learner anew each call (under fake tensors too: ``estimate_peak``)."""
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    options = cfg.method_options if method == cfg.method else None
    # A torchvision/timm constructor may read tensor values (timm's drop-path rates call .item()), which fake tensors
    # cannot give: build it once for real here and hand out fake copies of it (:func:`fake_copy`).
    template = None if cfg.arch in MODELS else bench_model(cfg).source

    def build() -> LocalLearner:
        mode = active_fake_mode()
        if template is not None and mode is not None:
            model = fake_copy(template, mode)
        else:
            model = create_bench_model(cfg)
        return LocalLearner(
            model,
            method,
            len(bounds) + 1,
            bounds,
            input_shape=shape,
            method_options=options,
            device=device,
            checkpointing=checkpointing,
            channels_last=cfg.channels_last and channels_last,
            optim=OptimConfig(**cfg.optim),
        )

    return build


def measure_row(cfg_dict: dict[str, Any], method: str, bounds: list[int], checkpointing: str) -> Measurement:
    """Build one bench configuration for real and measure its training steps (in the calling process)."""
    cfg = BenchConfig(**cfg_dict)
    device = torch.device(cfg.device)
    if cfg.malloc_mmap_threshold is not None:
        set_mmap_threshold(cfg.malloc_mmap_threshold)
    torch.manual_seed(0)
    learner = learner_builder(cfg, method, bounds, checkpointing, device)()
    x = torch.rand(cfg.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device)
    batch = Batch(x, y, x)
    steps = max(cfg.time_steps, 1)
    return measure_steps(
        lambda: learner.train_step(batch), device, steps, cfg.warmup_steps, cfg.batch_size, cfg.time_steps > 0
    )


def main(argv: list[str] | None = None) -> None:
    spec = json.loads((argv or sys.argv[1:])[0])
    result = measure_row(spec["config"], spec["method"], spec["bounds"], spec["checkpointing"])
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
