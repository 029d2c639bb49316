"""Recomputation (``checkpointing="stage" | "aux" | "stage+aux"``): same training state bit for bit, less memory."""

import contextlib

import pytest
import torch

from locallearn import LocalLearner, create_model, recompute
from locallearn.errors import UserError
from locallearn.memory import balanced_boundaries, estimate_peak, head_costs, layer_costs, split_cost
from locallearn.methods import any_model_methods
from tests.conftest import make_batches

LOCAL_METHODS = [m for m in any_model_methods() if m != "e2e"]


def trained_state(method, checkpointing, k=3, steps=2):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1)
    learner = LocalLearner(model, method, k, input_shape=(1, 16, 16), checkpointing=checkpointing)
    for batch in make_batches(steps, shape=(1, 16, 16)):
        learner.train_step(batch)
    return {
        **{"model." + n: t for n, t in learner.model.state_dict().items()},
        **{"method." + n: t for n, t in learner.method.state_dict().items()},
    }


def differing(a, b):
    assert a.keys() == b.keys()
    return [n for n in a if not torch.equal(a[n], b[n])]


@pytest.mark.parametrize("checkpointing", ["aux", "stage", "stage+aux"])
@pytest.mark.parametrize("method", LOCAL_METHODS)
def test_recomputation_leaves_parameters_and_buffers_bit_identical(method, checkpointing):
    """Including BatchNorm running statistics (and MAN's EMA copies), which a plain checkpoint would move twice."""
    assert differing(trained_state(method, "none"), trained_state(method, checkpointing)) == []


def test_without_restoring_batchnorm_statistics_they_would_differ(monkeypatch):
    """The restore is what makes the test above pass: a plain checkpoint updates running statistics twice."""
    monkeypatch.setattr(recompute, "batchnorm_stats_restored", lambda modules: contextlib.nullcontext())
    diff = differing(trained_state("infopro+man", "none"), trained_state("infopro+man", "aux"))
    assert diff and all("running_" in n or "num_batches" in n for n in diff)


def test_unknown_checkpointing_is_a_clear_error():
    with pytest.raises(UserError, match="stage\\+aux"):
        LocalLearner(create_model("resnet20"), "dgl", 2, input_shape=(3, 16, 16), checkpointing="everything")


def estimate(method, checkpointing, k=3, split="even"):
    def build():
        torch.manual_seed(0)
        model = create_model("resnet20", num_classes=10, in_channels=3)
        return LocalLearner(model, method, k, split, input_shape=(3, 16, 16), checkpointing=checkpointing)

    return estimate_peak(build, (3, 16, 16), 32, 10)


@pytest.mark.parametrize("method", ["infopro+man", "infopro", "dgl"])
def test_recomputing_the_auxiliary_nets_never_raises_the_peak_much(method):
    """Recomputation keeps each segment's input and rebuilds one segment at a time in backward, so where the
    auxiliary net is small next to its block (DGL's head; InfoPro's since its 8×8 decoders are factored) the peak
    moves by a percent either way; it must never grow by more."""
    plain, aux = estimate(method, "none"), estimate(method, "aux")
    assert aux.peak <= 1.02 * plain.peak
    if method == "infopro+man":  # MAN's copies + decoder + head outweigh a ResNet-20 block: the peak must drop
        assert aux.peak < 0.95 * plain.peak


def test_cut_costs_with_recomputed_auxiliary_nets_are_lower_and_the_split_uses_them():
    model = create_model("resnet32")
    shape = (3, 16, 16)
    plain = head_costs(model, "infopro+man", None, shape)
    aux = head_costs(model, "infopro+man", None, shape, recompute_aux=True)
    inner = range(1, len(plain) - 1)
    assert all(0 < aux[j] < plain[j] for j in inner)
    layers = layer_costs(model, shape)
    bounds = balanced_boundaries(layers, aux, 4)
    assert split_cost(layers, aux, bounds) <= split_cost(layers, aux, balanced_boundaries(layers, plain, 4))
    learner = LocalLearner(model, "infopro+man", 4, "balanced", input_shape=shape, checkpointing="aux")
    assert learner.bounds == bounds


def test_evaluation_does_not_recompute_or_touch_statistics():
    torch.manual_seed(0)
    learner = LocalLearner(
        create_model("resnet20", in_channels=1), "infopro+man", 3, input_shape=(1, 16, 16), checkpointing="aux"
    )
    before = {n: t.clone() for n, t in learner.method.state_dict().items()}
    learner.evaluate(make_batches(1, shape=(1, 16, 16)))
    after = learner.method.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_bench_adds_recomputed_rows_with_their_own_cuts_and_bound():
    from locallearn.bench import BenchConfig, markdown, run_bench

    cfg = BenchConfig(
        arch="resnet20",
        image_size=16,
        batch_size=32,  # at tiny batches parameters, not activations, decide the peak
        method="infopro+man",
        ks=[3],
        splits=["balanced"],
        local_checkpointing=["none", "aux"],
        time_steps=0,
        measure=False,  # estimates only: measuring in fresh processes is test_measure's
    )
    rows = run_bench(cfg, log=lambda line: None)
    labels = [r.label for r in rows]
    assert labels[2:] == ["infopro+man K=3 balanced", "infopro+man K=3 balanced + aux recompute"]
    plain, aux = rows[2], rows[3]
    assert aux.checkpointing == "aux" and aux.estimated_peak_bytes < plain.estimated_peak_bytes
    assert rows[0].parts["lower_bound_aux_recompute"] < rows[0].parts["lower_bound"]
    assert "Lower bound with the auxiliary nets recomputed" in markdown(cfg, rows, "test machine", "cmd")
