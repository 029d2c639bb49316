"""Method-specific behaviour: MAN's EMA and learnable copies, MAN++'s scale, InfoPro's λ schedule and losses."""

import math

import pytest
import torch
from torch import nn

from locallearn import LocalLearner, create_model
from locallearn.errors import UserError
from locallearn.heads import conv_fc_head
from locallearn.losses import supcon_loss
from locallearn.methods import any_model_methods
from tests.conftest import make_batches

MAN_METHODS = ["dgl+man", "infopro+man", "man++", "dgl+man++"]


def learner_for(method, k=3, arch="resnet20", split="even", options=None, shape=(1, 16, 16), **kw):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_channels=shape[0])
    return LocalLearner(model, method, k, split, input_shape=shape, method_options=options, **kw)


def optimizer_param_ids(learner):
    return {id(p) for opt in learner.optimizers for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("method", MAN_METHODS)
def test_ema_copies_are_frozen_and_in_no_optimizer(method):
    learner = learner_for(method)
    owned = optimizer_param_ids(learner)
    for ema in learner.method.ema:
        for p in ema.parameters():
            assert not p.requires_grad and id(p) not in owned
    for lb in learner.method.learnable:
        assert all(p.requires_grad and id(p) in owned for p in lb.parameters())
    live_ids = {id(p) for p in learner.model.parameters()}
    assert not live_ids & {id(p) for p in learner.method.parameters()}  # copies, not the live layers


@pytest.mark.parametrize("timing", ["after_next_step", "before_next_step"])
@pytest.mark.parametrize("method", ["dgl+man", "man++"])
def test_one_step_moves_the_ema_by_one_minus_m(method, timing):
    m = 0.9
    learner = learner_for(method, options={"ema_momentum": m, "ema_timing": timing, "copy_init": "random"})
    before_ema = [[p.clone() for p in e.parameters()] for e in learner.method.ema]
    before_live = [[p.clone() for p in layer.parameters()] for layer in learner.method._live]
    learner.train_step(make_batches(1, shape=(1, 16, 16))[0])
    for k, ema in enumerate(learner.method.ema):
        live_now = list(learner.method._live[k].parameters())
        for i, p in enumerate(ema.parameters()):
            live = live_now[i] if timing == "after_next_step" else before_live[k][i]
            expected = m * before_ema[k][i] + (1 - m) * live
            assert torch.allclose(p, expected, atol=1e-6), (k, i)
    # the live layer did move this step, so the timing choice is visible
    assert any(not torch.equal(a, b) for a, b in zip(before_live[0], learner.method._live[0].parameters()))


@pytest.mark.parametrize("method", MAN_METHODS)
def test_learnable_copy_and_scale_are_trained(method):
    learner = learner_for(method)
    lb_before = [p.clone() for p in learner.method.learnable.parameters()]
    learner.train_step(make_batches(1, shape=(1, 16, 16))[0])
    assert all(not torch.equal(a, b) for a, b in zip(lb_before, learner.method.learnable.parameters()) if a.dim() > 1)
    if method.endswith("++"):
        assert all(s.item() != 1.0 for s in learner.method.scales)
    else:
        assert learner.method.scales is None


def test_copy_init_live_and_random():
    live = learner_for("dgl+man", options={"copy_init": "live"}).method
    for k in range(len(live.ema)):
        for a, b, c in zip(live.ema[k].parameters(), live.learnable[k].parameters(), live._live[k].parameters()):
            assert torch.equal(a, c) and torch.equal(b, c)
    rnd = learner_for("dgl+man", options={"copy_init": "random"}).method
    conv = [
        (a, b, c)
        for a, b, c in zip(rnd.ema[0].parameters(), rnd.learnable[0].parameters(), rnd._live[0].parameters())
        if a.dim() == 4
    ]
    assert conv and all(not torch.equal(a, b) and not torch.equal(a, c) for a, b, c in conv)


def test_man_heads_read_the_next_layers_output_shape():
    # block 1 starts at layer 4 = layer2.0 of resnet20 (stride 2, 32 channels, 16x16)
    learner = learner_for("infopro+man", k=3, arch="resnet20", split=[4, 7], shape=(3, 32, 32))
    first_conv = learner.method.heads[0][0]
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == 32


def test_man_plus_plus_input_is_the_scaled_sum():
    method = learner_for("man++").method
    with torch.no_grad():
        method.scales[0].fill_(1.3)
    method.eval()
    h = torch.randn(2, 16, 16, 16)
    expected = 1.3 * method.learnable[0](h) + 0.7 * method.ema[0](h)
    assert torch.allclose(method.aux_input(0, h), expected, atol=1e-6)


def test_infopro_lambda_endpoints_by_block():
    opts = {"lambda_recon_first": 5.0, "lambda_task_first": 0.05, "lambda_recon_last": 0.2, "lambda_task_last": 0.5}
    lambdas = learner_for("infopro", k=5, options=opts).method.lambdas
    assert len(lambdas) == 4
    assert lambdas[0] == pytest.approx((5.0, 0.05)) and lambdas[-1] == pytest.approx((0.2, 0.5))
    assert lambdas[1] == pytest.approx((5 - 4.8 / 3, 0.05 + 0.45 / 3))


def test_man_stage_ramp_reproduces_the_released_k16_weights():
    """MAN's code: r = s_next/(K−2) with its nominal K=16 on the 15-block ResNet-32 split (methods.md §1.3)."""
    opts = {
        "lambda_recon_first": 5.0,
        "lambda_task_first": 0.5,
        "lambda_recon_last": 0.0,
        "lambda_task_last": 0.0,
        "lambda_ramp": "stage",
        "lambda_ramp_k": 16,
    }
    learner = learner_for("infopro+man", k=15, arch="resnet32", split="man", options=opts, shape=(3, 32, 32))
    got = sorted({(round(a, 2), round(b, 3)) for a, b in learner.method.lambdas}, reverse=True)
    assert got == [(4.64, 0.464), (4.29, 0.429), (3.93, 0.393)]


def test_man_plus_plus_stem_block_has_r_zero():
    opts = {
        "lambda_recon_first": 5.0,
        "lambda_task_first": 0.5,
        "lambda_recon_last": 0.0,
        "lambda_task_last": 0.0,
        "lambda_ramp": "stage",
    }
    learner = learner_for("man++", k=16, arch="resnet32", split="man++", options=opts, shape=(3, 32, 32))
    assert learner.bounds[0] == 1  # the stem is a block of its own
    assert learner.method.lambdas[0] == pytest.approx((5.0, 0.5))


def test_zero_lambdas_warn_and_still_run(caplog):
    opts = {"lambda_recon_first": 5.0, "lambda_task_first": 0.5, "lambda_recon_last": 0.0, "lambda_task_last": 0.0}
    learner = learner_for("infopro", k=4, options=opts)
    assert "block 2 has λ1 = λ2 = 0" in caplog.text
    stats = learner.train_step(make_batches(1, shape=(1, 16, 16))[0])
    assert stats["loss/2"].item() == 0.0


def test_infopro_contrast_mode_trains():
    learner = learner_for("infopro", options={"loss_mode": "contrast"})
    stats = learner.train_step(make_batches(1, shape=(1, 16, 16), batch_size=16)[0])
    assert all(math.isfinite(v.item()) for v in stats.values()) and "acc/0" not in stats
    assert learner.evaluate(make_batches(1, shape=(1, 16, 16)))["block_accuracies"][0] is None


def test_supcon_matches_the_definition():
    torch.manual_seed(1)
    f, y, tau = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 2, 0]), 0.5
    z = nn.functional.normalize(f, dim=1)
    total, anchors = 0.0, 0
    for i in range(6):
        pos = [j for j in range(6) if j != i and y[j] == y[i]]
        if not pos:
            continue
        denom = torch.logsumexp(torch.stack([z[i] @ z[a] / tau for a in range(6) if a != i]), 0)
        total += -sum((z[i] @ z[p] / tau - denom) for p in pos) / len(pos)
        anchors += 1
    assert supcon_loss(f, y, tau, tau).item() == pytest.approx((total / anchors).item(), rel=1e-5)


def test_head_grammar():
    head = conv_fc_head("2c2f", (16, 32, 32), 10, final_width=64)
    convs = [m for m in head if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [(16, 32, 2), (32, 32, 1)]
    assert [m.out_features for m in head if isinstance(m, nn.Linear)] == [128, 10]
    last = conv_fc_head("1c2f", (64, 8, 8), 10, final_width=64)
    assert [(c.out_channels, c.stride[0]) for c in last if isinstance(c, nn.Conv2d)] == [(64, 1)]
    assert sum(isinstance(m, nn.Linear) for m in conv_fc_head("0c1f", (16, 8, 8), 10, 64)) == 1
    with pytest.raises(UserError, match="not of the form"):
        conv_fc_head("3x", (16, 8, 8), 10, 64)


@pytest.mark.parametrize("method", [m for m in any_model_methods() if m != "e2e"])
def test_inference_ignores_every_auxiliary_part(method):
    learner = learner_for(method)
    batch = make_batches(1, shape=(1, 16, 16))[0]
    learner.train_step(batch)
    learner.model.eval()
    with torch.no_grad():
        expected = learner.model(batch.x)
        for p in learner.method.parameters():
            p.add_(1.0)
        assert torch.equal(learner.model(batch.x), expected)


@pytest.mark.parametrize("method", ["infopro", "infopro+man"])
def test_infopro_heads_use_the_reference_init_unless_asked(method):
    """Both released codebases draw their auxiliary convs as the backbone's: N(0, 2/(k·k·C_out)); ``torch`` keeps
    PyTorch's default (std 1/sqrt(3·fan_in))."""

    def conv_stds(learner):
        convs = [
            m for m in [*learner.method.heads.modules(), *learner.method.decoders.modules()] if isinstance(m, nn.Conv2d)
        ]
        return [(c, c.weight.std().item()) for c in convs]

    for conv, std in conv_stds(learner_for(method, options={"head": "2c2f"}, shape=(3, 32, 32))):
        assert std == pytest.approx(math.sqrt(2 / (conv.kernel_size[0] ** 2 * conv.out_channels)), rel=0.35)
    for conv, std in conv_stds(learner_for(method, options={"head": "2c2f", "head_init": "torch"}, shape=(3, 32, 32))):
        fan_in = conv.in_channels * conv.kernel_size[0] ** 2
        assert std == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.35)
    with pytest.raises(UserError, match="head_init"):
        learner_for(method, options={"head_init": "xavier"})


@pytest.mark.parametrize("method", any_model_methods())
def test_every_method_trains_under_bf16_autocast(method):
    """``--amp bf16``: finite losses, and every conv weight of the backbone moves (losses that need float32 are cast
    up; CUDA's refusal of binary_cross_entropy under autocast cannot be exercised on CPU)."""
    learner = learner_for(method, k=None if method == "e2e" else 3, amp="bf16", shape=(3, 16, 16))
    before = [p.detach().clone() for p in learner.model.parameters()]
    stats = learner.train_step(make_batches(1, shape=(3, 16, 16))[0])
    assert all(torch.isfinite(v) for k, v in stats.items() if k.startswith("loss/"))
    assert all(not torch.equal(a, b) for a, b in zip(before, learner.model.parameters()) if a.dim() == 4)


@pytest.mark.parametrize("method", ["infopro+man", "man++"])
def test_float64_training_keeps_losses_in_float64(method):
    """A float64 model gets float64 losses (no cast down to float32), so it can be compared with a reference
    implementation to ~1e-15 (``benchmarks/official_parity.py diff --double``)."""
    learner = learner_for(method, options={"loss_mode": "cross_entropy"}, shape=(3, 16, 16))
    learner.model.double()
    learner.method.double()
    batch = make_batches(1, shape=(3, 16, 16))[0]
    batch = type(batch)(batch.x.double(), batch.y, batch.x.double().sigmoid())
    method = learner.method
    y = method.aux_input(0, learner.blocks[0](batch.x))
    assert method._reconstruction_loss(0, y, batch.raw).dtype == torch.float64
    assert method.local_loss(0, learner.blocks[0](batch.x), batch).loss.dtype == torch.float64
