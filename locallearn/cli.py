"""The ``locallearn`` command: ``train``, ``eval`` and ``list``.

Bad input (an unknown name, a missing file, a K that does not fit) prints one ``error:`` line naming the problem and
the fix, and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from locallearn.errors import UserError
from locallearn.options import AMP, CHECKPOINTING, STEP_ORDERS

# named flag -> config field; every other field is reachable as --section.key=value
TRAIN_FLAGS = {
    "dataset": "data.name",
    "data_dir": "data.data_dir",
    "limit_train": "data.limit_train",
    "limit_test": "data.limit_test",
    "holdout": "data.holdout",
    "image_size": "data.image_size",
    "in_channels": "data.in_channels",
    "num_classes": "data.num_classes",
    "workers": "data.workers",
    "arch": "model.arch",
    "method": "train.method",
    "K": "train.K",
    "split": "train.split",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "batch_size": "train.batch_size",
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "optimizer": "optim.name",
    "clip_grad_norm": "optim.clip_grad_norm",
    "label_smoothing": "train.label_smoothing",
    "mixup": "train.mixup",
    "cutmix": "train.cutmix",
    "seed": "train.seed",
    "device": "train.device",
    "out": "train.out",
    "resume": "train.resume",
    "checkpoint_every": "train.checkpoint_every",
    "amp": "train.amp",
    "step_order": "train.step_order",
    "tensorboard": "train.tensorboard",
    "log_every": "train.log_every",
    "parallel": "dist.parallel",
    "staleness": "dist.staleness",
    "replicas": "dist.replicas",
}


def _limit(text: str) -> int | str:
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of examples or 'all'") from None


def _train_parser(sub: argparse._SubParsersAction) -> None:  # long by nature: one add_argument per flag
    p = sub.add_parser(
        "train",
        help="train a network as K gradient-isolated blocks",
        description="Train a network with a local-learning method. Any config field can also be set "
        "as --section.key=value (e.g. --optim.warmup_epochs=10 --method.n_conv=2).",
    )
    p.add_argument(
        "--config", action="append", help="YAML config file (see configs/); repeatable, later files win; flags win"
    )
    p.add_argument("--dataset", help="fashion-mnist (default), cifar10, svhn, stl10, imagenet, synthetic")
    p.add_argument("--data-dir", help="dataset root (torchvision's layout)")
    p.add_argument("--download", action="store_true", default=None, help="let torchvision download the dataset")
    p.add_argument(
        "--limit-train",
        type=_limit,
        help="use the first N training examples (ImageNet: N spread evenly over the classes), or 'all' "
        "(default 10000: the short demo run)",
    )
    p.add_argument(
        "--limit-test",
        type=_limit,
        help="use the first N test examples (ImageNet: spread over the classes), or 'all' (default)",
    )
    p.add_argument(
        "--holdout",
        type=int,
        help="hold the last N training examples out and evaluate on them instead of the test set (a validation "
        "split for choosing hyper-parameters; in-memory datasets)",
    )
    p.add_argument("--image-size", type=int, help="synthetic: image side")
    p.add_argument("--in-channels", type=int, help="synthetic: image channels")
    p.add_argument("--num-classes", type=int, help="synthetic: classes")
    p.add_argument("--workers", type=int, help="data loader workers (file-backed datasets)")
    p.add_argument(
        "--arch",
        help="resnet32 (default), resnet20/56/110, resnet18/34/50/101/152, resnext101_32x8d, vgg13, or any "
        "torchvision:NAME / timm:NAME (e.g. torchvision:resnet18, timm:vit_tiny_patch16_224); constructor options "
        "as --model.kwargs=\"{'patch_size': 4}\"",
    )
    p.add_argument("--method", help="e2e, dgl (default), …: see `locallearn list`")
    p.add_argument("--K", type=int, help="number of gradient-isolated blocks (default: 1 for e2e, else 4)")
    p.add_argument(
        "--split",
        help="even (default), layerwise, balanced, or published cuts: infopro, infopro-balanced, man, man++, dgl",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="base learning rate")
    p.add_argument("--weight-decay", type=float)
    p.add_argument(
        "--optimizer",
        help="sgd (default), adamw, adam, rmsprop, or a timm optimizer (lamb, lion, adan, ...); betas, eps, "
        "weight-decay groups as --optim.betas=[0.9,0.95] --optim.filter_bias_and_bn=true",
    )
    p.add_argument("--clip-grad-norm", type=float, help="clip each block's gradient to this total norm")
    p.add_argument("--label-smoothing", type=float, help="ε of every classifier's cross-entropy (aux heads too)")
    p.add_argument("--mixup", type=float, help="mixup α (timm's Mixup; 0: off)")
    p.add_argument("--cutmix", type=float, help="cutmix α (0: off)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--amp", choices=AMP)
    p.add_argument("--step-order", choices=STEP_ORDERS)
    p.add_argument("--out", help="run directory (default runs/<time>-<method>-<arch>-K<k>)")
    p.add_argument("--overwrite", action="store_true", default=None, help="allow a non-empty --out")
    p.add_argument(
        "--resume",
        help="auto: continue from the newest complete checkpoint in --out (a fresh run when there is none); or the "
        "path of a checkpoint",
    )
    p.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps (default 0: at epoch ends)")
    from locallearn.options import TENSORBOARD  # torch-free, like the choices above

    p.add_argument(
        "--tensorboard",
        choices=TENSORBOARD,
        help="event files in OUT/tensorboard/ (default auto: when the tensorboard package is installed; on: required)",
    )
    p.add_argument(
        "--log-every",
        type=int,
        metavar="N",
        help="TensorBoard: per-step scalars every N training steps (default 50; 0: epoch ends only)",
    )
    p.add_argument(
        "--parallel",
        choices=["auto", "none", "data", "pipeline"],
        help="under torchrun: data (default) or pipeline (one stage of blocks per process); see docs/distributed.md",
    )
    p.add_argument(
        "--replicas",
        type=int,
        help="pipeline: R data-parallel copies of the pipeline, a grid of (processes / R) stages x R (default 1)",
    )
    p.add_argument(
        "--staleness",
        type=int,
        help="pipeline with MAN: steps block k's EMA copy may lag block k+1 on the next stage (default 0: exact)",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        default=None,
        help="deterministic kernels only: two runs with the same seed, device and thread count are bitwise equal",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="print only the summary")


def build_config(args: argparse.Namespace, overrides: list[str]):
    from locallearn.config import RunConfig, apply_overrides, load_yaml, set_field

    cfg = RunConfig()
    for path in args.config or []:
        load_yaml(cfg, path)
    for flag, dotted in TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value == "all":
            value = None  # --limit-train all: no limit
            set_field(cfg, dotted, value)
        elif value is not None:
            set_field(cfg, dotted, value)
    if args.download:
        cfg.data.download = True
    if args.overwrite:
        cfg.train.overwrite = True
    if args.deterministic:
        cfg.train.deterministic = True
    if args.no_progress or args.quiet:
        cfg.train.progress = False
    bad = [o for o in overrides if not o.startswith("--") or "." not in o.split("=")[0]]
    if bad:
        raise UserError(
            f"unrecognised argument(s) {' '.join(bad)}: see `locallearn train --help`, or set a config "
            "field with --section.key=value"
        )
    apply_overrides(cfg, [o[2:] for o in overrides])
    return cfg


def _print_summary(summary: dict) -> None:
    print(json.dumps(summary, indent=2))


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> None:
    from locallearn.distributed.context import shutdown
    from locallearn.runner import train

    cfg = build_config(args, overrides)
    ended = False
    try:
        summary = train(cfg)
        ended = True
    finally:
        shutdown(wait_for_peers=ended)
    if summary is not None:  # under torchrun only rank 0 has one
        _print_summary(summary)


def cmd_sweep(args: argparse.Namespace) -> None:
    from locallearn.report import terminal_summary
    from locallearn.sweep import expand, load_grid, sweep

    grid = load_grid(args.grid)
    out = Path(args.out)
    if args.dry_run:
        for trial in expand(grid):
            done = (out / "runs" / trial.name / "summary.json").is_file()
            print(f"{'done' if done else 'todo'}  {trial.name}  ({trial.label}, seed {trial.seed})")
        return
    results = sweep(grid, out, jobs=args.jobs)
    print(terminal_summary([out / "runs" / r["run"] for r in results]))
    print(f"report: {out / 'report.md'}")


def cmd_report(args: argparse.Namespace, argv: list[str] | None) -> None:
    from locallearn.report import terminal_summary, write_report

    paths = [Path(p) for p in args.runs]
    out = Path(args.out or "report")
    command = "locallearn " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    write_report(paths, out, title=args.title, command=command)
    print(terminal_summary(paths))
    print(f"report: {out / 'report.md'}")


def cmd_eval(args: argparse.Namespace) -> None:
    from locallearn.checkpoint import evaluate_checkpoint

    _print_summary(evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir, device=args.device))


def cmd_export(args: argparse.Namespace) -> None:
    from locallearn.export import export_checkpoint

    report = export_checkpoint(
        args.checkpoint, args.format, args.out, early_exit=args.early_exit, data_dir=args.data_dir
    )
    _print_summary(report)


def cmd_exits(args: argparse.Namespace) -> None:
    from locallearn.exits import calibrate, summary_line

    report = calibrate(
        args.checkpoint,
        holdout=args.holdout,
        max_drop=args.max_drop,
        confidence=args.confidence,
        data_dir=args.data_dir,
        latency_seconds=args.latency_seconds,
    )
    print(summary_line(report), file=sys.stderr)
    _print_summary(report)


def cmd_bench(args: argparse.Namespace, rest: list[str], argv: list[str] | None) -> None:
    from pathlib import Path

    from locallearn.bench import BenchConfig, run_bench, save
    from locallearn.compare import machine
    from locallearn.config import parse_value
    from locallearn.metrics import resolve_device

    options, model_kwargs, optim = {}, {}, {}
    for item in rest:
        key, sep, value = item.partition("=")
        if key == "--model.kwargs" and sep and isinstance(parse_value(value), dict):
            model_kwargs = parse_value(value)
        elif key.startswith("--method.") and sep:
            options[key[len("--method.") :]] = parse_value(value)
        elif key.startswith("--optim.") and sep:  # the optimizer's state is part of the memory (AdamW keeps two)
            optim[key[len("--optim.") :]] = parse_value(value)
        else:
            raise UserError(
                f"unrecognised argument {item!r}: bench takes --method.<option>=<value> and --optim.<field>=<value> "
                'overrides and --model.kwargs="{...}"'
            )
    if optim:
        from locallearn.config import RunConfig, set_field

        checked = RunConfig()
        for key, value in optim.items():
            set_field(checked, f"optim.{key}", value)  # the train command's type checks and messages
    cfg = BenchConfig(
        arch=args.arch,
        model_kwargs=model_kwargs,
        image_size=args.image_size,
        in_channels=args.in_channels,
        num_classes=args.num_classes,
        batch_size=args.batch_size,
        method=args.method,
        method_options=options,
        optim=optim,
        ks=args.K,
        splits=args.split,
        local_checkpointing=args.local_checkpointing,
        time_steps=args.time_steps,
        warmup_steps=args.warmup_steps,
        device=str(resolve_device(args.device)),
        measure=args.measure,
        malloc_mmap_threshold=args.malloc_mmap_threshold,
    )
    rows = run_bench(cfg, log=lambda line: print(line, file=sys.stderr))
    command = "locallearn " + " ".join(argv if argv is not None else sys.argv[1:])
    print(save(cfg, rows, Path(args.out), machine(), command))


def cmd_compare(args: argparse.Namespace, argv: list[str] | None) -> None:
    from pathlib import Path

    from locallearn.compare import compare, merge

    command = "locallearn " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.merge:
        print(merge([Path(d) for d in args.merge], Path(args.out), command))
        return
    print(compare(args.suite, args.seeds, args.K, args.set, Path(args.out), command, args.rows, args.protocol))


def cmd_list(args: argparse.Namespace) -> None:
    if args.cuts:
        from locallearn.cuts_report import describe_cuts

        print(describe_cuts(args.cuts, args.image_size, args.in_channels, args.num_classes))
        return
    from locallearn.config import preset_names
    from locallearn.data import DATASETS
    from locallearn.methods import METHODS
    from locallearn.models import MODELS, split_names

    print("archs:    ", ", ".join(MODELS.names()), "(and torchvision:NAME, timm:NAME)")
    print("methods:  ", ", ".join(METHODS.names()))
    print("datasets: ", ", ".join(DATASETS.names()))
    print("splits:   ", ", ".join(split_names()))
    print("presets:  ", ", ".join(preset_names()))
    from locallearn.sweep import grid_names

    print("grids:    ", ", ".join(grid_names()), "(locallearn sweep NAME --out DIR)")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    """`locallearn eval`: a checkpoint on its test set."""
    p_eval = sub.add_parser("eval", help="evaluate a saved checkpoint on its test set")
    p_eval.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt")
    p_eval.add_argument("--data-dir", help="dataset root, if it moved since training")
    p_eval.add_argument("--device", default="auto")


def _export_parser(sub: argparse._SubParsersAction) -> None:
    """`locallearn export`: a checkpoint's network (or its early-exit network) as torch.export or ONNX."""
    p = sub.add_parser("export", help="write a checkpoint's network as torch.export (.pt2) or ONNX, checked")
    p.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt")
    p.add_argument("--format", required=True, choices=["exported", "onnx"], help="torch.export program or ONNX")
    p.add_argument("--out", required=True, help="the file to write (a directory with --early-exit); never overwritten")
    p.add_argument(
        "--early-exit",
        type=float,
        metavar="T",
        help="write the early-exit network instead: one graph per block and per auxiliary head, threshold T",
    )
    p.add_argument("--data-dir", help="dataset root, if it moved since training (a test batch checks the export)")


def _exits_parser(sub: argparse._SubParsersAction) -> None:
    """`locallearn exits`: calibrate a checkpoint's early exits on held-out data."""
    p = sub.add_parser("exits", help="calibrate early exits on held-out data: accuracy against MACs, exits.json")
    p.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt (exits.json is written beside it)")
    p.add_argument("--holdout", type=int, help="the last N training examples (default: the run's own --holdout)")
    p.add_argument("--max-drop", type=float, default=0.5, help="accuracy points the exits may lose (default 0.5)")
    p.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        help="how sure the held-out images must make us that the drop is within --max-drop (one-sided, default "
        "0.95; 0.5: the held-out drop as it is)",
    )
    p.add_argument(
        "--latency-seconds",
        type=float,
        default=2.0,
        help="time each CPU latency figure for about this long (default 2; 0: no latency figures)",
    )
    p.add_argument("--data-dir", help="dataset root, if it moved since training")


def _list_parser(sub: argparse._SubParsersAction) -> None:
    """`locallearn list`: archs, methods, datasets, splits, presets; a model's cuts."""
    p_list = sub.add_parser("list", help="list architectures, methods, datasets, splits and presets")
    p_list.add_argument("--cuts", metavar="ARCH", help="show ARCH's valid cut points and segments, with their shapes")
    p_list.add_argument("--image-size", type=int, default=32, help="--cuts: input side")
    p_list.add_argument("--in-channels", type=int, default=3, help="--cuts: input channels")
    p_list.add_argument("--num-classes", type=int, default=10, help="--cuts: classes")


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    """`locallearn bench`: memory and speed rows (one flag per BenchConfig field)."""
    p_bench = sub.add_parser("bench", help="benchmark peak memory and speed: E2E, checkpointing, local at several K")
    p_bench.add_argument("--arch", default="resnet110")
    p_bench.add_argument("--image-size", type=int, default=32)
    p_bench.add_argument("--in-channels", type=int, default=3)
    p_bench.add_argument("--num-classes", type=int, default=10)
    p_bench.add_argument("--batch-size", type=int, default=1024)
    p_bench.add_argument("--method", default="infopro+man")
    p_bench.add_argument("--K", type=int, nargs="+", default=[2, 3, 4])
    p_bench.add_argument("--split", nargs="+", default=["even", "balanced"])
    p_bench.add_argument(
        "--local-checkpointing",
        nargs="+",
        default=["none"],
        choices=list(CHECKPOINTING),
        help="recomputation for the local rows (aux: each auxiliary-net segment; see locallearn.recompute)",
    )
    p_bench.add_argument("--time-steps", type=int, default=3, help="timed training steps per row (0: memory only)")
    p_bench.add_argument("--warmup-steps", type=int, default=1)
    p_bench.add_argument(
        "--measure",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure every row for real in a fresh process, beside the estimate (--no-measure: estimates only)",
    )
    p_bench.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="bytes: glibc serves larger allocations by mmap in the measuring processes, so freed activations leave "
        "the resident set at once (e.g. 262144; see locallearn/allocator.py)",
    )
    p_bench.add_argument("--device", default="auto")
    p_bench.add_argument("--out", required=True, help="directory for bench.json, bench.md and bench.png")


def _compare_parser(sub: argparse._SubParsersAction) -> None:
    """`locallearn compare`: the packaged benchmark suites."""
    p_cmp = sub.add_parser("compare", help="benchmark: several methods × seeds → a markdown table")
    p_cmp.add_argument("--suite", choices=["parity", "methods"], default="methods")
    p_cmp.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p_cmp.add_argument("--K", type=int, nargs="+", default=[4, 16], help="methods suite: nominal K values")
    p_cmp.add_argument(
        "--protocol",
        choices=["default", "parity"],
        default="default",
        help="methods suite: 'parity' runs every method under the official code's Fashion-MNIST protocol "
        "(methods.md §9: 3x32x32, 10,000 images, 3 epochs); --set overrides still apply on top",
    )
    p_cmp.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="overrides applied to every run, e.g. train.epochs=2 data.limit_train=2000",
    )
    p_cmp.add_argument("--out", required=True, help="directory for runs/, results.json and table.md")
    p_cmp.add_argument("--rows", nargs="*", help="run only the rows whose name contains one of these words")
    p_cmp.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="train nothing: pool the results.json of earlier compare runs (e.g. one seed per process) into one table",
    )


def _sweep_parser(sub: argparse._SubParsersAction) -> None:
    """`locallearn sweep`: a grid of runs."""
    p_sweep = sub.add_parser(
        "sweep",
        help="run a grid of configurations (GRID.yaml) one after another; a stopped sweep resumes; ends with a report",
        description="Run every configuration of a grid file (see locallearn.sweep: base, set, grid, exclude, seeds, "
        "runs) as its own `locallearn train`, skipping finished runs and continuing stopped ones from their "
        "checkpoints, then write DIR/report.md.",
    )
    p_sweep.add_argument("grid", help="a grid YAML file, or a packaged grid name (e.g. parity)")
    p_sweep.add_argument("--out", required=True, help="directory for configs/, runs/, logs/, results.json, report.md")
    p_sweep.add_argument("--jobs", type=int, default=None, help="runs at once, one per GPU (default: one per GPU, 1)")
    p_sweep.add_argument("--dry-run", action="store_true", help="list the runs (and which are finished); train nothing")


def _report_parser(sub: argparse._SubParsersAction) -> None:
    """`locallearn report`: a report from run directories."""
    p_report = sub.add_parser("report", help="markdown report with plots from run directories (or a sweep's --out)")
    p_report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or directories holding them")
    p_report.add_argument("-o", "--out", help="directory for report.md and its PNGs (default: ./report)")
    p_report.add_argument("--title", default="locallearn report")


def build_parser() -> argparse.ArgumentParser:
    """The ``locallearn`` parser: one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="locallearn", description="Supervised local learning for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _eval_parser, _export_parser, _exits_parser, _list_parser, _bench_parser,
                _compare_parser, _sweep_parser, _report_parser):  # fmt: skip
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("train", "bench"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    commands = {
        "train": lambda: cmd_train(args, rest),
        "eval": lambda: cmd_eval(args),
        "export": lambda: cmd_export(args),
        "exits": lambda: cmd_exits(args),
        "bench": lambda: cmd_bench(args, rest, argv),
        "compare": lambda: cmd_compare(args, argv),
        "sweep": lambda: cmd_sweep(args),
        "report": lambda: cmd_report(args, argv),
        "list": lambda: cmd_list(args),
    }
    try:
        commands[args.command]()
    except UserError as err:  # one line; the exit status says which kind (locallearn.errors)
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def entry() -> None:
    """The ``locallearn`` command and ``python -m locallearn``: :func:`main`, then the exit status."""
    code = main()
    from locallearn.distributed.context import exit_process, launched

    if launched():  # a rank of a distributed run: leave without finalisation (exit_process says why)
        exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
