"""Every packaged preset loads, and builds its model, split and method with the true block count it names."""

import pytest

from locallearn import LocalLearner, create_model
from locallearn.config import RunConfig, load_yaml, preset_names
from locallearn.data.info import (
    CIFAR10_INFO,
    FASHION_MNIST_INFO,
    IMAGENET_INFO,
    STL10_INFO,
    SVHN_INFO,
    synthetic_info,
)

INFO = {i.name: i for i in (CIFAR10_INFO, FASHION_MNIST_INFO, IMAGENET_INFO, STL10_INFO, SVHN_INFO)}
RUNNABLE = [p for p in preset_names() if not p.startswith("recipes/") and p != "parity/common"]


@pytest.mark.parametrize("name", RUNNABLE)
def test_preset_builds(name):
    cfg = RunConfig()
    load_yaml(cfg, name)
    d = cfg.data
    info = INFO.get(d.name) or synthetic_info(d.image_size, d.in_channels, d.num_classes)
    channels = cfg.data.channels or info.in_channels
    size = cfg.data.pad_to or (cfg.data.crop_size if d.name == "imagenet" else info.image_size[0])
    kwargs = dict(cfg.model.kwargs)
    if cfg.model.arch.startswith("softhebb"):  # sized by the input; the widest (ImageNet: 340M weights) cut 16x here,
        from locallearn.models.softhebb import PRESETS  # which changes no block boundary

        specs = PRESETS[cfg.model.arch][0][: kwargs.get("layers")]
        kwargs.setdefault("widths", [max(1, s.channels // 16) for s in specs])
        kwargs["image_size"] = size
    vit_heads = {"tiny": 3, "small": 6, "base": 12}  # timm's ViTs: 12 blocks each; their width cut to 8 per head
    if cfg.model.arch.startswith("timm:vit_"):  # here (ViT-Base: 86 M weights, 16 s to build), no boundary moves
        heads = vit_heads[cfg.model.arch.split("_")[1]]
        kwargs.update(embed_dim=8 * heads, num_heads=heads)
    model = create_model(cfg.model.arch, num_classes=info.num_classes, in_channels=channels, **kwargs)
    learner = LocalLearner(
        model,
        cfg.train.method,
        cfg.resolved_k(),
        cfg.train.split,
        input_shape=(channels, size, size),
        method_options=cfg.method,
        optim=cfg.optim,
    )
    assert len(learner.blocks) == cfg.train.K


def test_recipes_match_the_reference():
    cfg = RunConfig()
    load_yaml(cfg, "man/cifar10_resnet32_k16_infopro_man")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr, cfg.optim.warmup_epochs) == (400, 1024, 0.8, 10)
    assert cfg.data.limit_train is None and cfg.train.K == 15 and cfg.method["lambda_ramp_k"] == 16


def test_parity_preset_is_the_section9_protocol():
    cfg = RunConfig()
    load_yaml(cfg, "parity/infopro_man")
    assert (cfg.data.pad_to, cfg.data.channels, cfg.data.normalization, cfg.data.limit_train) == (32, 3, "cifar", 10000)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.warmup_epochs) == (3, 128, 0)
