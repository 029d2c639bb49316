"""Cutting a :class:`LayeredModel` into K gradient-isolated blocks.

One convention everywhere: a split is the list of ``K-1`` *boundaries*, increasing layer indices at which a new block
starts, so block k is ``layers[b[k-1]:b[k]]``. The classifier (the last atomic layer) always belongs to the last
block, so each block ends on a feature layer and the largest possible K is the number of feature layers.

``K`` always means the number of blocks actually trained. The papers' tables are stored as the *cut points* they
list ("cut after block (stage, i)"), from ``shared/reference/methods.md`` §3.2 and §1.3, and keyed here by the
true block count. Where a paper's name for a split differs, the preset says so:

* ``infopro`` — InfoPro's ``configs.py`` (ICLR 2021). Its "K" equals the true count; the K=16 ResNet-32 split puts
  the stem in a block of its own. ResNet-110 K=55 (one block per layer, as AugLocal/MAN++ use it) is included.
* ``infopro-balanced`` — InfoPro* memory-balanced ResNet-110 cuts for CIFAR-10 (Table 3), K = 2, 3, 4.
* ``man`` — MAN's released ``config.py`` (ECCV 2024): InfoPro's cuts *without* the stem cut, so MAN's published
  "K=16" on ResNet-32 is ``--split man --K 15`` and its "K=55" on ResNet-110 is ``--split man --K 54``.
* ``man++`` — MAN++'s released ``config.py``: MAN's cuts plus the stem as a block of its own, so its "K=8" is
  ``--K 9``, "K=16" ``--K 16``, "K=32" ``--K 33`` and "K=55" ``--K 55``.
* ``dgl`` — DGL's (ICML 2020) VGG-13 "block size 3" split for ImageNet, K=4 (its K=10 is ``layerwise``).
* ImageNet ResNets (``resnet101``, ``resnet152``, ``resnext101_32x8d``, ``resnet34``) under ``infopro`` (InfoPro*
  K=2, methods.md §3.4), ``man`` (K=2, 4; §1.4) and ``man++`` (K=2, 4; §2.1). There the stem stays in block 1 for
  all three, so MAN++'s ImageNet K equals MAN's.
* ``even`` — any K: the feature layers dealt into K contiguous groups of near-equal count.
* ``layerwise`` — any K: each of the first K-1 feature layers is a block of its own and the rest form the last
  block. AugLocal's "K=16, d=2" on ResNet-32 is ``--split layerwise --K 14`` (it merges the last d layers).
"""

from __future__ import annotations

from torch import nn

from locallearn.errors import UserError
from locallearn.models.layered import LayeredModel

Cut = tuple[int, int]  # (stage, block index from 0); (0, 0) is the stem

_R32_INFOPRO: dict[int, list[Cut]] = {
    2: [(2, 1)],
    3: [(1, 4), (2, 4)],
    4: [(1, 2), (2, 1), (3, 0)],
    8: [(1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2)],
    16: [(0, 0)] + [(s, i) for s in (1, 2, 3) for i in range(5) if (s, i) != (3, 4)],
}
_R110_INFOPRO: dict[int, list[Cut]] = {
    2: [(2, 8)],
    3: [(1, 17), (2, 17)],
    4: [(1, 11), (2, 7), (3, 3)],
    8: [(1, 4), (1, 11), (2, 0), (2, 7), (2, 14), (3, 3), (3, 10)],
    16: [
        (1, 1),
        (1, 4),
        (1, 7),
        (1, 10),
        (1, 13),
        (1, 16),
        (2, 1),
        (2, 4),
        (2, 7),
        (2, 11),
        (2, 15),
        (3, 1),
        (3, 5),
        (3, 9),
        (3, 13),
    ],
    55: [(0, 0)] + [(s, i) for s in (1, 2, 3) for i in range(18) if (s, i) != (3, 17)],
}
_R110_MAN32: list[Cut] = (
    [(1, i) for i in (1, 2, 4, 5, 7, 9, 11, 13, 14, 16, 17)]
    + [(2, i) for i in (1, 2, 4, 5, 7, 9, 11, 13, 14, 16, 17)]
    + [(3, i) for i in (1, 3, 4, 6, 7, 9, 11, 13, 15)]
)


def _without_stem(table: dict[int, list[Cut]]) -> dict[int, list[Cut]]:
    """MAN glues the stem to block 1: drop a stem cut, which lowers that entry's true K by one."""
    out = {}
    for cuts in table.values():
        kept = [c for c in cuts if c != (0, 0)]
        out[len(kept) + 1] = kept
    return out


PRESETS: dict[str, dict[str, dict[int, list[Cut]]]] = {
    "infopro": {"resnet32": _R32_INFOPRO, "resnet110": _R110_INFOPRO},
    "infopro-balanced": {"resnet110": {2: [(1, 14)], 3: [(1, 9), (2, 2)], 4: [(1, 6), (1, 14), (2, 8)]}},
    "man": {"resnet32": _without_stem(_R32_INFOPRO), "resnet110": {**_without_stem(_R110_INFOPRO), 32: _R110_MAN32}},
}
PRESETS["man++"] = {
    arch: {k + 1: [(0, 0), *cuts] for k, cuts in table.items()} for arch, table in PRESETS["man"].items()
}

# ImageNet networks (resnet_imagenet.py, vgg.py). Cut (S, i) is "after layerS[i]"; no table has a stem cut, so MAN++'s
# entries are set here rather than derived from MAN's above.
PRESETS["infopro"]["resnet101"] = {2: [(2, 0)]}  # InfoPro* K=2, methods.md §3.4
PRESETS["infopro"]["resnet152"] = {2: [(2, 5)]}
PRESETS["infopro"]["resnext101_32x8d"] = {2: [(2, 2)]}
_MAN_IMAGENET_K4: list[Cut] = [(3, 0), (3, 9), (3, 17)]  # MAN @8047fb2 configs.py, methods.md §1.4
PRESETS["man"]["resnet101"] = {2: [(2, 0)], 4: _MAN_IMAGENET_K4}
PRESETS["man"]["resnet152"] = {2: [(2, 5)], 4: _MAN_IMAGENET_K4}
PRESETS["man"]["resnext101_32x8d"] = {2: [(2, 0)], 4: _MAN_IMAGENET_K4}
PRESETS["man"]["resnet34"] = {2: [(2, 0)], 4: [(2, 0), (3, 0), (3, 5)]}
PRESETS["man++"]["resnet101"] = {2: [(2, 0)], 4: [(2, 2), (3, 8), (3, 16)]}  # methods.md §2.1; K=2 as MAN
PRESETS["man++"]["resnet152"] = {2: [(2, 5)], 4: [(2, 6), (3, 13), (3, 25)]}
PRESETS["man++"]["resnext101_32x8d"] = {2: [(2, 0)], 4: [(2, 2), (3, 8), (3, 16)]}
PRESETS["man++"]["resnet34"] = {2: [(2, 0)]}
# DGL's VGG-13 "block size 3" (README): after conv units 3, 6, 9 (conv2_1, conv3_2, conv5_1); K=10 is ``layerwise``.
PRESETS["dgl"] = {"vgg13": {4: [(2, 0), (3, 1), (5, 0)]}}
SPLITTERS = ("even", "layerwise")


def split_names() -> list[str]:
    return sorted([*SPLITTERS, "balanced", *PRESETS])


def even_boundaries(num_feature_layers: int, k: int) -> list[int]:
    """Deal ``num_feature_layers`` layers into ``k`` contiguous groups whose sizes differ by at most one."""
    return [round(i * num_feature_layers / k) for i in range(1, k)]


def _cut_to_boundary(model: LayeredModel, cut: Cut) -> int:
    stage, block = cut
    if stage == 0:
        return 1
    indices = [i for i, s in enumerate(model.stage_of[:-1]) if s == stage]
    return indices[block] + 1


def _cuttable(model: LayeredModel) -> int:
    """Layers the splitter deals into blocks: the feature layers, and the classifier too where the model allows it
    to be a block of its own (``classifier_block``: a SoftHebb network's linear classifier on frozen features)."""
    return model.num_layers() - (0 if getattr(model, "classifier_block", False) else 1)


def resolve_split(model: LayeredModel, split: str | list[str], k: int | None) -> list[int]:
    """Return the boundaries for ``split`` (a splitter, a named preset, layer indices such as "2,5,10", or module
    names to cut after) with ``k`` blocks.

    Raises:
        UserError: unknown split name, a preset without this arch or K, or K outside 1..(number of feature layers).
    """
    num_features = _cuttable(model)
    indices = _layer_indices(split)
    names = None if indices is not None else _module_names(model, split)
    if indices is not None:
        bounds = indices
        if k is not None and len(bounds) + 1 != k:
            raise UserError(f"boundaries {split} give {len(bounds) + 1} blocks, not K={k}: drop --K or give {k - 1}")
    elif names is not None:
        bounds = boundaries_after_modules(model, names)
        if k is not None and len(bounds) + 1 != k:
            raise UserError(f"cuts after {', '.join(names)} give {len(bounds) + 1} blocks, not K={k}: drop --K")
    elif split in PRESETS:
        table = PRESETS[split].get(model.arch)
        if table is None:
            archs = ", ".join(PRESETS[split])
            raise UserError(
                f"split preset {split!r} has no table for {model.arch}: it covers {archs}; use --split even"
            )
        if k is None:
            raise UserError(f"--split {split} needs --K: {model.arch} has presets for K = {sorted(table)}")
        if k not in table:
            hint = " (MAN's published 'K=16' trains 15 blocks: use --K 15)" if split == "man" and k == 16 else ""
            raise UserError(
                f"split preset {split!r} has no {k}-block split for {model.arch}: choose K from "
                f"{sorted(table)}{hint}, or use --split even"
            )
        bounds = [_cut_to_boundary(model, c) for c in table[k]]
    elif split in SPLITTERS:
        k = 1 if k is None else k
        if not 1 <= k <= max(1, num_features):
            raise UserError(_too_many_blocks(model, k))
        bounds = even_boundaries(num_features, k) if split == "even" else list(range(1, k))
    else:
        raise UserError(f"unknown split {split!r}: choose one of {', '.join(split_names())}")
    check_boundaries(model, bounds)
    return bounds


def _too_many_blocks(model: LayeredModel, k: int) -> str:
    num_features = _cuttable(model)
    plan = getattr(model, "plan", None)
    if plan is None:
        return (
            f"K={k} does not fit {model.arch}: it has {num_features} layers to split "
            f"(stem, residual blocks), so choose 1 <= K <= {num_features}"
        )
    if plan.max_blocks == 1:
        reason = (
            f"no single tensor carries its whole computation at any point ({len(plan.cuts)} valid cut(s), none "
            "before the classifier: a skip or dense connection spans the network)"
        )
    else:
        reason = f"it has {len(plan.names)} segments that can be cut apart ({', '.join(plan.names)})"
    return f"K={k} does not fit {model.arch}: {reason}; the largest K that works is {plan.max_blocks}"


def _layer_indices(split: str | list[str]) -> list[int] | None:
    """The boundaries themselves when ``split`` is a comma-separated string of layer indices ("2,5,10": blocks start at
    layers 0, 2, 5 and 10, as ``describe_split`` numbers the layers); None otherwise."""
    if not isinstance(split, str) or not split.strip():
        return None
    parts = [s.strip() for s in split.split(",")]
    return [int(p) for p in parts] if all(p.isdigit() for p in parts) else None


def _module_names(model: LayeredModel, split: str | list[str]) -> list[str] | None:
    """Module names to cut after, when ``split`` is a list of names or a comma-separated string of them (a traced
    model's module names, such as ``layer2,layer3.1``); None for a splitter or preset name."""
    if isinstance(split, list):
        return [str(s) for s in split]
    if split in PRESETS or split in SPLITTERS or split == "balanced" or getattr(model, "plan", None) is None:
        return None
    return [s.strip() for s in split.split(",") if s.strip()]


def boundaries_after_modules(model: LayeredModel, names: list[str]) -> list[int]:
    """Boundaries that cut a traced model after each named module: after the segment that runs the module's last
    operation (a module that ends inside a segment is cut after that whole segment)."""
    plan = getattr(model, "plan", None)
    if plan is None:
        raise UserError(f"cuts by module name need a traced model; {model.arch} takes --split even, layerwise, …")
    bounds = set()
    for name in names:
        hits = [i for i, mods in enumerate(plan.modules) if any(m == name or m.startswith(name + ".") for m in mods)]
        if not hits:
            raise UserError(
                f"{model.arch} runs no module named {name!r}: cut after one of its segments ({', '.join(plan.names)}) "
                "or see `locallearn list --cuts`"
            )
        if hits[-1] >= model.num_layers() - 1:
            raise UserError(f"module {name!r} ends in the classifier's segment of {model.arch}: nothing follows it")
        bounds.add(hits[-1] + 1)
    return sorted(bounds)


def check_boundaries(model: LayeredModel, bounds: list[int]) -> None:
    """Boundaries must be strictly increasing in ``[1, L-2]`` so every block is non-empty and ends on a feature
    (``[1, L-1]`` where the classifier may be a block of its own)."""
    last = _cuttable(model) - 1
    if any(b < 1 or b > last for b in bounds) or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise UserError(f"invalid boundaries {bounds} for {model.arch}: they must increase strictly within 1..{last}")


def split_model(model: LayeredModel, bounds: list[int]) -> list[nn.Sequential]:
    """The K blocks as ``nn.Sequential``s that *share* the model's layers (no copies), so ``model`` stays the
    inference network and its ``state_dict`` holds every backbone weight."""
    check_boundaries(model, bounds)
    edges = [0, *bounds, model.num_layers()]
    return [nn.Sequential(*model.layers[a:b]) for a, b in zip(edges, edges[1:])]


def describe_split(model: LayeredModel, bounds: list[int]) -> list[str]:
    """One line per block naming its first and last layer, for logs and ``--dry-run`` style reports."""
    edges = [0, *bounds, model.num_layers()]
    return [
        f"block {k}: {model.names[a]} .. {model.names[b - 1]} ({b - a} layers)"
        for k, (a, b) in enumerate(zip(edges, edges[1:]))
    ]
