"""AugLocal: layer sampling, pyramidal depth, fresh auxiliary layers, and a full train/evaluate step."""

import math

import pytest
import torch
from torch import nn

from locallearn import LocalLearner, create_model
from locallearn.errors import UserError
from locallearn.methods.auglocal import pyramid_depths, sampled_layers
from tests.conftest import make_batches


def make_learner(k=4, shape=(1, 16, 16), split="even", **options):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=shape[0])
    return LocalLearner(model, "auglocal", k, split, input_shape=shape, method_options=options)


def test_sampled_layers_follow_the_uniform_formula():
    assert sampled_layers(0, 16, 3) == [5, 10, 15]  # resnet32: round(15/3), round(30/3), the last layer
    assert sampled_layers(0, 16, 2) == [8, 15]  # round(7.5) = 8 (banker's rounding keeps 8, it is even)
    assert sampled_layers(1, 16, 4) == [4, 8, 12, 15]  # 1 + 14*i/4 = 4.5 -> 4, 8, 11.5 -> 12, 15
    assert sampled_layers(12, 16, 3) == [13, 14, 15]  # d >= L-1-l: every remaining layer
    assert sampled_layers(13, 16, 5) == [14, 15]
    assert sampled_layers(14, 16, 1) == [15]


def test_pyramidal_depths():
    depths = pyramid_depths(16, 5, 0.5)
    assert len(depths) == 15 and depths[0] == 5 and depths[-1] == 3  # round(5*(1-0.5) + 0.5) = 3
    assert all(a >= b for a, b in zip(depths, depths[1:]))
    assert pyramid_depths(16, 5, 0.5, pyramid=False) == [5] * 15
    assert pyramid_depths(2, 3, 0.5) == [3] and pyramid_depths(1, 3, 0.5) == []
    assert min(pyramid_depths(10, 1, 1.0)) == 1


def test_heads_are_fresh_layers_with_bn1d_only_when_shallow():
    for depth, has_bn in ((1, True), (2, False)):
        learner = make_learner(k=4, depth=depth, pyramid=False)
        backbone = {id(p) for p in learner.model.parameters()}
        assert backbone.isdisjoint(id(p) for p in learner.method.parameters())
        for head in learner.method.heads:
            assert any(isinstance(m, nn.BatchNorm1d) for m in head) == has_bn


def test_stage1_head_ends_at_the_last_stage_width_and_trains():
    shape = (1, 16, 16)
    learner = make_learner(k=4, shape=shape, split="layerwise", depth=2)  # blocks 0..2 are single layers
    head = learner.method.heads[1]  # block 1 is layer1.0 (stage 1, width 16)
    assert learner.model.stage_of[learner.bounds[1] - 1] == 1
    assert head[-1].in_features == 64 and head[-1].out_features == 10
    batch = make_batches(1, shape=shape, batch_size=4)[0]
    with torch.no_grad():
        h = learner.blocks[1](learner.blocks[0](batch.x))
        assert learner.method.aux_logits(1, h).shape == (4, 10)
    stats = learner.train_step(batch)
    assert all(math.isfinite(v.item()) for v in stats.values())
    report = learner.evaluate([batch])
    assert math.isfinite(report["test_loss"]) and all(a is not None for a in report["block_accuracies"])


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 14, 14)])
def test_heads_reach_the_last_feature_shape_even_on_odd_sizes(shape):
    """Skipping stages downsamples by the probed ratio; 14 -> 7 -> 4 checks the odd-size rounding."""
    learner = make_learner(k=5, shape=shape, split="layerwise", depth=3)
    h = torch.zeros(2, *shape)
    with torch.no_grad():
        last_features = nn.Sequential(*learner.model.layers[:-1]).eval()(h).shape[1:]
        for k, head in enumerate(learner.method.heads):
            h = learner.blocks[k](h)
            tail = 4 if isinstance(head[-2], nn.BatchNorm1d) else 3  # pool, flatten, (BN1d), linear
            assert head[:-tail](h).shape[1:] == last_features


def test_a_model_without_block_factory_is_refused():
    model = create_model("resnet20", in_channels=1)
    model.block_factory = None
    with pytest.raises(UserError, match="fresh layers.*resnet20"):
        LocalLearner(model, "auglocal", 3, input_shape=(1, 16, 16))
    LocalLearner(model, "auglocal", 1, input_shape=(1, 16, 16))  # K=1 needs no auxiliary net


def test_depth_below_one_is_refused():
    with pytest.raises(UserError, match="depth"):
        make_learner(k=3, depth=0)
