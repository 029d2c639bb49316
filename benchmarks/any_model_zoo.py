"""Try locallearn on torchvision and timm families that no test names: cut, one dgl+man step, evaluate.

    python benchmarks/any_model_zoo.py            # every model below
    python benchmarks/any_model_zoo.py regnet     # the models whose name contains "regnet"

Each model goes through the Python API exactly as a user would write it, with no other argument:
``LocalLearner(model, method="dgl+man", K=4)``, one ``train_step(x, y)`` on random images, ``evaluate`` on the
same batch. Prints one markdown row per model (segments, where the K=4 blocks start, seconds) or the one-line
refusal. Not a test: it shows that families nobody wrote a rule for work without new code.
"""

from __future__ import annotations

import sys
import time

import torch
import torchvision

from locallearn import LocalLearner

tv = torchvision.models


def _timm(name: str, **kwargs):
    import timm

    return lambda: timm.create_model(name, num_classes=10, **kwargs)


# name -> (constructor, image side)
ZOO = {
    "torchvision regnet_x_400mf": (lambda: tv.regnet_x_400mf(num_classes=10), 32),
    "torchvision mnasnet0_5": (lambda: tv.mnasnet0_5(num_classes=10), 32),
    "torchvision squeezenet1_1": (lambda: tv.squeezenet1_1(num_classes=10), 32),
    "torchvision wide_resnet50_2": (lambda: tv.wide_resnet50_2(num_classes=10), 32),
    "torchvision googlenet (aux_logits=False)": (
        lambda: tv.googlenet(num_classes=10, aux_logits=False, init_weights=True),
        64,
    ),
    "torchvision maxvit_t": (lambda: tv.maxvit_t(num_classes=10), 224),
    "timm levit_128s": (_timm("levit_128s", img_size=32), 32),
    "timm poolformer_s12": (_timm("poolformer_s12"), 32),
    "timm mobilevit_xxs": (_timm("mobilevit_xxs"), 64),
    "timm cait_xxs24_224": (_timm("cait_xxs24_224", img_size=32, patch_size=4, depth=4), 32),
    "timm regnety_002": (_timm("regnety_002"), 32),
    "timm ghostnet_100": (_timm("ghostnet_100"), 32),
    "timm efficientformer_l1 at 64 px (built for 224)": (_timm("efficientformer_l1"), 64),
}


def try_model(make, side: int) -> str:
    start = time.perf_counter()
    try:
        model = make()
        learner = LocalLearner(model, method="dgl+man", K=4)
        x, y = torch.rand(4, 3, side, side), torch.randint(0, 10, (4,))
        learner.train_step(x, y)
        report = learner.evaluate([(x, y)])
    except Exception as err:  # a refusal is a result here
        return f"refused: {type(err).__name__}: {err} | – | – | – |"
    starts = ", ".join(learner.model.names[b] for b in learner.bounds)
    seconds = time.perf_counter() - start
    return f"{len(learner.model.names)} | {starts} | {len(report['block_accuracies'])} | {seconds:.1f} |"


def main(patterns: list[str]) -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads")
    print("| model | image | segments | blocks 2–4 start at | block accuracies | seconds |")
    print("|---|---|---|---|---|---|")
    for name, (make, side) in ZOO.items():
        if patterns and not any(p in name for p in patterns):
            continue
        print(f"| {name} | {side}² | {try_model(make, side)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
