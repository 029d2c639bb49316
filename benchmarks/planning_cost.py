"""What planning a memory-balanced split costs: peak-RSS growth and seconds of ``split_costs``, in a fresh process.

    python benchmarks/planning_cost.py --arch resnet101 --image-size 224 --method dgl
    python benchmarks/planning_cost.py --arch resnet101 --image-size 224 --method infopro+man \
        --option head=bottleneck --option decoder=upsampling

Measured from inside the process that plans, after the model exists: the growth of the maximum resident set
(``getrusage``) over the call, and its wall time. ``--real`` measures the former way (real tensors: a throw-away
learner with real auxiliary nets at every possible cut), for comparison. Run it alone: the machine's other jobs
change the seconds, not the bytes.
"""

from __future__ import annotations

import argparse
import resource
import time

from locallearn.config import parse_value
from locallearn.memory import head_costs, layer_costs, split_costs
from locallearn.models import as_layered, create_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet101")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--method", default="dgl")
    p.add_argument("--option", action="append", default=[], help="method option KEY=VALUE (repeatable)")
    p.add_argument("--real", action="store_true", help="plan on real tensors (the former way)")
    args = p.parse_args()
    options = {k: parse_value(v) for k, _, v in (o.partition("=") for o in args.option)}
    shape = (3, args.image_size, args.image_size)
    model = as_layered(create_model(args.arch, num_classes=1000, image_size=args.image_size), shape)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if args.real:
        layers, cuts = layer_costs(model, shape), head_costs(model, args.method, options, shape)
    else:
        layers, cuts = split_costs(model, args.method, options, shape)
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    print(
        f"{args.arch} {args.image_size}px {args.method} {options or ''} {'real' if args.real else 'fake'} tensors: "
        f"{len(cuts) - 2} possible cuts, peak RSS +{grown:.2f} GiB, {seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
