"""Compiled blocks (issue 30 item 1): each block's forward and local loss is one graph, compiled training agrees with
eager training, a short batch runs eagerly instead of recompiling, and the compile time is reported apart."""

import json
import logging

import pytest
import torch
from torch import nn
from torch._dynamo.backends.registry import lookup_backend

import locallearn.compiled as compiled
from locallearn import LocalLearner, create_model
from locallearn.cli import main
from locallearn.errors import UserError
from locallearn.optim import OptimConfig


@pytest.fixture
def graphs(monkeypatch):
    """Compile with AOTAutograd's eager backend (Dynamo's capture and the joint forward/backward graph, no kernels to
    generate: seconds instead of a minute) and record every graph Dynamo hands it."""
    seen = []
    aot_eager = lookup_backend("aot_eager")

    def counting(gm, example_inputs):
        seen.append(gm)
        return aot_eager(gm, example_inputs)

    monkeypatch.setattr(compiled, "BACKEND", counting)
    torch._dynamo.reset()
    return seen


def _state(learner: LocalLearner) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v for k, v in learner.model.state_dict().items()}
    tensors.update({f"method.{k}": v for k, v in learner.method.state_dict().items()})
    return {k: v.detach().clone() for k, v in tensors.items()}


def _train(make, compile: str, sizes: list[int], shape: tuple[int, ...]) -> tuple[list, dict, LocalLearner]:
    torch.manual_seed(0)
    learner = make(compile)
    data = torch.Generator().manual_seed(1)
    losses = []
    for n in sizes:
        x, y = torch.rand(n, *shape, generator=data), torch.randint(0, 10, (n,), generator=data)
        stats = learner.train_step(x, y)
        losses += [float(stats[f"loss/{k}"]) for k in range(len(learner.blocks))]
    return losses, _state(learner), learner


@pytest.mark.parametrize(
    "method, checkpointing",
    [("dgl", "none"), ("infopro+man", "aux"), ("auglocal", "none")],
    ids=["dgl", "infopro+man+aux-recompute", "auglocal"],
)
def test_compiled_blocks_train_exactly_as_eager_ones_one_graph_per_block(graphs, method, checkpointing):
    """MAN's EMA copies (updated in place after each step), InfoPro's decoder, AugLocal's sampled layers and the
    recomputed auxiliary segments all inside the graphs; the short last batch (8) runs eagerly."""

    def make(mode):
        return LocalLearner(create_model("resnet20"), method, 3, input_shape=(3, 16, 16), compile=mode,
                            checkpointing=checkpointing)  # fmt: skip

    sizes = [16, 16, 8]
    eager_losses, eager_state, _ = _train(make, "off", sizes, (3, 16, 16))
    assert not graphs
    losses, state, learner = _train(make, "default", sizes, (3, 16, 16))
    assert len(graphs) == 3  # one per block: no graph break, no graph across blocks, no recompile for the 8
    assert learner.compiled.batch_size == 16 and learner.compile_seconds > 0
    assert losses == pytest.approx(eager_losses, abs=1e-5)
    assert state.keys() == eager_state.keys()
    for key in state:
        torch.testing.assert_close(state[key], eager_state[key], rtol=1e-5, atol=1e-6, msg=key)


def test_inductor_compiled_dgl_agrees_with_eager_within_float_tolerance():
    """The real backend once (generated kernels; a tiny network, so the compile takes seconds): a small learning
    rate keeps the runs from amplifying float rounding (at lr 0.1 a 1e-6 perturbation changes the third step's loss
    in the third decimal, eager against eager)."""

    def make(mode):
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))  # fmt: skip
        return LocalLearner(net, "dgl", 2, input_shape=(3, 8, 8), compile=mode, optim=OptimConfig(lr=0.01))

    sizes = [16, 16, 16, 8]
    eager_losses, eager_state, _ = _train(make, "off", sizes, (3, 8, 8))
    torch._dynamo.reset()
    losses, state, learner = _train(make, "default", sizes, (3, 8, 8))
    assert learner.compile_seconds > 0
    assert losses == pytest.approx(eager_losses, abs=1e-4)
    for key in state:
        torch.testing.assert_close(state[key], eager_state[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_compiled_run_reports_its_compile_time_apart_and_bad_modes_are_refused(graphs, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="locallearn")
    out = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", "--image-size", "16", "--arch", "resnet20", "--method", "dgl",
            "--K", "2", "--batch-size", "16", "--epochs", "1", "--device", "cpu", "--no-progress",
            "--data.synthetic_train_size=40", "--data.synthetic_test_size=16", "--tensorboard", "off",
            "--train.compile=default", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compile"] == "default" and summary["compile_seconds"] > 0
    assert len(graphs) == 2 and summary["steps"] == 2  # one graph per block (the loader drops the short batch)
    assert "compiled 2 blocks (default) in" in caplog.text
    capsys.readouterr()
    assert main([*args[:-3], "--train.compile=fast", "--out", str(tmp_path / "bad")]) == 2
    assert "train.compile" in capsys.readouterr().err and not (tmp_path / "bad" / "summary.json").exists()
    with pytest.raises(UserError, match="softhebb's blocks are not compiled"):
        LocalLearner(create_model("softhebb1"), "softhebb", compile="default")
