"""Run the released MAN (JunhaoSu0/MAN @a6d20c5) or InfoPro (blackfeather-wang/InfoPro-Pytorch @a38362a) CIFAR code
on locallearn's §9 data: ResNet-32, InfoPro+MAN "K=16" (15 blocks, 2c2f) or InfoPro K=16 (16 blocks, 1c2f).

Not part of the package and not a test (CI has no copy of the official code). Two jobs, both on the parity protocol of
``shared/reference/methods.md`` §9 (``locallearn/presets/parity/infopro_man.yaml``):

``diff``  Builds the official model and locallearn's faithful preset (``parity/infopro_man`` or ``parity/infopro``),
          copies the official initial weights into locallearn (every backbone layer, learnable and EMA copy, auxiliary
          classifier and decoder), feeds both the same
          batches and reports, after every step, the largest relative difference over every parameter and buffer.
          ``--double`` runs both in float64, where an identical algorithm agrees to ~1e-15 and any real difference
          (an update order, a λ, an EMA timing) shows as ~1e-3 or more within a step or two.
``speed`` (MAN code only; ``--code`` is ignored) Times one training step of six runs on the same fixed batch, in one
          process, round-robin so that every run sees the same machine: the official end-to-end and InfoPro+MAN
          models, and locallearn's ``parity/e2e`` and ``parity/infopro_man`` presets in NHWC (locallearn's
          default) and NCHW (the official code's layout), with per-block steps. Prints img/s per run (median over
          rounds) and each codebase's InfoPro+MAN/E2E throughput ratio, the figure the issue compares (methods.md §9
          measured the official one from separate runs, ±20 %).
``train`` Trains the official model for the protocol's 234 steps on locallearn's batches (same data order and
          augmentation as ``locallearn compare --suite parity`` for that seed) and prints test accuracy per epoch,
          so the official code's seed-to-seed spread can be measured on identical data. With ``--locallearn`` it
          trains locallearn's preset instead, from the official model's initial weights for that seed (float32,
          contiguous layout): the same run end to end in both codebases.

The official code is imported unchanged from ``--repo`` (a checkout or ``git archive`` of the repository); its
device moves are made no-ops by patching ``Tensor.cuda``/``Module.cuda`` in this process, which is the only change
(methods.md §9's "changed only to run on CPU"). Its ``_image_restore`` is replaced by the batch's un-normalised image
(``Batch.raw``), which is what it computes, without the float32 rounding that methods.md §9 warns about.

    python benchmarks/official_parity.py diff --code man --repo /tmp/MAN --steps 20 --double
    python benchmarks/official_parity.py diff --code infopro --repo /tmp/InfoPro-Pytorch --steps 20 --double
    OMP_NUM_THREADS=1 python benchmarks/official_parity.py train --code man --repo /tmp/MAN --seed 1
    OMP_NUM_THREADS=2 python benchmarks/official_parity.py speed --repo /tmp/MAN --rounds 5
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from locallearn.config import RunConfig, find_config, load_yaml
from locallearn.data import build_data
from locallearn.runner import build_learner

STEPS = 234  # 3 epochs of 78 batches of 128


CODES = {  # --code: (folder in the repository, module under networks/, locallearn preset)
    "man": ("Exp on CIFAR-SVHN-STL", "resnetInfoPro_MAN", "parity/infopro_man"),
    "infopro": ("Experiments on CIFAR-SVHN-STL10", "resnet", "parity/infopro"),
}


def import_official(repo: Path, code: str):
    """Import the released ``networks.<module>`` with its ``cuda`` device moves turned into no-ops."""
    folder, module, _ = CODES[code]
    root = repo / folder
    if not (root / "networks" / f"{module}.py").is_file():
        sys.exit(f"--repo {repo}: no '{folder}/networks/{module}.py' there (is it the {code} repository?)")
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    sys.path.insert(0, str(root))
    return importlib.import_module(f"networks.{module}")


def official_model(official, code: str, local_module_num: int = 16) -> nn.Module:
    """ResNet-32 "K=16" as methods.md §9 ran it: MAN's InfoPro+MAN (15 blocks, 2c2f, m = 0.995) or InfoPro (16 blocks,
    1c2f), cross-entropy auxiliary loss; ``local_module_num=1`` is the code's end-to-end run (§9 row a)."""
    options = dict(
        local_module_num=local_module_num, batch_size=128, image_size=32, balanced_memory=False, dataset="cifar10",
        class_num=10, wide_list=(16, 16, 32, 64), dropout_rate=0, local_loss_mode="cross_entropy",
        aux_net_widen=1, aux_net_feature_dim=128,
    )  # fmt: skip
    if code == "man":
        return official.resnet32(aux_net_config="2c2f", momentum=0.995, **options)
    return official.resnet32(aux_net_config="1c2f", **options)


def official_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """train.py's optimizer: one SGD over every parameter (the frozen EMA copies get no gradient, so no step)."""
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


def official_step(model, opt, batch, t: int) -> None:
    """train.py's iteration: zero_grad, the forward (which runs every local backward), one step; cosine per step."""
    for group in opt.param_groups:
        group["lr"] = 0.05 * (1 + math.cos(math.pi * t / STEPS))
    model._image_restore = lambda img: batch.raw
    opt.zero_grad()
    model(img=batch.x, target=batch.y, ixx_1=5, ixy_1=0.5, ixx_2=0, ixy_2=0)
    opt.step()


def official_accuracy(model, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            logits, _ = model(img=batch.x, target=batch.y)
            correct += (logits.argmax(1) == batch.y).sum().item()
            total += batch.y.numel()
    model.train()
    return 100.0 * correct / total


def parity_config(code: str) -> RunConfig:
    cfg = preset_config(CODES[code][2])
    cfg.train.channels_last = False  # same kernels as the official model, for the float64 comparison
    return cfg


def preset_config(name: str) -> RunConfig:
    cfg = RunConfig()
    load_yaml(cfg, find_config(name))
    return cfg


def module_pairs(learner, model, code: str) -> list[tuple[str, nn.Module, nn.Module, tuple[str, ...]]]:
    """(name, locallearn module, official module, official state keys to skip), in matching state_dict order.

    locallearn's layer 0 is the stem (official ``conv1``/``bn1``, position (0, 0)); layer j = 1..15 is the official
    ``layer{s}[l]`` with s = (j−1)//5 + 1, l = (j−1) % 5. MAN's code names block k's auxiliary nets after the *next*
    block's first layer (``bounds[k]``), InfoPro's after block k's own last layer (``bounds[k] − 1``). The official
    decoder's first conv has a bias in front of a train-mode BatchNorm (its gradient is exactly 0); locallearn's has
    none, so it is zeroed there and skipped.
    """

    def position(j: int) -> tuple[int, int]:
        return (0, 0) if j == 0 else ((j - 1) // 5 + 1, (j - 1) % 5)

    pairs = [("stem", learner.model.layers[0], nn.Sequential(model.conv1, model.bn1), ())]
    for j in range(1, 16):
        s, i = position(j)
        pairs.append((f"layer{j}", learner.model.layers[j], getattr(model, f"layer{s}")[i], ()))
    classifier = model.fc64 if code == "man" else model.fc
    pairs.append(("classifier", learner.model.layers[16], nn.Sequential(classifier), ()))
    method = learner.method
    for k, bound in enumerate(learner.bounds):
        s, i = position(bound if code == "man" else bound - 1)
        decoder = getattr(model, f"decoder_{s}_{i}").decoder
        with torch.no_grad():
            decoder[0].bias.zero_()
        if code == "man":
            pairs.append((f"LB{k}", method.learnable[k], model.LB[k], ()))
            pairs.append((f"EMA{k}", method.ema[k], model.EMA_Net[k], ()))
        pairs += [
            (f"head{k}", method.heads[k], getattr(model, f"aux_classifier_{s}_{i}").head, ()),
            (f"decoder{k}", method.decoders[k].body, decoder, ("0.bias",)),
        ]
    return pairs


def _states(ours: nn.Module, theirs: nn.Module, skip: tuple[str, ...]):
    a = list(ours.state_dict().items())
    b = [(k, v) for k, v in theirs.state_dict().items() if k not in skip]
    if len(a) != len(b):
        raise RuntimeError(f"state sizes differ: {[k for k, _ in a]} vs {[k for k, _ in b]}")
    for (ka, va), (kb, vb) in zip(a, b):
        if va.shape != vb.shape:
            raise RuntimeError(f"{ka} {tuple(va.shape)} vs {kb} {tuple(vb.shape)}")
    return [(ka, va, vb) for (ka, va), (_, vb) in zip(a, b)]


def copy_official_init(learner, model, code: str) -> list[tuple[str, nn.Module, nn.Module, tuple[str, ...]]]:
    """Copy every official parameter and buffer into locallearn's learner; returns the module pairs."""
    pairs = module_pairs(learner, model, code)
    with torch.no_grad():
        for _, ours, theirs, skip in pairs:
            for _, a, b in _states(ours, theirs, skip):
                a.copy_(b)
    return pairs


def diff(args) -> None:
    official = import_official(args.repo, args.code)
    dtype = torch.float64 if args.double else torch.float32
    torch.manual_seed(args.seed)
    cfg = parity_config(args.code)
    train_loader, _, info = build_data(cfg.data, 128, seed=args.seed, device="cpu", dtype=dtype)
    learner = build_learner(cfg, info, torch.device("cpu"), STEPS, len(train_loader))
    model = official_model(official, args.code)
    learner.model.to(dtype)
    learner.method.to(dtype)
    model.to(dtype).train()
    pairs = copy_official_init(learner, model, args.code)
    opt = official_optimizer(model)
    train_loader.set_epoch(0)
    worst_overall = 0.0
    for t, batch in zip(range(args.steps), train_loader):
        official_step(model, opt, batch, t)
        learner.train_step(batch)
        rows = []
        for name, ours, theirs, skip in pairs:
            for key, a, b in _states(ours, theirs, skip):
                if a.is_floating_point():
                    rel = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
                    rows.append((rel if rel == rel else math.inf, f"{name}.{key}"))
        rows.sort(key=lambda r: r[0], reverse=True)
        worst_overall = max(worst_overall, rows[0][0])
        print(f"step {t + 1}: largest relative difference {rows[0][0]:.2e} ({rows[0][1]}); next: "
              + ", ".join(f"{r:.1e} {n}" for r, n in rows[1:4]))  # fmt: skip
    print(f"largest relative difference over {args.steps} steps ({dtype}): {worst_overall:.2e}")


def train(args) -> None:
    official = import_official(args.repo, args.code)
    torch.manual_seed(args.seed)
    cfg = parity_config(args.code)
    train_loader, test_loader, info = build_data(cfg.data, 128, seed=args.seed, device="cpu", eval_batch_size=1000)
    model = official_model(official, args.code).train()  # the official initial weights for this seed
    if args.locallearn:  # locallearn's preset from those same weights: the whole run, official code vs ours
        learner = build_learner(cfg, info, torch.device("cpu"), STEPS, len(train_loader))
        copy_official_init(learner, model, args.code)
        del model
    else:
        opt = official_optimizer(model)
    t = 0
    for epoch in range(3):
        train_loader.set_epoch(epoch)
        start = time.perf_counter()
        for batch in train_loader:
            if args.locallearn:
                learner.train_step(batch)
            else:
                official_step(model, opt, batch, t)
            t += 1
        seconds = time.perf_counter() - start
        accuracy = (
            100 * learner.evaluate(test_loader)["test_accuracy"]
            if args.locallearn
            else official_accuracy(model, test_loader)
        )
        who = "locallearn from the official init" if args.locallearn else "official code"
        print(f"{who}, seed {args.seed}, epoch {epoch + 1}: test accuracy {accuracy:.2f} % "
              f"({seconds:.1f} s train, {t} steps)", flush=True)  # fmt: skip


def speed(args) -> None:
    official = import_official(args.repo, "man")
    torch.manual_seed(args.seed)
    cfg = preset_config("parity/e2e")
    train_loader, _, info = build_data(cfg.data, 128, seed=args.seed, device="cpu")
    train_loader.set_epoch(0)
    batch = next(iter(train_loader))
    steps = {}
    for method, k in (("E2E", 1), ("InfoPro+MAN", 16)):
        model = official_model(official, "man", local_module_num=k).train()
        opt, counter = official_optimizer(model), itertools.count()
        steps["official", method] = lambda m=model, o=opt, c=counter: official_step(m, o, batch, next(c))
    for layout, channels_last in (("NHWC", True), ("NCHW", False)):
        for method, preset in (("E2E", "parity/e2e"), ("InfoPro+MAN", "parity/infopro_man")):
            cfg = preset_config(preset)
            cfg.train.step_order = "per_block"  # locallearn's default; the same arithmetic as after_all, less memory
            cfg.train.channels_last = channels_last
            learner = build_learner(cfg, info, torch.device("cpu"), STEPS, len(train_loader))
            steps[f"locallearn {layout}", method] = lambda learner=learner: learner.train_step(batch)
    for step in steps.values():
        for _ in range(args.warmup_steps):
            step()
    runs = list(steps)
    rates: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    for r in range(args.rounds):
        for run in runs[r % len(runs) :] + runs[: r % len(runs)]:  # rotate: no run always follows the same one
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[run]()
            rates[run].append(128 * args.steps / (time.perf_counter() - start))
        print(f"round {r + 1}: " + ", ".join(f"{' '.join(run)} {rates[run][-1]:.1f}" for run in runs), flush=True)
    median = {run: statistics.median(v) for run, v in rates.items()}
    threads = torch.get_num_threads()
    print(f"\n{threads} thread(s), batch 128, {args.rounds} rounds of {args.steps} steps, median img/s:")
    print("| code | E2E img/s | InfoPro+MAN img/s | InfoPro+MAN / own E2E | InfoPro+MAN / official's |")
    print("|---|---|---|---|---|")
    theirs = median["official", "InfoPro+MAN"]
    for who in dict.fromkeys(who for who, _ in runs):
        e2e, man = median[who, "E2E"], median[who, "InfoPro+MAN"]
        print(f"| {who} | {e2e:.1f} | {man:.1f} | {man / e2e:.3f} | {man / theirs:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("job", choices=["diff", "train", "speed"])
    parser.add_argument("--code", choices=sorted(CODES), default="man", help="which released codebase")
    parser.add_argument("--repo", type=Path, required=True, help="its checkout (JunhaoSu0/MAN or InfoPro-Pytorch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=5, help="diff: steps to compare; speed: timed steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="speed: timed rounds of every run")
    parser.add_argument("--warmup-steps", type=int, default=2, help="speed: untimed steps of every run first")
    parser.add_argument("--double", action="store_true", help="diff: run both in float64")
    parser.add_argument(
        "--locallearn", action="store_true", help="train: run locallearn's preset from the official initial weights"
    )
    args = parser.parse_args()
    {"diff": diff, "train": train, "speed": speed}[args.job](args)


if __name__ == "__main__":
    main()
