"""Memory tools: the fake-tensor estimate equals real-tensor tracking, balanced splits beat even ones, bench runs."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from locallearn import LocalLearner, create_model
from locallearn.bench import train_flops_per_image
from locallearn.cli import main
from locallearn.memory import balanced_boundaries, estimate_peak, head_costs, layer_costs, split_cost
from locallearn.models import resolve_split


def builder(method, k, split="even", **kw):
    def build():
        torch.manual_seed(0)
        model = create_model("resnet20", num_classes=10, in_channels=3)
        return LocalLearner(model, method, k, split, input_shape=(3, 16, 16), **kw)

    return build


@pytest.mark.parametrize("method,k", [("e2e", 1), ("dgl", 3), ("infopro+man", 3)])
def test_fake_estimate_equals_real_tensor_tracking(method, k):
    fake = estimate_peak(builder(method, k), (3, 16, 16), 32, 10, fake=True)
    real = estimate_peak(builder(method, k), (3, 16, 16), 32, 10, fake=False)
    assert fake.peak == real.peak and fake.parts == real.parts
    assert fake.parts["Activation"] > 0 and fake.parts["Parameter"] > 0


def test_local_blocks_hold_less_activation_than_end_to_end():
    e2e = estimate_peak(builder("e2e", 1), (3, 16, 16), 64, 10)
    dgl = estimate_peak(builder("dgl", 4), (3, 16, 16), 64, 10)
    assert dgl.parts["Activation"] < 0.6 * e2e.parts["Activation"]


def test_checkpointing_lowers_the_estimate():
    plain = estimate_peak(builder("e2e", 1), (3, 16, 16), 64, 10)
    ckpt = estimate_peak(builder("e2e", 1, checkpointing="stage"), (3, 16, 16), 64, 10)
    assert ckpt.parts["Activation"] < plain.parts["Activation"]


def test_balanced_dp_is_optimal_on_a_small_case():
    layers, cuts = [5, 1, 1, 1, 1, 5, 0], [0, 2, 2, 2, 2, 2, 0]
    best = min(split_cost(layers, cuts, [a, b]) for a in range(1, 6) for b in range(a + 1, 6))
    assert split_cost(layers, cuts, balanced_boundaries(layers, cuts, 3)) == best


@pytest.mark.parametrize("arch,method", [("resnet20", "dgl"), ("resnet32", "infopro+man"), ("resnet56", "infopro")])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_balanced_never_worse_than_even(arch, method, k):
    model = create_model(arch)
    lc, hc = layer_costs(model, (3, 16, 16)), head_costs(model, method, None, (3, 16, 16))
    balanced = balanced_boundaries(lc, hc, k)
    assert split_cost(lc, hc, balanced) <= split_cost(lc, hc, resolve_split(model, "even", k))
    assert len(balanced) == k - 1


def test_balanced_split_moves_cuts_early_and_trains():
    model = create_model("resnet32", in_channels=3)
    learner = LocalLearner(model, "infopro", 4, "balanced", input_shape=(3, 16, 16))
    assert learner.bounds[0] < resolve_split(model, "even", 4)[0]  # early, high-resolution layers cost the most


def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    code = main(
        [
            "bench",
            "--arch",
            "resnet20",
            "--image-size",
            "16",
            "--batch-size",
            "8",
            "--method",
            "dgl",
            "--K",
            "2",
            "3",
            "--time-steps",
            "1",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    labels = [r["label"] for r in data["rows"]]
    assert labels[:2] == ["E2E", "E2E + checkpointing per stage"] and len(labels) == 2 + 2 * 2
    assert all(r["estimated_peak_bytes"] > 0 and r["images_per_second"] > 0 for r in data["rows"])
    assert (tmp_path / "bench.png").stat().st_size > 1000 and "| E2E |" in out
    flops = {r["label"]: r["flops_per_image"] for r in data["rows"]}
    assert flops["E2E + checkpointing per stage"] > flops["E2E"] > 0  # recomputation is arithmetic too
    # every row measured in a fresh process beside its estimate (locallearn.measure)
    for r in data["rows"]:
        assert r["measured_growth_bytes"] is not None and r["measured_growth_bytes"] > 0
        assert r["measured_peak_bytes"] > r["measured_growth_bytes"]  # the process holds torch itself too
        assert 0 < r["estimated_step_bytes"] < r["estimated_peak_bytes"]
    assert "measured step MiB" in out and "| E2E | 1 | [] |" in out


def test_train_flops_count_the_backward_and_see_the_decoder_form():
    shape = (3, 32, 32)

    def build(method, k=None, options=None):
        return lambda: LocalLearner(
            create_model("resnet20", in_channels=3), method, k, input_shape=shape, method_options=options
        )

    with FlopCounterMode(display=False) as counter:
        create_model("resnet20", in_channels=3)(torch.rand(2, *shape))
    forward = counter.get_total_flops() / 2
    e2e = train_flops_per_image(build("e2e"), shape, 10)
    assert 2.5 * forward < e2e < 3 * forward  # input and weight gradients, but none for the image itself
    direct = train_flops_per_image(build("infopro", 4, {"decoder_form": "direct"}), shape, 10)
    factored = train_flops_per_image(build("infopro", 4), shape, 10)  # "auto": the 8×8 decoders are factored
    assert e2e < factored < 0.95 * direct


@pytest.mark.parametrize("method", ["dgl", "infopro+man", "auglocal"])
def test_split_costs_on_fake_tensors_equal_the_real_byte_counts(method):
    """Planning runs on fake tensors (nothing allocated); its byte counts must be the real ones."""
    from locallearn.memory import split_costs

    model = create_model("resnet20")
    shape = (3, 16, 16)
    real = layer_costs(model, shape), head_costs(model, method, None, shape)
    assert split_costs(model, method, None, shape) == real


def test_planning_a_wide_dgl_split_allocates_no_auxiliary_nets():
    """DGL's MLP-SR heads at every possible cut of a 2048-channel network hold hundreds of MiB of weights; planned on
    fake tensors they cost nothing, so the process's peak does not move."""
    import resource

    from locallearn.memory import split_costs

    model = create_model("resnet50", num_classes=10)  # torchvision's Bottleneck ResNet-50: cuts up to 2048 channels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    layers, cuts = split_costs(model, "dgl", None, (3, 64, 64))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert len(cuts) == len(layers) and max(cuts) > 0
    assert grown_mib < 200, grown_mib  # real heads at all 16 cuts: > 1 GiB of parameters alone
