"""Recipes for the models users bring: optimizers by name, weight-decay groups, schedules, label smoothing, mixup and
cutmix through every local loss, gradient clipping, fp16's per-block scalers, MAN++'s ViT auxiliary net, and the
packaged recipes."""

import copy
import math

import numpy as np
import pytest
import timm
import torch
from torch.nn import functional as F

from locallearn import LocalLearner, OptimConfig, create_model, lr_at
from locallearn.config import RunConfig, load_yaml
from locallearn.data import Batch
from locallearn.errors import UserError
from locallearn.methods import any_model_methods
from locallearn.mixing import BatchMixer
from locallearn.optim import build_optimizer, no_weight_decay_ids
from locallearn.results import config_differences
from locallearn.runner import train
from tests.conftest import make_batches

ALL_METHODS = any_model_methods()


def cifar_learner(method="dgl", k=3, **kw):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1)
    return LocalLearner(model, method, 1 if method == "e2e" else k, input_shape=(1, 28, 28), **kw)


def tiny_vit(**kw):
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, depth=6, embed_dim=32, num_heads=2,
        num_classes=10, **kw,
    )  # fmt: skip


# -- optimizers by name ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sgd", "adamw", "adam", "rmsprop", "lamb", "lion", "adan"])
def test_each_optimizer_name_builds_k_optimizers_over_disjoint_parameters(name):
    learner = cifar_learner("dgl+man", optim=OptimConfig(name=name, lr=1e-3, weight_decay=0.01))
    assert len(learner.optimizers) == 3
    kind = {"sgd": "SGD", "adamw": "AdamW", "adam": "Adam", "rmsprop": "RMSprop"}.get(name)
    owned = [{id(p) for g in opt.param_groups for p in g["params"]} for opt in learner.optimizers]
    for k, ids in enumerate(owned):
        assert ids == {id(p) for p in learner.block_params(k)}  # exactly block k's and its auxiliary net's
        assert kind is None or type(learner.optimizers[k]).__name__ == kind
    assert not (owned[0] & owned[1]) and not (owned[1] & owned[2]) and not (owned[0] & owned[2])
    before = [p.detach().clone() for p in learner.block_params(1)]
    learner.train_step(make_batches(1)[0])
    assert any(not torch.equal(a, p) for a, p in zip(before, learner.block_params(1)))  # it steps


def test_an_unknown_optimizer_or_bad_option_is_one_clear_error():
    with pytest.raises(UserError, match="unknown optimizer optim.name='adamx'.*sgd, adamw"):
        cifar_learner(optim=OptimConfig(name="adamx"))
    with pytest.raises(UserError, match="optimizer 'adamw' cannot be built.*fix the option"):
        cifar_learner(optim=OptimConfig(name="adamw", kwargs={"not_an_option": 1}))
    with pytest.raises(UserError, match="warmup_epochs=1.0 and optim.warmup_fraction=0.1 both set"):
        cifar_learner(optim=OptimConfig(warmup_epochs=1.0, warmup_fraction=0.1))


def test_sgd_is_exactly_the_optimizer_it_was():
    """The default spec builds the same single-group SGD as before the option existed (the parity presets' path)."""
    params = [torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = build_optimizer(params, OptimConfig(lr=0.05, weight_decay=5e-4))
    assert type(opt) is torch.optim.SGD and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.05, 0.9, True, 5e-4)


def test_no_decay_groups_hold_exactly_the_1d_and_listed_parameters():
    model = tiny_vit()
    learner = LocalLearner(
        model, "dgl+man++", 3, "blocks.1,blocks.3", input_shape=(1, 16, 16),
        optim=OptimConfig(name="adamw", weight_decay=0.05, filter_bias_and_bn=True),
        method_options={"aux_blocks": 1, "n_mlp": 0},
    )  # fmt: skip
    listed = no_weight_decay_ids(model)
    assert listed == {id(model.pos_embed), id(model.cls_token)}
    for k, opt in enumerate(learner.optimizers):
        decayed = [p for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
        free = [p for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]]
        assert all(p.ndim > 1 and id(p) not in listed for p in decayed)
        want_free = [p for p in learner.block_params(k) if p.ndim <= 1 or id(p) in listed]
        assert {id(p) for p in free} == {id(p) for p in want_free}
        assert {g["weight_decay"] for g in opt.param_groups} == {0.05, 0.0}
    block0_free = {id(p) for g in learner.optimizers[0].param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert listed <= block0_free and id(learner.method.scales[0]) in block0_free  # MAN++'s scale s is 0-D


# -- schedules -------------------------------------------------------------------------------------------------------
def test_cosine_ends_at_its_floor_and_warm_up_is_a_fraction_of_the_run():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_fraction=0.1, warmup_start_lr=0.0)
    assert lr_at(0, cfg, 100, 10) == 0.0
    assert lr_at(5, cfg, 100, 10) == pytest.approx(0.5 * (1e-5 + (1e-3 - 1e-5) / 2 * (1 + math.cos(math.pi * 0.05))))
    assert lr_at(100, cfg, 100, 10) == pytest.approx(1e-5)
    assert lr_at(50, cfg, 100, 10) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)


def test_step_schedule_decays_at_its_milestones_and_constant_warms_up():
    cfg = OptimConfig(lr=0.1, schedule="step", milestones=[2, 4], gamma=0.2)
    assert [lr_at(s, cfg, 60, 10) for s in (0, 19, 20, 39, 40, 59)] == pytest.approx(
        [0.1, 0.1, 0.02, 0.02, 0.004, 0.004]
    )
    per_epoch = OptimConfig(lr=0.1, schedule="step", schedule_unit="epoch", milestones=[2], gamma=0.5)
    assert [lr_at(s, per_epoch, 40, 10) for s in (19, 20)] == pytest.approx([0.1, 0.05])  # from epoch 2 (0-based)
    constant = OptimConfig(lr=0.1, schedule="constant", warmup_epochs=1, warmup_start_lr=0.0)
    assert [lr_at(s, constant, 40, 10) for s in (0, 5, 10, 39)] == pytest.approx([0.0, 0.05, 0.1, 0.1])


# -- label smoothing and soft targets in every local loss -------------------------------------------------------------
def _task_weight(method, k: int) -> float:
    """The weight of block k's cross-entropy in its local loss (InfoPro's λ2; 1 for the others and the last block)."""
    lambdas = getattr(method, "lambdas", None)
    return lambdas[k][1] if lambdas is not None and k < method.num_blocks - 1 else 1.0


@pytest.mark.parametrize("method", ALL_METHODS)
def test_label_smoothing_and_soft_targets_reach_every_local_loss(method):
    """Each block's loss moves by exactly λ2·(CE with smoothing − CE) under label smoothing, and by λ2·(soft CE − CE)
    under soft targets, against F.cross_entropy(label_smoothing=…) and a hand-written soft-target cross-entropy."""
    plain = cifar_learner(method)
    smooth = copy.deepcopy(plain)
    smooth.method.label_smoothing = 0.1
    batch = make_batches(1)[0]
    soft = torch.softmax(torch.randn(8, 10, generator=torch.Generator().manual_seed(1)), 1)
    mixed = Batch(batch.x, batch.y, batch.raw, soft)
    h = batch.x
    with torch.no_grad():
        for k, block in enumerate(plain.blocks):
            out = block(h)
            hard = plain.method.local_loss(k, out, batch)
            if hard.logits is None:
                pytest.fail(f"{method} block {k} has no classifier")
            w = _task_weight(plain.method, k)
            ce = F.cross_entropy(hard.logits, batch.y)
            smoothed = smooth.method.local_loss(k, out, batch).loss
            want = w * (F.cross_entropy(hard.logits, batch.y, label_smoothing=0.1) - ce)
            assert torch.allclose(smoothed - hard.loss, want, atol=1e-5), (k, smoothed - hard.loss, want)
            by_soft = plain.method.local_loss(k, out, mixed).loss
            hand = -(soft * hard.logits.log_softmax(1)).sum(1).mean()
            assert torch.allclose(by_soft - hard.loss, w * (hand - ce), atol=1e-5), k
            h = out


def test_methods_without_a_soft_target_form_refuse_mixup():
    mixer = BatchMixer(10, mixup=0.8)
    with pytest.raises(UserError, match="contrastive mode.*no soft-target form"):
        cifar_learner("infopro", method_options={"loss_mode": "contrast"}, mixing=mixer)
    torch.manual_seed(0)
    with pytest.raises(UserError, match="softhebb.*without mixup"):
        LocalLearner(create_model("softhebb2", num_classes=10, in_channels=1, image_size=28), "softhebb", 3,
                     "layerwise", input_shape=(1, 28, 28), mixing=mixer)  # fmt: skip


# -- mixup and cutmix ------------------------------------------------------------------------------------------------
def test_mixing_is_a_function_of_seed_and_step_and_mixes_the_raw_images_alike():
    batch = make_batches(1, batch_size=16)[0]  # x = (raw − 0.5) / 0.5
    mixer = BatchMixer(10, mixup=0.8, cutmix=1.0, label_smoothing=0.1, seed=3)
    state = np.random.get_state()
    draws = [mixer(batch, step) for step in (0, 1, 2, 3, 0)]
    assert np.array_equal(np.random.get_state()[1], state[1])  # NumPy's global generator is left as it was
    assert torch.equal(draws[0].x, draws[4].x) and torch.equal(draws[0].soft, draws[4].soft)
    assert any(not torch.equal(draws[0].x, d.x) for d in draws[1:4])
    for d in draws:
        assert torch.allclose(d.x, (d.raw - 0.5) / 0.5, atol=1e-6)  # InfoPro reconstructs what its block was fed
        assert torch.allclose(d.soft.sum(1), torch.ones(16)) and d.soft.min() >= 0.1 / 10 - 1e-7
        assert torch.equal(d.y, batch.y)
    with pytest.raises(UserError, match="even batch size"):
        mixer(make_batches(1, batch_size=7)[0], 0)


def test_mixup_trains_every_method_through_the_runner(tmp_path):
    """`locallearn train --mixup --cutmix --label-smoothing --clip-grad-norm` on InfoPro+MAN: the decoder reads the
    mixed [0, 1] images, every head the soft targets; the clip fraction of each block is in the metrics."""
    cfg = _tiny_run(tmp_path / "mix", method="infopro+man", K=3)
    cfg.train.mixup, cfg.train.cutmix, cfg.train.label_smoothing = 0.8, 1.0, 0.1
    cfg.optim.clip_grad_norm = 1e-3  # below any real gradient norm: every step clips
    summary = train(cfg)
    assert summary["steps"] == 4 and all(a is not None for a in summary["block_accuracies"])
    row = [line for line in (tmp_path / "mix" / "metrics.jsonl").read_text().splitlines()][-1]
    assert all(f'"clip/{k}": 1.0' in row for k in range(3))


def _tiny_run(out, **train_fields) -> RunConfig:
    cfg = RunConfig()
    cfg.data.name, cfg.data.image_size, cfg.data.in_channels = "synthetic", 16, 1
    cfg.data.synthetic_train_size, cfg.data.synthetic_test_size = 64, 32
    cfg.model.arch = "resnet20"
    cfg.train.batch_size, cfg.train.epochs, cfg.train.device = 16, 1, "cpu"
    cfg.train.out, cfg.train.progress, cfg.train.tensorboard = str(out), False, "off"
    for key, value in train_fields.items():
        setattr(cfg.train, key, value)
    return cfg


# -- gradient clipping -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dgl", "infopro+man", "auglocal"])
def test_clipping_bounds_every_blocks_gradient_norm_before_its_step(method):
    learner = cifar_learner(method, optim=OptimConfig(clip_grad_norm=0.05))
    norms: dict[int, float] = {}
    for k, opt in enumerate(learner.optimizers):

        def pre_step(opt, args, kwargs, k=k):
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            norms[k] = float(torch.nn.utils.get_total_norm(grads))

        opt.register_step_pre_hook(pre_step)
    stats = learner.train_step(make_batches(1)[0])
    assert sorted(norms) == [0, 1, 2]
    assert all(n <= 0.05 * (1 + 1e-5) for n in norms.values()), norms
    assert all(stats[f"clip/{k}"] == 1.0 for k in range(3))  # logged: each block clipped (its norm was above 0.05)
    loose = cifar_learner(method, optim=OptimConfig(clip_grad_norm=1e6))
    assert all(v == 0.0 for key, v in loose.train_step(make_batches(1)[0]).items() if key.startswith("clip/"))


# -- fp16: one gradient scaler per block ------------------------------------------------------------------------------
def test_a_block_whose_scaler_skips_a_step_holds_back_no_other_block():
    """A fake overflow in block 1: its scaler skips its step and halves its scale; blocks 0 and 2 step with their
    scales unchanged, and the non-finite guard does not stop the run (an overflow is the scaler's to handle). The
    scalers run on CPU here; ``amp="fp16"`` itself is CUDA-only."""
    learner = cifar_learner("dgl")
    learner.scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in learner.blocks]
    hooked = next(p for p in learner.blocks[1].parameters())
    hooked.register_hook(lambda g: g * float("inf"))
    before = [[p.detach().clone() for p in learner.block_params(k)] for k in range(3)]
    learner.train_step(make_batches(1)[0])
    moved = [any(not torch.equal(a, p) for a, p in zip(before[k], learner.block_params(k))) for k in range(3)]
    assert moved == [True, False, True]
    assert [s.get_scale() for s in learner.scalers] == [1024.0, 512.0, 1024.0]
    assert "scalers" in learner.state_dict()


# -- MAN++ on vision transformers ------------------------------------------------------------------------------------
def test_manpp_vit_auxiliary_net_is_ema_copy_learnable_copy_and_one_trainable_block():
    model = tiny_vit()
    learner = LocalLearner(
        model, "dgl+man++", 3, "blocks.1,blocks.3", input_shape=(1, 16, 16),
        method_options={"aux_blocks": 1, "n_mlp": 0, "copy_init": "random"},
    )  # fmt: skip
    method = learner.method
    for k, first in enumerate((2, 4)):  # block k+1 starts with transformer block `first`
        assert type(method.ema[k]) is type(method.learnable[k]) is type(learner.model.layers[first + 1])
        assert len(method.following[k]) == 1
        assert not any(p.requires_grad for p in method.ema[k].parameters())
        trainable = {id(p) for p in learner.block_params(k)}
        assert {id(p) for p in method.learnable[k].parameters()} <= trainable
        assert {id(p) for p in method.following[k].parameters()} <= trainable
        assert not {id(p) for p in method.ema[k].parameters()} & trainable
        prefix = f"train_graph.blocks.{first}."  # a copy of the traced segment that runs transformer block `first`
        live = {prefix + n: p for n, p in model.blocks[first].named_parameters()}
        copied = {n: p for n, p in method.ema[k].named_parameters() if n in live}
        assert len(copied) == len(live)
        assert all(not torch.equal(p, live[n]) for n, p in copied.items() if p.ndim > 1)  # random: fresh weights
        head = [type(m).__name__ for m in method.heads[k]]
        assert head == ["LayerNorm", "TokenPool", "Linear"] and method.heads[k][1].mode == "token"
    ema_before = [p.clone() for p in method.ema[0].parameters()]
    stats = learner.train_step(make_batches(1, shape=(1, 16, 16))[0])
    assert all(p.grad is None for p in method.ema.parameters())  # no gradient ever reaches the EMA copy
    live_first = list(model.blocks[2].parameters())
    for old, new, live in zip(ema_before, method.ema[0].parameters(), live_first):  # it moved by (1 − m) only
        assert torch.allclose(new, 0.995 * old + 0.005 * live.detach(), atol=1e-6)
    assert {f"acc/{k}" for k in range(3)} <= set(stats)


def test_aux_blocks_past_the_last_feature_layer_is_a_clear_error():
    with pytest.raises(UserError, match="aux_blocks=9.*lower aux_blocks"):
        LocalLearner(tiny_vit(), "dgl+man", 3, "blocks.1,blocks.3", input_shape=(1, 16, 16),
                     method_options={"aux_blocks": 9})  # fmt: skip


def test_drop_path_keeps_working_per_block():
    model = tiny_vit(drop_path_rate=0.3)
    learner = LocalLearner(model, "dgl", 3, "blocks.1,blocks.3", input_shape=(1, 16, 16))
    batch = make_batches(1, shape=(1, 16, 16))[0]
    torch.manual_seed(1)
    a = learner.blocks[1](learner.blocks[0](batch.x))
    torch.manual_seed(2)
    b = learner.blocks[1](learner.blocks[0](batch.x))
    assert not torch.equal(a, b)  # drop path samples in training mode, block by block
    learner.model.eval()
    assert torch.equal(learner.blocks[1](learner.blocks[0](batch.x)), learner.blocks[1](learner.blocks[0](batch.x)))


# -- packaged recipes ------------------------------------------------------------------------------------------------
def test_recipes_resolve_and_compose_with_any_arch():
    cfg = RunConfig()
    load_yaml(cfg, "recipes/vit_adamw")
    o = cfg.optim
    assert (o.name, o.lr, o.betas, o.weight_decay, o.filter_bias_and_bn) == ("adamw", 1e-3, [0.9, 0.999], 0.05, True)
    assert (o.warmup_fraction, o.warmup_start_lr, cfg.train.label_smoothing) == (0.1, 0.0, 0.1)
    assert cfg.model.arch == "resnet32"  # the recipe sets no arch: --arch chooses
    cnn = RunConfig()
    load_yaml(cnn, "recipes/cnn_timm")
    assert (cnn.optim.name, cnn.optim.weight_decay, cnn.optim.warmup_epochs) == ("sgd", 2e-5, 5)
    for size in ("tiny", "small", "base"):
        vit = RunConfig()
        load_yaml(vit, f"manpp/imagenet_vit_{size}_k4")
        assert vit.model.arch == f"timm:vit_{size}_patch16_224" and vit.train.K == 4
        assert (vit.optim.name, vit.optim.lr, vit.train.batch_size, vit.train.epochs) == ("adamw", 1e-3, 1024, 90)
        assert vit.method["aux_blocks"] == 1 and not vit.optim.filter_bias_and_bn  # released: decay on everything


def test_vit_recipe_trains_a_user_transformer_through_the_runner(tmp_path):
    cfg = _tiny_run(tmp_path / "vit", method="dgl+man++", K=3, split="blocks.0,blocks.1")
    load_yaml(cfg, "recipes/vit_adamw")
    cfg.model.arch = "timm:vit_tiny_patch16_224"
    cfg.model.kwargs = {"patch_size": 4, "depth": 4, "embed_dim": 32, "num_heads": 2}
    cfg.method = {"aux_blocks": 1, "n_mlp": 0}
    summary = train(cfg)
    assert summary["K"] == 3 and summary["steps"] == 4 and len(summary["block_accuracies"]) == 3


def test_a_checkpoint_written_before_new_fields_existed_still_resumes():
    """Fields added later, left at their defaults, are not a configuration difference."""
    current = RunConfig().to_dict()
    saved = copy.deepcopy(current)
    for key in ("name", "betas", "clip_grad_norm", "warmup_fraction"):
        del saved["optim"][key]
    del saved["train"]["label_smoothing"]
    assert config_differences(saved, current) == []
    changed = copy.deepcopy(current)
    changed["optim"]["name"] = "adamw"
    assert config_differences(saved, changed) == ["optim.name: checkpoint None, now 'adamw'"]  # None: absent
