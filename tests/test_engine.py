"""The engine: gradient isolation, end-to-end equivalence at K=1, step order, schedule, heads, state."""

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from locallearn import LocalLearner, OptimConfig, create_model, lr_at
from locallearn.errors import UserError
from locallearn.methods import any_model_methods
from tests.conftest import make_batches

LOCAL_METHODS = [m for m in any_model_methods() if m != "e2e"]


def make_learner(method="dgl", k=3, shape=(1, 28, 28), arch="resnet20", **kw):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_channels=shape[0])
    return LocalLearner(model, method, k, input_shape=shape, **kw)


def named_params(learner):
    return [
        *(("model." + n, p) for n, p in learner.model.named_parameters()),
        *(("method." + n, p) for n, p in learner.method.named_parameters()),
    ]


def record_grads_at_each_step(learner):
    """Wrap step_block to snapshot which parameters hold a gradient when block k steps."""
    seen = []
    original = learner.step_block

    def step_block(k, loss=None, stats=None):
        seen.append((k, {name: p.grad.clone() for name, p in named_params(learner) if p.grad is not None}))
        return original(k, loss, stats)

    learner.step_block = step_block
    return seen


@pytest.mark.parametrize("method", LOCAL_METHODS)
def test_each_block_steps_with_only_its_own_gradients(method):
    learner = make_learner(method, k=3)
    seen = record_grads_at_each_step(learner)
    learner.train_step(make_batches(1)[0])
    assert [k for k, _ in seen] == [0, 1, 2]
    name_of = {id(p): n for n, p in named_params(learner)}
    for k, grads in seen:
        owned = {name_of[id(p)] for p in learner.block_params(k)}
        assert set(grads) <= owned, f"block {k} saw gradients outside its own parameters"
        assert grads, f"block {k} got no gradient at all"
    got_grad = set().union(*(set(g) for _, g in seen))
    missing = [n for n, p in named_params(learner) if p.requires_grad and n not in got_grad]
    assert not missing, f"trainable parameters without gradient over a full step: {missing[:5]}"


@pytest.mark.parametrize("method", LOCAL_METHODS)
def test_changing_a_later_loss_leaves_earlier_gradients_untouched(method):
    batch = make_batches(1)[0]
    runs = []
    for scale in (1.0, 7.0):
        learner = make_learner(method, k=3)
        original = learner.method.local_loss

        def scaled(k, h, b, original=original, scale=scale):
            out = original(k, h, b)
            return out._replace(loss=out.loss * (scale if k == 1 else 1.0))

        learner.method.local_loss = scaled
        runs.append(record_grads_at_each_step(learner))
        learner.train_step(batch)
    (_, g0_a), (_, g1_a), _ = runs[0]
    (_, g0_b), (_, g1_b), _ = runs[1]
    assert g0_a.keys() == g0_b.keys() and all(torch.equal(g0_a[i], g0_b[i]) for i in g0_a)
    assert any(not torch.allclose(g1_a[i], g1_b[i]) for i in g1_a)  # the change itself is visible


def test_k1_equals_a_plain_end_to_end_loop():
    batches = make_batches(4)
    cfg = OptimConfig(lr=0.05, weight_decay=5e-4)
    learner = make_learner("e2e", k=1, arch="resnet20", optim=cfg)
    reference = copy.deepcopy(learner.model)
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for batch in batches:
        learner.train_step(batch)
        opt.zero_grad()
        F.cross_entropy(reference(batch.x), batch.y).backward()
        opt.step()
    for (name, a), b in zip(learner.model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", LOCAL_METHODS)
def test_every_local_method_at_k1_is_end_to_end(method):
    batches = make_batches(3)
    a, b = make_learner(method, k=1), make_learner("e2e", k=1)
    for batch in batches:
        a.train_step(batch)
        b.train_step(batch)
    assert sum(p.numel() for p in a.method.parameters()) == 0
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "method, options",
    [(m, {}) for m in LOCAL_METHODS] + [("infopro+man", {"ema_timing": "before_next_step", "copy_init": "random"})],
)
def test_per_block_and_after_all_step_orders_agree(method, options):
    """Block k+1's input is detached before block k steps, so stepping early changes nothing; MAN's EMA update reads
    block k+1's layer in the same state under both orders (with either ema_timing)."""
    batches = make_batches(3)
    a = make_learner(method, k=3, step_order="per_block", method_options=options)
    b = make_learner(method, k=3, step_order="after_all", method_options=options)
    for batch in batches:
        a.train_step(batch)
        b.train_step(batch)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)
    for x, y in zip(a.method.state_dict().values(), b.method.state_dict().values()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("method", ["dgl", "infopro+man"])
def test_a_gradient_exchange_in_flight_defers_its_blocks_step_past_the_next_backward(method):
    """Data parallelism with overlap (issue 30 item 4), with a stand-in exchange: block k's average starts right
    after its backward and block k steps after block k+1's backward, on the same weights as stepping at once (MAN's
    EMA copies included)."""
    batches = make_batches(2)
    plain = make_learner(method, k=3)
    overlapped = make_learner(method, k=3)
    events = []
    original_backward = overlapped.backward
    overlapped.backward = lambda k, loss: (events.append(f"backward {k}"), original_backward(k, loss))[1]
    overlapped.grad_sync_start = lambda k, opt, loss: events.append(f"start {k}")
    overlapped.grad_sync = lambda k, opt, loss: (events.append(f"wait {k}"), loss)[1]
    for batch in batches:
        plain.train_step(batch)
        overlapped.train_step(batch)
    assert events[:9] == ["backward 0", "start 0", "backward 1", "start 1", "wait 0", "backward 2", "start 2",
                          "wait 1", "wait 2"]  # fmt: skip
    for x, y in zip(plain.model.state_dict().values(), overlapped.model.state_dict().values()):
        assert torch.equal(x, y)
    for x, y in zip(plain.method.state_dict().values(), overlapped.method.state_dict().values()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 96, 96)])
@pytest.mark.parametrize("method", LOCAL_METHODS)
def test_heads_are_built_from_probed_shapes(shape, method):
    learner = make_learner(method, k=4, shape=shape, arch="resnet20")
    batch = make_batches(1, shape=shape, batch_size=4)[0]
    stats = learner.train_step(batch)
    assert all(math.isfinite(v.item()) for v in stats.values())
    report = learner.evaluate([batch])
    assert len(report["block_accuracies"]) == 4 and report["block_accuracies"][-1] == report["test_accuracy"]


def test_probe_leaves_batchnorm_statistics_alone():
    model = create_model("resnet20", in_channels=1)
    before = copy.deepcopy(model.state_dict())
    LocalLearner(model, "dgl", 3, input_shape=(1, 28, 28))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_reference_lr_schedule():
    """MAN/InfoPro train.py: e = epoch+1, E epochs, 10 warm-up epochs starting at 0.01."""
    cfg = OptimConfig(lr=0.8, schedule_unit="epoch", warmup_epochs=10, warmup_start_lr=0.01)
    spe, epochs = 7, 400

    def reference(epoch):
        e = epoch + 1
        cos = 0.5 * 0.8 * (1 + math.cos(math.pi * e / epochs))
        return cos * (e - 1) / 10 + 0.01 * (11 - e) / 10 if e <= 10 else cos

    for epoch in (0, 1, 5, 9, 10, 11, 200, 399):
        for offset in (0, spe - 1):
            assert lr_at(epoch * spe + offset, cfg, epochs * spe, spe) == pytest.approx(reference(epoch), abs=1e-12)


def test_step_schedule_without_warmup():
    cfg = OptimConfig(lr=0.1)
    assert lr_at(0, cfg, 234, 78) == pytest.approx(0.1)
    assert lr_at(117, cfg, 234, 78) == pytest.approx(0.05)
    assert lr_at(233, cfg, 234, 78) == pytest.approx(0.05 * (1 + math.cos(math.pi * 233 / 234)))


def test_the_schedule_reaches_every_optimizer():
    learner = make_learner("dgl", k=3, total_steps=10, steps_per_epoch=5)
    learner.train_step(make_batches(1)[0])
    learner.train_step(make_batches(1)[0])
    expected = lr_at(1, learner.optim_cfg, 10, 5)
    assert all(g["lr"] == expected for opt in learner.optimizers for g in opt.param_groups)


@pytest.mark.parametrize("method", any_model_methods())
def test_state_dict_round_trip_continues_identically(method):
    batches = make_batches(4)
    k = 1 if method == "e2e" else 3
    a = make_learner(method, k=k)
    for batch in batches[:2]:
        a.train_step(batch)
    b = make_learner(method, k=k)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for batch in batches[2:]:
        a.train_step(batch)
        b.train_step(batch)
    for x, y in zip(a.state_dict()["model"].values(), b.state_dict()["model"].values()):
        assert torch.equal(x, y)
    for x, y in zip(a.method.state_dict().values(), b.method.state_dict().values()):
        assert torch.equal(x, y)


def test_inference_uses_the_backbone_only():
    learner = make_learner("dgl", k=3)
    batch = make_batches(1)[0]
    learner.train_step(batch)
    learner.model.eval()
    with torch.no_grad():
        expected = learner.model(batch.x)
        for head in learner.method.heads:
            for p in head.parameters():
                p.add_(1.0)  # corrupting the auxiliary nets must not change predictions
        assert torch.equal(learner.model(batch.x), expected)


@pytest.mark.parametrize("method", ["dgl", "infopro+man"])
def test_channels_last_is_the_same_arithmetic(method):
    """NHWC only changes kernels, so one step agrees up to rounding. BatchNorm's backward on a small batch of noise
    amplifies rounding (up to ~1e-4 in the weights here), and later steps drift apart chaotically, so one step and a
    tolerance far below what a layout bug (a wrong permutation) would give."""
    batch = make_batches(1, batch_size=32)[0]
    a = make_learner(method, k=3, channels_last=False)
    b = make_learner(method, k=3, channels_last=True)
    sa, sb = a.train_step(batch), b.train_step(batch)
    assert all(torch.allclose(sa[key], sb[key], atol=1e-4) for key in sa)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), atol=1e-3)


def test_unknown_amp_is_a_clear_error():
    """``amp`` is checked by the learner itself, not only by the CLI: any other value used to mean bf16."""
    with pytest.raises(UserError, match="unknown amp 'fp8'.*bf16"):
        make_learner(amp="fp8")
    with pytest.raises(UserError, match="fp16 runs on CUDA only.*bf16"):
        make_learner(amp="fp16")  # fp16 needs its gradient scalers, which guard CUDA's float16 kernels
    assert make_learner(amp="none").amp is None


@pytest.mark.parametrize("classes", [10, 5])
def test_evaluation_reports_top5_accuracy_with_more_than_five_classes(classes):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=classes, in_channels=1)
    learner = LocalLearner(model, "dgl", 2, input_shape=(1, 12, 12))
    batches = [(torch.randn(16, 1, 12, 12), torch.randint(0, classes, (16,))) for _ in range(3)]
    report = learner.evaluate(batches)
    if classes <= 5:  # every label is in the top 5: no figure rather than a trivial 100 %
        assert report["test_top5_accuracy"] is None
        return
    model.eval()
    with torch.no_grad():
        logits = [(model(x), y) for x, y in batches]
    top1 = sum((out.argmax(1) == y).sum().item() for out, y in logits) / 48
    top5 = sum((out.topk(5, 1).indices == y[:, None]).any(1).sum().item() for out, y in logits) / 48
    assert report["test_accuracy"] == pytest.approx(top1) and report["test_top5_accuracy"] == pytest.approx(top5)
    assert top5 >= top1 and top5 > 0


def test_fit_is_the_hand_written_epoch_loop_and_reports_each_epoch():
    batches = make_batches(3, batch_size=4)
    test = [(b.x, b.y) for b in make_batches(2, batch_size=4, seed=1)]
    by_hand, fitted = make_learner("dgl+man", k=3), make_learner("dgl+man", k=3)
    for _ in range(2):
        for b in batches:
            by_hand.train_step(b)
    seen = []
    records = fitted.fit(batches, epochs=2, test=test, on_epoch=seen.append)
    for a, b in zip(by_hand.state_dict()["model"].values(), fitted.state_dict()["model"].values()):
        assert torch.equal(a, b)
    assert seen == records and [r["epoch"] for r in records] == [1, 2] and records[0]["phase"] is None
    assert records[1]["steps"] == 3 and set(records[1]) >= {"loss/0", "loss/2", "acc/0", "acc/2", "test_accuracy"}
    assert records[1]["test_accuracy"] == fitted.evaluate(test)["test_accuracy"]
    with pytest.raises(UserError, match="epochs"):
        fitted.fit(batches, epochs=0)


def test_fit_builds_an_unbuilt_learner_on_a_first_batch_and_refuses_an_empty_loader():
    torch.manual_seed(0)
    learner = LocalLearner(create_model("resnet20", num_classes=10, in_channels=1), "dgl", 2)
    assert not learner.built
    records = learner.fit([(b.x, b.y) for b in make_batches(2, batch_size=4)], epochs=1)
    assert learner.built and learner.step == 2 and records[0]["steps"] == 2
    torch.manual_seed(0)
    with pytest.raises(UserError, match="empty"):
        LocalLearner(create_model("resnet20", num_classes=10, in_channels=1), "dgl", 2).fit([], epochs=1)


def test_fit_gives_a_locallearn_loader_each_epochs_index_and_restores_its_batch_size():
    from locallearn import DataConfig, build_data

    train, test, info = build_data(
        DataConfig(name="synthetic", synthetic_train_size=40, synthetic_test_size=16, image_size=12), 8
    )
    by_hand = make_learner("dgl", k=2, shape=(3, 12, 12))
    fitted = make_learner("dgl", k=2, shape=(3, 12, 12))
    for epoch in range(2):
        train.set_epoch(epoch)  # the run's data order: a function of (seed, epoch)
        for b in train:
            by_hand.train_step(b)
    records = fitted.fit(train, epochs=2, test=test)
    assert [r["steps"] for r in records] == [5, 5]
    for a, b in zip(by_hand.state_dict()["model"].values(), fitted.state_dict()["model"].values()):
        assert torch.equal(a, b)
    assert train.batch_size == 8
