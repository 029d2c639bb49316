"""Typed run configuration: dataclasses, an optional YAML file, and ``--section.key=value`` overrides.

Precedence, lowest first: dataclass defaults < YAML file (``--config``) < the CLI's named flags < dotted overrides.
Values of dotted overrides are read with ``ast.literal_eval`` (so ``--optim.lr=0.05`` is a float and
``--data.limit_train=None`` is None; anything that is not a Python literal is kept as a string) and checked against
the field's annotation. The ``method`` section is a free dict, checked by the chosen method's own config dataclass.
"""

from __future__ import annotations

import ast
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from locallearn.data import DataConfig
from locallearn.errors import UserError
from locallearn.optim import SCHEDULES, OptimConfig, check_optim
from locallearn.options import AMP, COMPILE_MODES, MIXUP_MODES, TENSORBOARD


@dataclass
class ModelConfig:
    """Attributes:
    arch: a built-in architecture (resnet20/32/56/110, …), or ``torchvision:NAME`` / ``timm:NAME`` (cut into
        blocks by tracing; see locallearn.models.traced).
    kwargs: constructor options for a torchvision/timm arch, e.g. ``{"patch_size": 4}`` for a timm ViT on 28×28.
    """

    arch: str = "resnet32"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Attributes:
    method: registered local-learning method (e2e, dgl, …).
    K: number of gradient-isolated blocks actually trained; None means 1 for e2e and 4 otherwise.
    split: "even" or a named preset of published cut points ("infopro", "infopro-balanced", "man").
    epochs: passes over the training set.
    max_steps: stop after this many optimizer steps (None: run all epochs).
    batch_size: training batch size.
    eval_batch_size: test batch size; None (default) picks one by image size
        (``locallearn.data.default_eval_batch_size``: up to 1000 CIFAR-sized images, the training batch at ImageNet
        sizes), so evaluation never needs more memory than training.
    seed: seeds weights, data order and augmentation.
    device: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ….
    amp: "none", "bf16" autocast, or "fp16" autocast with one gradient scaler per block (CUDA only).
    label_smoothing: ε of every classifier's cross-entropy: the network's and every auxiliary head's.
    mixup: mixup's α (timm's ``Mixup``; 0: off). Every block trains on the mixed batch and every cross-entropy reads
        its soft targets; InfoPro reconstructs the mixed image (locallearn.mixing).
    cutmix: cutmix's α (0: off); with both on, a batch gets one or the other (``mixup_switch_prob``).
    mixup_prob: probability that a batch is mixed at all.
    mixup_switch_prob: with mixup and cutmix both on, probability of cutmix.
    mixup_mode: "batch", "pair" or "elem": one λ per batch, per pair of images or per image.
    step_order: "per_block" (each block steps after its own backward) or "after_all" (reference order).
    channels_last: NHWC memory format for weights and inputs (faster on CPU oneDNN and GPU tensor cores).
    checkpointing: what to recompute in backward instead of storing: "none", "stage" (each stage inside each
        block), "aux" (each segment of each auxiliary net: MAN copies, heads, decoders) or "stage+aux"
        (see locallearn.recompute).
    malloc_mmap_threshold: CPU (glibc): serve allocations of at least this many bytes by mmap, so freed
        activations leave the resident set at once and peak RSS follows the live tensors (e.g. 262144); None keeps
        glibc's default, which is faster and retains freed heap memory (see locallearn.allocator).
    checkpoint_every: also write a complete checkpoint every this many steps (0: only at the end of each epoch);
        checkpoints go to <out>/checkpoints/ with a manifest each (locallearn.durable).
    keep_checkpoints: complete checkpoints kept (at least 2); older ones are deleted once a newer one is complete.
    resume: "auto" (continue from the newest checkpoint in --out that verifies, or start fresh when there is none)
        or the path of a checkpoint; None starts a new run.
    stop_on_sigusr1: SIGUSR1 stops the run like SIGTERM (save, exit 138); SIGTERM and SIGINT always do.
    nonfinite: a block whose loss or gradient is NaN/inf: "stop" (error naming block and step, exit 5), "skip"
        (that block's step is skipped and counted in summary.json) or "off" (no check).
    compile: "off" (default), or the ``torch.compile`` mode each block's forward and local loss is compiled with
        ("default", "reduce-overhead", "max-autotune"; :mod:`locallearn.compiled`). The first step compiles
        (summary.json ``compile_seconds``, left out of ``images_per_second``).
    deterministic: deterministic kernels only (``torch.use_deterministic_algorithms``, cuDNN without autotuning,
        cuBLAS's fixed workspace), so two runs with the same seed, device and thread count are bitwise equal step by
        step. On CPU locallearn's runs are that already; across thread counts they are not (see README).
    out: run directory (None: runs/<time>-<method>-<arch>-K<k>).
    overwrite: allow writing into a non-empty run directory.
    save_checkpoint: write checkpoint.pt at the end.
    progress: show a progress bar.
    tensorboard: TensorBoard event files in <out>/tensorboard/ (locallearn.tensorboard_log): "auto" (when the
        ``tensorboard`` package imports), "on" (an error without it) or "off".
    log_every: also write the per-step TensorBoard scalars every this many training steps (0: epoch ends only);
        the non-finite guard is read as often (and before every checkpoint and at every epoch's end), so a step
        makes no host read of it (:mod:`locallearn.nonfinite`; 1: read before every block's step).
    """

    method: str = "dgl"
    K: int | None = None
    split: str = "even"
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 128
    eval_batch_size: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    step_order: str = "per_block"
    channels_last: bool = True
    checkpointing: str = "none"
    malloc_mmap_threshold: int | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None
    stop_on_sigusr1: bool = True
    nonfinite: str = "stop"
    compile: str = "off"
    deterministic: bool = False
    out: str | None = None
    overwrite: bool = False
    save_checkpoint: bool = True
    progress: bool = True
    tensorboard: str = "auto"
    log_every: int = 50


@dataclass
class DistConfig:
    """Attributes (see docs/distributed.md):
    parallel: "auto" (data-parallel when launched by torchrun with several processes, else "none"), "none",
        "data" (every rank all K blocks, each on its shard of every batch) or "pipeline" (the K blocks in one
        contiguous stage per process, all stages working at once).
    stages: pipeline: the first block of stages 1 .. S-1 (e.g. [2] for K=4 on 2 processes); None balances the
        stages by the measured time per block.
    replicas: pipeline: R data-parallel copies of the pipeline, a 2-D grid of S stages x R replicas on S*R processes
        (rank = replica * S + stage); each replica trains on its shard of every batch and the replicas of a stage
        average their gradients. 1: one pipeline.
    staleness: pipeline, MAN/MAN++: steps by which block k's EMA copy may lag block k+1's first layer when that
        layer is on the next stage (0: exactly the sequential result; 1+: the stage never waits for the next one).
    in_flight: pipeline: micro-batches a stage may run ahead of the next one (sent, not yet received); more absorbs
        jitter between the stages' times, at the memory of that many outputs.
    sync_bn: data-parallel: BatchNorm statistics over the global batch (torch's SyncBatchNorm; CUDA only).
    overlap: data-parallel: start block k's gradient average right after its backward and step block k after
        block k+1's backward, so the exchange runs behind that work (the same weights, bit for bit); False waits for
        each block's average right after its backward.
    timeout_s: seconds any collective or message may wait before the process stops with an error (a dead rank).
    """

    parallel: str = "auto"
    stages: list[int] | None = None
    replicas: int = 1
    staleness: int = 0
    in_flight: int = 2
    sync_bn: bool = False
    overlap: bool = True
    timeout_s: float = 300.0


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=lambda: DataConfig(limit_train=10000))
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    method: dict[str, Any] = field(default_factory=dict)

    def resolved_k(self) -> int | None:
        if self.train.K is not None:
            return self.train.K
        return 1 if self.train.method == "e2e" else (4 if self.train.split == "even" else None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = ("data", "model", "optim", "train", "dist")


def _allowed_types(annotation: Any) -> tuple[type, ...]:
    if isinstance(annotation, (types.UnionType,)) or typing.get_origin(annotation) is typing.Union:
        return tuple(t for arg in typing.get_args(annotation) for t in _allowed_types(arg))
    if annotation is type(None):
        return (type(None),)
    return (typing.get_origin(annotation) or annotation,)


def all_fields() -> list[str]:
    """Every ``section.key`` of the config (the method section's keys depend on the method and are not listed)."""
    cfg = RunConfig()
    return [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(cfg, s))]


def _nearest(dotted: str) -> str:
    """ " (did you mean train.epochs?)" for a near miss of a real field, else ""."""
    import difflib

    fields = all_fields()
    match = difflib.get_close_matches(dotted, fields, n=1, cutoff=0.75)
    if not match:  # a misspelt section with a right key: match the key alone
        key = dotted.partition(".")[2]
        same_key = [f for f in fields if f.partition(".")[2] == key]
        match = same_key[:1] if len(same_key) == 1 else []
    return f" (did you mean {match[0]}?)" if match else ""


def set_field(cfg: RunConfig, dotted: str, value: Any) -> None:
    """Set ``section.key`` to ``value``, checking the type against the dataclass annotation."""
    section, _, key = dotted.partition(".")
    if section == "method":
        if not key:
            raise UserError("a method override needs a key: --method.<option>=<value>")
        cfg.method[key] = value
        return
    if section not in SECTIONS or not key:
        raise UserError(
            f"unknown config field {dotted!r}{_nearest(dotted)}: use section.key with a section from "
            f"{', '.join((*SECTIONS, 'method'))}"
        )
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        names = ", ".join(f.name for f in dataclasses.fields(obj))
        raise UserError(f"unknown config field {dotted!r}{_nearest(dotted)}: {section} has {names}")
    allowed = _allowed_types(hints[key])
    if bool in allowed and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"  # YAML's and JSON's spelling (--data.augment=false), beside Python's False
    if isinstance(value, int) and not isinstance(value, bool) and float in allowed and int not in allowed:
        value = float(value)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        kinds = " or ".join(t.__name__ for t in allowed)
        raise UserError(f"config field {dotted} should be {kinds}, got {value!r}")
    setattr(obj, key, value)


def parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> None:
    """Apply ``section.key=value`` strings (the leading ``--`` already stripped)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"override {item!r} needs a value: write --{key}=VALUE")
        set_field(cfg, key, parse_value(text))


def apply_dict(cfg: RunConfig, tree: dict[str, Any], source: str) -> None:
    """Apply a nested dict such as a parsed YAML file: ``{"optim": {"lr": 0.8}, "method": {...}}``."""
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise UserError(f"{source}: section {section!r} must be a mapping of key: value")
        for key, value in values.items():
            set_field(cfg, f"{section}.{key}", value)


PRESET_DIR = Path(__file__).resolve().parent / "presets"


def preset_names() -> list[str]:
    """Packaged presets, named by their path under ``locallearn/presets`` without ``.yaml`` (e.g. "parity/e2e")."""
    return sorted(str(p.relative_to(PRESET_DIR).with_suffix("")) for p in PRESET_DIR.rglob("*.yaml"))


def find_config(name: str | Path) -> Path:
    """A YAML path, or the name of a packaged preset."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = PRESET_DIR / f"{name}.yaml"
    if packaged.is_file():
        return packaged
    raise UserError(
        f"config file {name} not found: pass the path of a YAML file or a preset name (`locallearn list` shows them)"
    )


def load_yaml(cfg: RunConfig, path: str | Path) -> None:
    """Apply a YAML file; a top-level ``base: NAME`` loads that file (beside this one, or a preset) first."""
    path = find_config(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML ({err.__class__.__name__}): fix its syntax") from None
    if not isinstance(tree, dict):
        raise UserError(f"config file {path} must hold a mapping of sections (data, model, optim, train, method)")
    base = tree.pop("base", None)
    if base is not None:
        sibling = path.parent / f"{base}.yaml"
        load_yaml(cfg, sibling if sibling.is_file() else base)
    apply_dict(cfg, tree, str(path))


def from_dict(tree: dict[str, Any]) -> RunConfig:
    """Rebuild a ``RunConfig`` from ``to_dict()`` output (e.g. the one stored in a checkpoint)."""
    cfg = RunConfig()
    apply_dict(cfg, tree, "checkpoint config")
    return cfg


def dump_yaml(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


_POSITIVE = ("train.epochs", "train.batch_size", "train.eval_batch_size", "train.K", "train.max_steps",
             "data.limit_train", "data.limit_test", "data.image_size", "data.in_channels", "data.num_classes",
             "data.synthetic_train_size", "data.synthetic_test_size", "data.crop_size", "data.pad_to",
             "data.channels", "train.malloc_mmap_threshold", "dist.replicas", "dist.in_flight")  # fmt: skip
_NON_NEGATIVE = ("train.seed", "train.checkpoint_every", "data.workers", "dist.staleness", "optim.weight_decay",
                 "optim.warmup_epochs", "train.log_every", "train.mixup", "train.cutmix")  # fmt: skip
_CHOICES = {
    "train.step_order": ("per_block", "after_all"),
    "train.amp": AMP,
    "train.mixup_mode": MIXUP_MODES,
    "train.checkpointing": ("none", "stage", "aux", "stage+aux"),
    "train.nonfinite": ("stop", "skip", "off"),
    "train.compile": COMPILE_MODES,
    "train.tensorboard": TENSORBOARD,
    "optim.schedule": SCHEDULES,
    "optim.schedule_unit": ("step", "epoch"),
    "dist.parallel": ("auto", "none", "data", "pipeline"),
    "data.crop_pad_mode": ("dataset", "constant", "reflect"),
}


def validate(cfg: RunConfig) -> None:
    """Reject out-of-range values and unknown choices before any work, naming the field and what it accepts.

    Names that need a registry (methods, datasets, architectures, splits) are checked where they are looked up, with
    the same kind of message (:class:`UserError`)."""

    def get(dotted: str) -> Any:
        section, _, key = dotted.partition(".")
        return getattr(getattr(cfg, section), key)

    for name in _POSITIVE:
        value = get(name)
        if value is not None and value < 1:
            raise UserError(f"{name} must be >= 1, got {value}: pass a positive number")
    for name in _NON_NEGATIVE:
        if get(name) < 0:
            raise UserError(f"{name} must be >= 0, got {get(name)}")
    for name, choices in _CHOICES.items():
        if get(name) not in choices:
            raise UserError(f"{name} must be one of {', '.join(choices)}, got {get(name)!r}")
    if not cfg.optim.lr > 0 or not cfg.optim.warmup_start_lr >= 0:
        raise UserError(f"optim.lr must be > 0 and optim.warmup_start_lr >= 0, got {cfg.optim.lr}, "
                        f"{cfg.optim.warmup_start_lr}")  # fmt: skip
    if not 0 <= cfg.optim.momentum < 1:
        raise UserError(f"optim.momentum must be in [0, 1), got {cfg.optim.momentum}")
    check_optim(cfg.optim)
    if not 0 <= cfg.train.label_smoothing < 1:
        raise UserError(f"train.label_smoothing must be in [0, 1), got {cfg.train.label_smoothing}")
    for name in ("mixup_prob", "mixup_switch_prob"):
        if not 0 <= getattr(cfg.train, name) <= 1:
            raise UserError(f"train.{name} must be in [0, 1], got {getattr(cfg.train, name)}")
    if cfg.train.keep_checkpoints < 2:
        raise UserError(f"train.keep_checkpoints must be >= 2 (a complete one survives a failed write), got "
                        f"{cfg.train.keep_checkpoints}")  # fmt: skip
    if not cfg.dist.timeout_s > 0:
        raise UserError(f"dist.timeout_s must be > 0 seconds, got {cfg.dist.timeout_s}")
    stages = cfg.dist.stages
    if stages is not None and (not all(isinstance(s, int) and not isinstance(s, bool) for s in stages)):
        raise UserError(f"dist.stages must be a list of block indices, e.g. [2], got {stages!r}")
