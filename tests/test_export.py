"""`locallearn export` (issue 29 item 3): the exported network reproduces the checkpoint's outputs, in both formats
and as an early-exit directory; bad input is refused and nothing on disk is overwritten."""

import json
import sys

import pytest
import torch

from locallearn.checkpoint import restore_learner
from locallearn.cli import main
from locallearn.export import load_early_exit

TINY = ["--dataset", "synthetic", "--image-size", "16", "--arch", "resnet20", "--batch-size", "16", "--device", "cpu",
        "--no-progress", "--quiet", "--data.synthetic_train_size=64", "--data.synthetic_test_size=16",
        "--tensorboard", "off"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(["train", *TINY, "--method", "dgl+man", "--K", "2", "--max-steps", "3", "--out", str(out)]) == 0
    learner, _, _ = restore_learner(out / "checkpoint.pt", device="cpu")
    learner.model.eval()
    learner.method.eval()
    return out, learner


def _export(capsys, *args) -> tuple[int, dict | str]:
    code = main(["export", *map(str, args)])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else err)


def test_the_exported_program_reproduces_the_network_at_any_batch_size(run, tmp_path, capsys):
    out, learner = run
    code, report = _export(capsys, "--checkpoint", out / "checkpoint.pt", "--format", "exported", "--out",
                           tmp_path / "net.pt2")  # fmt: skip
    assert code == 0 and report["max_abs_difference"] == 0.0
    program = torch.export.load(tmp_path / "net.pt2").module()
    x = torch.rand(5, 3, 16, 16)  # another batch size than the one exported with
    with torch.no_grad():
        torch.testing.assert_close(program(x), learner.model(x), rtol=0, atol=1e-5)
    assert not any(tmp_path.glob(".*.tmp"))


def test_onnx_reproduces_the_network_under_onnxruntime(run, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    out, learner = run
    code, report = _export(capsys, "--checkpoint", out / "checkpoint.pt", "--format", "onnx", "--out",
                           tmp_path / "net.onnx")  # fmt: skip
    assert code == 0 and report["max_abs_difference"] <= 1e-4, report
    assert [p.name for p in tmp_path.iterdir()] == ["net.onnx"]  # one self-contained file, nothing left beside it
    session = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 3, 16, 16)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), learner.model(x), rtol=1e-4, atol=1e-4)


def test_the_early_exit_directory_answers_as_the_learners_early_exit_module(run, tmp_path, capsys):
    out, learner = run
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        confidence = learner.method.aux_logits(0, learner.blocks[0](x)).softmax(1).amax(1)
    threshold = confidence.median().item()  # some samples leave at head 0, the others go on
    code, report = _export(capsys, "--checkpoint", out / "checkpoint.pt", "--format", "exported", "--early-exit",
                           threshold, "--out", tmp_path / "ee")  # fmt: skip
    assert code == 0 and report["heads"] == [0]
    assert json.loads((tmp_path / "ee" / "exits.json").read_text())["threshold"] == threshold
    logits, exits = load_early_exit(tmp_path / "ee")(x)
    expected, expected_exits = learner.early_exit(threshold)(x)
    assert torch.equal(exits, expected_exits) and 0 < (exits == 0).sum() < 16
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_bad_exports_are_refused_and_nothing_is_overwritten(run, tmp_path, capsys, monkeypatch):
    out, _ = run
    taken = tmp_path / "taken.pt2"
    taken.write_text("keep me")
    code, err = _export(capsys, "--checkpoint", out / "checkpoint.pt", "--format", "exported", "--out", taken)
    assert code == 2 and "exists" in err and taken.read_text() == "keep me"
    code, err = _export(capsys, "--checkpoint", tmp_path / "nope.pt", "--format", "exported", "--out", tmp_path / "a")
    assert code == 4 and "not found" in err
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    code, err = _export(capsys, "--checkpoint", out / "checkpoint.pt", "--format", "onnx", "--out", tmp_path / "b")
    assert code == 2 and "pip install 'locallearn[export]'" in err and not (tmp_path / "b").exists()
