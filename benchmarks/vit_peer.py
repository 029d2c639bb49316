"""The peer of docs/benchmarks/transformers.md: a plain PyTorch training loop with timm's ViT-Tiny on Fashion-MNIST.

What a user would write without locallearn: ``timm.create_model``, timm's AdamW with its weight-decay groups
(``create_optimizer_v2``, no decay on 1-D parameters, position embedding and class token), ``LambdaLR`` for a linear
warm-up over the first 10 % of the steps and a cosine to 0, ``nn.CrossEntropyLoss(label_smoothing=0.1)``, one
``backward`` and ``step`` per batch. The recipe is ``recipes/vit_adamw``'s. The batches are locallearn's loader's (the
same images, order and augmentation as ``locallearn train`` at the same seed), so the comparison is of the training
loop alone; nothing else of locallearn is used.

    python benchmarks/vit_peer.py --seed 0 --out runs/vit-peer-s0.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import timm
import torch
from timm.optim import create_optimizer_v2
from torch import nn

from locallearn.data import DataConfig, build_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit-train", type=int, default=10000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--warmup-fraction", type=float, default=0.1)
    p.add_argument("--no-augment", action="store_true", help="no random crop (locallearn's --data.augment=false)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, help="write the per-epoch record as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    train, test, info = build_data(
        DataConfig(name="fashion-mnist", limit_train=args.limit_train, augment=not args.no_augment),
        args.batch_size,
        seed=args.seed,
    )
    model = timm.create_model(
        "vit_tiny_patch16_224", patch_size=4, img_size=info.image_size[0], in_chans=info.in_channels,
        num_classes=info.num_classes,
    )  # fmt: skip
    optimizer = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay)
    total = args.epochs * len(train)
    warm = args.warmup_fraction * total

    def factor(step: int) -> float:  # times lr: linear warm-up from 0, then cosine to 0, per step
        cosine = 0.5 * (1 + math.cos(math.pi * step / total))
        return cosine * step / warm if step < warm else cosine

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    records = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        train.set_epoch(epoch)
        seen, epoch_start, loss_sum = 0, time.perf_counter(), 0.0
        for batch in train:
            loss = criterion(model(batch.x), batch.y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item()
            seen += batch.y.numel()
        seconds = time.perf_counter() - epoch_start
        model.eval()
        correct = n = 0
        with torch.no_grad():
            for batch in test:
                correct += (model(batch.x).argmax(1) == batch.y).sum().item()
                n += batch.y.numel()
        record = {"epoch": epoch + 1, "train_loss": loss_sum / len(train), "test_accuracy": correct / n,
                  "images_per_second": seen / seconds}  # fmt: skip
        records.append(record)
        print(json.dumps(record), flush=True)
    summary = {
        "seed": args.seed, "threads": torch.get_num_threads(), "wall_seconds": time.perf_counter() - start,
        "test_accuracy": records[-1]["test_accuracy"], "epochs": records, "args": {**vars(args), "out": None},
    }  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
