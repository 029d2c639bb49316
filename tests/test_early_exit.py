"""Early exits from the local heads (issue 29): the exits answer exactly as the heads and the network do, batched
exits are per-sample exits, and learners without auxiliary classifiers are refused with one line."""

import pytest
import torch
import torchvision

from locallearn import LocalLearner, create_model
from locallearn.errors import UserError

X = torch.rand(16, 3, 16, 16)
Y = torch.randint(0, 10, (16,))


def _trained(method: str, k: int = 3, **kw) -> LocalLearner:
    torch.manual_seed(0)
    learner = LocalLearner(create_model("resnet20"), method, k, input_shape=(3, 16, 16), **kw)
    for _ in range(3):  # heads a little away from their initialisation
        learner.train_step(X, Y)
    return learner


def test_a_threshold_above_one_gives_exactly_the_plain_networks_answers():
    learner = _trained("dgl+man")
    logits, exits = learner.early_exit(1.01)(X)
    learner.model.eval()
    with torch.no_grad():
        assert torch.equal(logits, learner.model(X))
    assert exits.tolist() == [2] * 16


@pytest.mark.parametrize("method", ["dgl", "infopro", "dgl+man", "infopro+man", "man++", "auglocal"])
def test_threshold_zero_gives_exactly_the_first_heads_answers(method):
    learner = _trained(method)
    logits, exits = learner.early_exit(0.0)(X)
    learner.model.eval()
    learner.method.eval()
    with torch.no_grad():
        head0 = learner.method.aux_logits(0, learner.blocks[0](X))
    assert torch.equal(logits, head0) and exits.tolist() == [0] * 16


def test_batched_exits_equal_per_sample_exits_and_later_blocks_see_only_the_rest():
    learner = _trained("dgl", k=4)
    learner.model.eval()
    learner.method.eval()
    with torch.no_grad():
        confidence = learner.method.aux_logits(0, learner.blocks[0](X)).softmax(1).amax(1)
    threshold = confidence.median().item()  # about half of the batch leaves at the first head
    module = learner.early_exit(threshold)
    seen = []
    learner.blocks[1].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    logits, exits = module(X)
    assert 0 < (exits == 0).sum() < 16 and seen == [int((exits > 0).sum())]  # block 1 ran on the rest only
    for i in range(16):
        one_logits, one_exit = module(X[i : i + 1])
        assert one_exit.item() == exits[i].item()
        torch.testing.assert_close(one_logits[0], logits[i], rtol=1e-5, atol=1e-5)


def test_an_unbuilt_learner_and_a_torchvision_model_are_cut_on_the_first_batch():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    learner = LocalLearner(model, "dgl", K=2)
    module = learner.early_exit(1.5)
    assert not learner.built
    x = torch.rand(4, 3, 32, 32)
    logits, exits = module(x)
    assert learner.built and exits.tolist() == [1] * 4
    learner.model.eval()
    with torch.no_grad():
        assert torch.equal(logits, learner.model(x))


@pytest.mark.parametrize("method", ["e2e", "softhebb"])
def test_learners_without_auxiliary_classifiers_are_refused_with_one_line(method):
    arch, k = ("softhebb2", 2) if method == "softhebb" else ("resnet20", 1)
    learner = LocalLearner(create_model(arch, in_channels=3), method, k)
    with pytest.raises(UserError, match=f"early_exit needs auxiliary classifiers, and {method}") as err:
        learner.early_exit(0.9)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="threshold must be a number >= 0"):
        _trained("dgl").early_exit(-0.1)
