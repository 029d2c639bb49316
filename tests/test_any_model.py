"""Bring your own model: torchvision and timm networks cut by tracing (locallearn.models.traced).

Tiny widths and 32×32 inputs (``shared/reference/any-model.md`` §7). Every check runs on each family: the composed
segments reproduce the model exactly (all valid cuts at once and the default segments, train mode with drop-path and
the same seed, eval mode), every used parameter lies in exactly one block, gradients stay in their block, and one
step of dgl, infopro and dgl+man trains the user's own module.
"""

import copy

import pytest
import torch
import torchvision
from torch import nn

from locallearn import LocalLearner
from locallearn.errors import UserError
from locallearn.models import tracing
from locallearn.models.traced import TraceRefused, extract, plan_cuts, trace_model

timm = pytest.importorskip("timm")
tvm = torchvision.models

SHAPE = (3, 32, 32)


def _tv_convnext():
    cfg = tvm.convnext.CNBlockConfig
    return tvm.ConvNeXt([cfg(16, 32, 1), cfg(32, 64, 1), cfg(64, None, 1)], stochastic_depth_prob=0.2, num_classes=10)


FAMILIES = {
    "tv-resnet": lambda: tvm.ResNet(tvm.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10),
    "tv-mobilenetv3": lambda: tvm.mobilenet_v3_small(num_classes=10, width_mult=0.25),
    "tv-densenet": lambda: tvm.DenseNet(growth_rate=8, block_config=(2, 2, 2), num_init_features=16, num_classes=10),
    "tv-convnext": _tv_convnext,
    "tv-vit": lambda: tvm.VisionTransformer(
        image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    ),
    "tv-swin": lambda: tvm.SwinTransformer(
        patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[1, 2], window_size=[4, 4], num_classes=10
    ),
    "tv-shufflenet": lambda: tvm.shufflenet_v2_x0_5(num_classes=10),
    "timm-efficientnet": lambda: timm.create_model(
        "tf_efficientnet_b0", num_classes=10, drop_path_rate=0.2
    ),  # dynamic "same" padding: needs timm's leaf registry
    "timm-resnet": lambda: timm.create_model("resnet10t", num_classes=10),
    "timm-convnext": lambda: timm.create_model(
        "convnext_atto", depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_classes=10, drop_path_rate=0.2
    ),
    "timm-vit": lambda: timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, num_classes=10, drop_path_rate=0.2
    ),
    "timm-deit-distilled": lambda: timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=10
    ),
    "timm-swin": lambda: timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=32, window_size=4, depths=(1, 1, 1, 1), num_classes=10
    ),
}


def _x(n=4, seed=0):
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _compose(segments, x):
    for segment in segments:
        x = segment(x)
    return x


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_composed_segments_reproduce_the_model_exactly(name):
    model = FAMILIES[name]()
    x = _x()
    plan = plan_cuts(model, SHAPE, name)
    assert len(plan.names) >= 4 and plan.max_blocks == len(plan.names) - 1
    # every valid cut at once, train mode: drop-path draws the same masks under the same seed
    probe = copy.deepcopy(model).train()
    segments = extract(probe, tracing.trace(probe, True), [c.node for c in plan.cuts])
    torch.manual_seed(1)
    expected = probe(x)
    torch.manual_seed(1)
    assert torch.equal(_compose(segments, x), expected)
    # the default segments, in both modes, through the TracedModel
    traced = trace_model(copy.deepcopy(model), SHAPE, name)
    for training in (True, False):
        traced.train(training)
        torch.manual_seed(2)
        expected = traced.source(x)
        torch.manual_seed(2)
        assert torch.equal(_compose(traced.layers, x), expected), training


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_blocks_partition_the_user_parameters_under_the_user_names(name):
    model = FAMILIES[name]()
    learner = LocalLearner(model, "dgl", K=3, input_shape=SHAPE)
    user = {id(p): n for n, p in model.named_parameters()}
    owner: dict[int, int] = {}
    for k, block in enumerate(learner.blocks):
        for p in block.parameters():
            assert id(p) in user, "a block parameter is not the user's object"
            assert id(p) not in owner, f"{user[id(p)]} is in blocks {owner[id(p)]} and {k}"
            owner[id(p)] = k
    assert set(owner) == set(user)  # these models use every parameter they have
    keys = set(model.state_dict())
    for segment in learner.model.layers:
        names = {k for k in segment.train_graph.state_dict() if "_tensor_constant" not in k}
        assert names <= keys
    assert learner.model.state_dict().keys() == model.state_dict().keys()
    assert not any(n.startswith("_tensor_constant") for n in vars(model))  # fx's constants are taken off again


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_gradients_stay_in_their_block(name):
    learner = LocalLearner(FAMILIES[name](), "dgl", K=3, input_shape=SHAPE)
    h = _x()
    for k, block in enumerate(learner.blocks):
        h = h.detach()
        assert not h.requires_grad
        out = block(h)
        out.float().sum().backward()
        for j, other in enumerate(learner.blocks):
            touched = [p for p in other.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
            assert bool(touched) == (j == k), (k, j)
        learner.model.zero_grad(set_to_none=True)
        h = out


@pytest.mark.parametrize("method", ["dgl", "infopro", "dgl+man"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_one_step_trains_the_users_module(name, method):
    model = FAMILIES[name]()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    learner = LocalLearner(model, method, K=3)  # no input_shape: built on the first batch
    x, y = _x(), torch.tensor([0, 1, 2, 3])
    stats = learner.train_step(x, y)
    assert all(torch.isfinite(v) for v in stats.values())
    changed = [n for n, t in model.state_dict().items() if not torch.equal(before[n], t)]
    assert len(changed) > 0.5 * len(before)
    bn = [n for n in before if n.endswith("running_mean")]
    assert all(n in changed for n in bn)  # BatchNorm statistics live in the user's modules
    model.eval()
    learner.model.eval()
    with torch.no_grad():
        assert torch.equal(_compose(learner.blocks, x), model(x))
    report = learner.evaluate([(x, y)])
    assert len(report["block_accuracies"]) == 3


def test_man_copies_share_no_storage_and_follow_the_live_segment():
    model = FAMILIES["timm-vit"]()
    learner = LocalLearner(model, "dgl+man", K=3, input_shape=SHAPE)
    method = learner.method
    user = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for copies in (method.ema, method.learnable):
        assert not any(p.untyped_storage().data_ptr() in user for p in copies.parameters())
    live = list(method._live[0].parameters())
    ema = list(method.ema[0].parameters())
    assert [p.shape for p in live] == [p.shape for p in ema]
    assert all(torch.equal(a, b) for a, b in zip(live, ema))  # copy_init="live"
    with torch.no_grad():
        live[0].add_(1.0)
    gap = (live[0] - ema[0]).abs().sum()
    method.update_ema(0)
    assert 0 < (live[0] - ema[0]).abs().sum() < gap


def test_auglocal_builds_fresh_copies_of_later_segments():
    model = FAMILIES["tv-resnet"]()
    learner = LocalLearner(model, "auglocal", K=3, input_shape=SHAPE)
    user = {id(p) for p in model.parameters()}
    assert not any(id(p) in user for p in learner.method.parameters())
    learner.train_step(_x(), torch.tensor([0, 1, 2, 3]))


def test_channels_last_maps_get_permuting_heads():
    model = FAMILIES["timm-swin"]()
    learner = LocalLearner(model, "dgl", K=3, input_shape=SHAPE)
    assert "nhwc" in learner.model.layouts
    assert learner.model.plan.token_pool == ("avg", 0)


def test_vit_heads_read_the_class_token():
    learner = LocalLearner(FAMILIES["timm-vit"](), "dgl", K=2, input_shape=SHAPE)
    assert learner.model.plan.token_pool == ("token", 1)
    head = learner.method.heads[0]
    assert head[1].mode == "token"


def test_cut_after_named_modules():
    model = FAMILIES["tv-resnet"]()
    learner = LocalLearner(model, "dgl", split="layer1,layer3", input_shape=SHAPE)
    assert len(learner.blocks) == 3
    names = [learner.model.names[b] for b in learner.bounds]
    assert names == ["layer2.0", "layer4.0"]
    with pytest.raises(UserError, match="no module named 'layer9'"):
        LocalLearner(FAMILIES["tv-resnet"](), "dgl", split=["layer9"], input_shape=SHAPE)


def test_too_many_blocks_names_the_largest_k():
    model = FAMILIES["timm-vit"]()  # patch_embed, 4 blocks, head: 6 segments
    with pytest.raises(UserError, match="largest K that works is 5"):
        LocalLearner(model, "dgl", K=6, input_shape=SHAPE)


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.conv(x)
        if h.mean() > 0:  # data-dependent control flow: fx cannot trace it
            h = h.relu()
        return self.fc(h.mean((2, 3)))


class GlobalSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        return self.fc((self.b(self.a(x)) + x).mean((2, 3)))


class TupleInTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 10)
        self.aux = nn.Linear(8, 10)

    def forward(self, x):
        h = self.a(x).mean((2, 3))
        return (self.fc(h), self.aux(h)) if self.training else self.fc(h)


def test_untraceable_model_is_refused_with_the_largest_k():
    with pytest.raises(TraceRefused, match="could not trace.*largest K that works is 1"):
        LocalLearner(ValueBranch(), "dgl", K=2, input_shape=SHAPE)
    learner = LocalLearner(ValueBranch(), "e2e", input_shape=SHAPE)  # K=1 needs no cut
    learner.train_step(_x(), torch.tensor([0, 1, 2, 3]))


def test_global_skip_leaves_no_cut():
    with pytest.raises(UserError, match="skip or dense connection spans the network.*largest K that works is 1"):
        LocalLearner(GlobalSkip(), "dgl", K=2, input_shape=SHAPE)


def test_tuple_output_is_refused():
    with pytest.raises(TraceRefused, match="not one \\(N, classes\\) tensor"):
        LocalLearner(TupleInTraining(), "dgl", K=2, input_shape=SHAPE)


class PythonState(nn.Module):
    """Python state read in forward: fx bakes in the value it had while tracing, so the graph computes another
    function than later eager calls do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 10)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(self.conv(x).mean((2, 3)) * self.calls)


def test_segments_that_do_not_reproduce_the_model_are_refused():
    with pytest.raises(TraceRefused, match="do not reproduce its forward"):
        LocalLearner(PythonState(), "dgl", K=2, input_shape=SHAPE)


def test_state_dict_round_trip_rebuilds_the_same_network():
    x, y = _x(), torch.tensor([0, 1, 2, 3])
    a = LocalLearner(FAMILIES["timm-convnext"](), "dgl+man", K=3)
    a.train_step(x, y)
    state = a.state_dict()
    assert set(state["model"]) == set(a.source_model.state_dict())
    b = LocalLearner(FAMILIES["timm-convnext"](), "dgl+man", K=3)
    b.load_state_dict(state)  # builds from the stored input shape
    a.model.eval()
    b.model.eval()
    with torch.no_grad():
        assert torch.equal(a.source_model(x), b.source_model(x))


def test_input_channels_and_classes_are_adapted():
    from locallearn.models import create_model

    model = create_model("torchvision:resnet18", num_classes=7, in_channels=1)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 7
    model = create_model("timm:resnet10t", num_classes=5, in_channels=1, image_size=28)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 5)
    with pytest.raises(UserError, match="torchvision has no model"):
        create_model("torchvision:resnet9000")
    with pytest.raises(UserError, match="unknown arch"):
        create_model("keras:resnet18")


def test_builtin_models_need_no_input_shape_and_evaluate_takes_a_dataloader():
    from torch.utils.data import DataLoader, TensorDataset

    from locallearn.models import create_model

    learner = LocalLearner(create_model("resnet20", in_channels=1), "dgl", K=4)
    with pytest.raises(AttributeError, match="built on the first batch"):
        learner.blocks  # noqa: B018
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    learner.train_step(x, y)
    report = learner.evaluate(DataLoader(TensorDataset(x, y), batch_size=4))
    assert len(report["block_accuracies"]) == 4 and 0 <= report["test_accuracy"] <= 1
    with pytest.raises(UserError, match="built for inputs of shape"):
        learner.train_step(torch.rand(8, 1, 32, 32), y)


def test_evaluate_before_any_train_step_builds_the_learner_on_its_first_batch():
    """Issue 29: a new user's first call may be an accuracy at initialisation, on a torchvision model and a
    DataLoader; it cuts the model on the first batch as train_step does, and training goes on from there."""
    import torchvision
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    learner = LocalLearner(torchvision.models.resnet18(num_classes=10), method="dgl+man", K=4)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    report = learner.evaluate(DataLoader(TensorDataset(x, y), batch_size=4))
    assert learner.built and len(learner.blocks) == 4
    assert len(report["block_accuracies"]) == 4 and 0 <= report["test_accuracy"] <= 1
    learner.train_step(x, y)
    with pytest.raises(UserError, match="evaluate\\(\\) was given no batch"):
        LocalLearner(torchvision.models.resnet18(num_classes=10), "dgl", K=2).evaluate([])


def test_cli_trains_a_torchvision_model_and_lists_its_cuts(tmp_path, capsys):
    import json

    from locallearn.cli import main

    out = tmp_path / "run"
    args = ["train", "--arch", "torchvision:resnet18", "--dataset", "synthetic", "--image-size", "16",
            "--in-channels", "1", "--batch-size", "8", "--data.synthetic_train_size=16",
            "--data.synthetic_test_size=8", "--epochs", "1", "--K", "3", "--method", "dgl+man",
            "--no-progress", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arch"] == "torchvision:resnet18" and len(summary["block_accuracies"]) == 3
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt")]) == 0
    capsys.readouterr()
    assert main(["list", "--cuts", "timm:resnet10t", "--image-size", "32"]) == 0
    listing = capsys.readouterr().out
    assert "8 segments, largest K = 7" in listing
    assert sum(line.startswith("* ") for line in listing.splitlines()) == 7  # the cuts that end segments
    assert main(["train", "--arch", "timm:resnet10t", "--dataset", "synthetic", "--K", "9", "--quiet",
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "largest K that works is 7" in capsys.readouterr().err


def test_bench_estimates_a_timm_model_on_fake_copies():
    from locallearn.bench import BenchConfig, run_bench

    cfg = BenchConfig(
        arch="timm:vit_tiny_patch16_224",
        model_kwargs={"depth": 2, "patch_size": 8, "embed_dim": 32, "num_heads": 2},
        image_size=32,
        batch_size=4,
        method="dgl+man",
        ks=[2],
        splits=["even", "balanced"],
        time_steps=0,
        measure=False,  # estimates only: measuring in fresh processes is test_measure's
    )
    rows = run_bench(cfg, log=lambda line: None)
    assert [r.label for r in rows][2:] == ["dgl+man K=2 even", "dgl+man K=2 balanced"]
    assert all(r.estimated_peak_bytes > 0 and r.flops_per_image > 0 for r in rows)


def test_infopro_trains_on_normalised_plain_pairs():
    from locallearn.data import unit_range

    x = (_x() - 0.5) / 0.25  # a normalised batch: values outside [0, 1]
    target = unit_range(x)
    assert target.min() == 0 and target.max() == 1
    assert torch.equal(unit_range(_x()), _x())  # images already in [0, 1] are their own target
    learner = LocalLearner(FAMILIES["tv-resnet"](), "infopro", K=3)
    stats = learner.train_step(x, torch.tensor([0, 1, 2, 3]))
    assert all(torch.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("name", ["tv-resnet", "timm-vit"])
def test_balanced_split_and_recomputation_work_on_traced_models(name):
    x, y = _x(), torch.tensor([0, 1, 2, 3])
    states = []
    for checkpointing in ("none", "stage+aux"):
        torch.manual_seed(0)
        model = FAMILIES[name]()
        learner = LocalLearner(model, "dgl+man", K=3, split="balanced", input_shape=SHAPE, checkpointing=checkpointing)
        torch.manual_seed(1)
        learner.train_step(x, y)
        states.append((learner.bounds, model.state_dict()))
    (bounds_a, a), (bounds_b, b) = states
    assert bounds_a == bounds_b and len(bounds_a) == 2
    assert all(torch.equal(a[k], b[k]) for k in a)  # recomputing in backward changes nothing


def test_isotropic_models_get_four_stages():
    plan = plan_cuts(FAMILIES["timm-vit"](), SHAPE, "vit")  # embedding, 4 blocks, head
    assert plan.stage_of == [0, 1, 2, 3, 4, 4]
    plan = plan_cuts(FAMILIES["tv-resnet"](), SHAPE, "resnet")  # resolution changes: stem, 4 stages
    assert plan.stage_of == [0, 1, 2, 3, 4, 4]


def test_end_to_end_on_a_traced_model_is_a_plain_training_loop():
    """K=1 through the engine equals a hand-written SGD loop on the same module, bit for bit."""
    from locallearn.optim import OptimConfig

    torch.manual_seed(0)
    model = FAMILIES["tv-resnet"]()
    twin = copy.deepcopy(model)
    cfg = OptimConfig(lr=0.05, schedule="constant")
    learner = LocalLearner(model, "e2e", optim=cfg)
    opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=cfg.momentum, nesterov=True, weight_decay=1e-4)
    for step in range(2):
        x, y = _x(seed=step), torch.tensor([0, 1, 2, 3])
        learner.train_step(x, y)
        loss = nn.functional.cross_entropy(twin.train()(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
