"""Nothing lost: a run killed (SIGKILL) or preempted (SIGTERM) and resumed ends with the uninterrupted run's weights;
checkpoints are complete or ignored; non-finite losses stop or skip; bad checkpoints are refused with their exit
status. The training runs are real ``locallearn train`` processes."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from locallearn import LocalLearner, create_model
from locallearn.durable import CheckpointStore, atomic_write, verify
from locallearn.errors import NonFiniteError
from locallearn.metrics import fingerprint

RUN = [
    sys.executable, "-m", "locallearn", "train", "--dataset", "synthetic", "--image-size", "16", "--arch", "resnet20",
    "--K", "3", "--batch-size", "32", "--epochs", "2", "--device", "cpu", "--no-progress",
    "--data.synthetic_train_size=320", "--data.synthetic_test_size=64", "--checkpoint-every", "3",
]  # fmt: skip


def _train(out: Path, method: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*RUN, "--method", method, "--out", str(out), *extra], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _interrupt(out: Path, method: str, sig: int, after_step: int) -> subprocess.CompletedProcess:
    """Start a run and send ``sig`` once checkpoint ``after_step`` is complete."""
    proc = subprocess.Popen(
        [*RUN, "--method", method, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    manifest = out / "checkpoints" / f"step-{after_step:09d}.json"
    deadline = time.monotonic() + 120
    while not manifest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run per method, shared by the tests that compare against it."""
    root = tmp_path_factory.mktemp("uninterrupted")
    summaries = {}
    for method in ("dgl+man", "auglocal"):
        _train(root / method, method)
        summaries[method] = _summary(root / method)
    return summaries


@pytest.mark.parametrize("method", ["dgl+man", "auglocal"])  # MAN's EMA copies; AugLocal's random layer sampling
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path, uninterrupted, method):
    out = tmp_path / "run"
    killed = _interrupt(out, method, signal.SIGKILL, after_step=6)
    assert killed.returncode == -signal.SIGKILL and not (out / "summary.json").exists()
    resumed = _train(out, method, "--resume", "auto")
    assert "resume: taking" in resumed.stderr
    assert "skipped checkpoint" not in resumed.stderr  # the newest complete checkpoint was taken
    summary = _summary(out)
    assert summary["resumed_from"] is not None and summary["steps"] == uninterrupted[method]["steps"]
    assert summary["fingerprint"] == uninterrupted[method]["fingerprint"]
    assert summary["test_accuracy"] == uninterrupted[method]["test_accuracy"]


def test_sigterm_saves_and_exits_143_and_the_same_command_resumes(tmp_path, uninterrupted):
    out = tmp_path / "run"
    stopped = _interrupt(out, "dgl+man", signal.SIGTERM, after_step=3)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-1000:]
    assert "SIGTERM received" in stopped.stderr and "--resume auto" in stopped.stderr
    assert CheckpointStore(out).newest_valid().path is not None
    _train(out, "dgl+man", "--resume", "auto")
    assert _summary(out)["fingerprint"] == uninterrupted["dgl+man"]["fingerprint"]


def test_a_truncated_newest_checkpoint_is_skipped_and_the_previous_one_taken(tmp_path, uninterrupted):
    out = tmp_path / "run"
    _interrupt(out, "dgl+man", signal.SIGKILL, after_step=9)  # checkpoints 6 and 9 complete
    store = CheckpointStore(out)
    newest = store.manifests()[0].with_suffix(".pt")
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated by hand
    previous = store.manifests()[1].with_suffix(".pt")
    resumed = _train(out, "dgl+man", "--resume", "auto")
    assert f"skipped checkpoint {newest.name}" in resumed.stderr and "truncated" in resumed.stderr
    assert f"resume: taking {previous}" in resumed.stderr
    assert _summary(out)["fingerprint"] == uninterrupted["dgl+man"]["fingerprint"]


def _refused(capsys, out: Path, *extra: str) -> tuple[int, str]:
    """The CLI in this process (a refusal trains nothing, so no process of its own): exit status and stderr."""
    from locallearn.cli import main

    code = main([*RUN[3:], "--method", "dgl+man", "--out", str(out), *extra])
    return code, capsys.readouterr().err


def test_resume_auto_without_checkpoints_starts_fresh_and_bad_resumes_are_refused(tmp_path, uninterrupted, capsys):
    fresh = _train(tmp_path / "fresh", "dgl+man", "--resume", "auto")
    assert "starting a fresh run" in fresh.stderr
    assert _summary(tmp_path / "fresh")["fingerprint"] == uninterrupted["dgl+man"]["fingerprint"]
    code, err = _refused(capsys, tmp_path / "x", "--resume", str(tmp_path / "nope.pt"))
    assert code == 4 and "no such file" in err
    ckpt = CheckpointStore(tmp_path / "fresh").manifests()[0].with_suffix(".pt")
    code, err = _refused(capsys, tmp_path / "fresh", "--resume", str(ckpt), "--lr", "0.05")
    assert code == 4 and "optim.lr" in err  # the differing field is named
    ckpt.write_bytes(b"garbage")
    code, err = _refused(capsys, tmp_path / "fresh", "--resume", str(ckpt))
    assert code == 4 and "does not verify" in err
    final = tmp_path / "fresh" / "checkpoint.pt"  # the final checkpoint carries no training progress
    code, err = _refused(capsys, tmp_path / "fresh", "--resume", str(final))
    assert code == 4 and "without training progress" in err


def test_rotation_keeps_two_complete_checkpoints_and_writes_are_atomic(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (1, 2, 3):
        store.save({"w": torch.full((4,), float(step))}, step, {"epoch": 0, "batch": step})
    names = sorted(p.name for p in store.dir.iterdir())
    assert names == ["step-000000002.json", "step-000000002.pt", "step-000000003.json", "step-000000003.pt"]
    assert all(verify(m) is None for m in store.manifests())
    atomic_write(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").read_text() == "x" and not list(tmp_path.glob(".*.tmp"))


def _poisoned_learner(nonfinite: str):
    """A learner whose block 1 gets a NaN gradient (its loss stays finite) until the hook is removed."""
    torch.manual_seed(0)
    learner = LocalLearner(create_model("resnet20"), "dgl", 3, input_shape=(3, 16, 16), nonfinite=nonfinite)
    weight = next(learner.blocks[1].parameters())
    hook = weight.register_hook(lambda g: g * float("nan"))
    return learner, weight, hook


def test_a_non_finite_gradient_stops_before_the_step_and_names_the_block():
    learner, weight, _ = _poisoned_learner("stop")
    before = weight.detach().clone()
    with pytest.raises(NonFiniteError, match="block 1 .* step 0"):
        learner.train_step(torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    assert torch.equal(weight.detach(), before)  # block 1 never stepped on the NaN gradient


def test_skip_mode_skips_and_counts_non_finite_steps():
    learner, weight, hook = _poisoned_learner("skip")
    first = next(learner.blocks[0].parameters())
    before, before_first = weight.detach().clone(), first.detach().clone()
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    learner.train_step(x, y)
    assert learner.skipped_steps == 1 and torch.equal(weight.detach(), before)
    assert not torch.equal(first.detach(), before_first)  # the other blocks stepped
    hook.remove()
    learner.train_step(x, y)
    assert learner.skipped_steps == 1 and not torch.equal(weight.detach(), before)


def test_deterministic_runs_are_bitwise_equal_step_by_step(tmp_path):
    """--deterministic: two runs with the same seed hold the same backbone, auxiliary nets and optimizer state after
    every step (checkpoints of steps 1..4 compared tensor by tensor)."""
    from locallearn.checkpoint import load_checkpoint

    for name in ("a", "b"):
        _train(tmp_path / name, "dgl+man", "--deterministic", "--checkpoint-every", "1", "--max-steps", "4",
               "--train.keep_checkpoints=8")  # fmt: skip
    for step in range(1, 5):
        a, b = (load_checkpoint(tmp_path / n / "checkpoints" / f"step-{step:09d}.pt")["learner"] for n in "ab")
        for part in ("model", "method"):
            assert a[part].keys() == b[part].keys()
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), (step, part)
        assert _same(a["optimizers"], b["optimizers"]), step


def _same(x, y) -> bool:
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return isinstance(y, (list, tuple)) and len(x) == len(y) and all(map(_same, x, y))
    return x == y


def _deferred_learner(nonfinite: str, check_every: int, poison: bool = True):
    """The poisoned learner, with the guard decided on the device (read every ``check_every`` steps)."""
    torch.manual_seed(0)
    learner = LocalLearner(
        create_model("resnet20"), "dgl", 3, input_shape=(3, 16, 16), nonfinite=nonfinite, check_every=check_every
    )
    weight = next(learner.blocks[1].parameters())
    hook = weight.register_hook(lambda g: g * float("nan")) if poison else None
    return learner, weight, hook


def test_skip_decided_on_the_device_skips_exactly_as_the_host_check_does():
    """Issue 30: with the guard on the device ("skip", check_every=0) the poisoned block's step is undone on the
    device (parameters and momentum), so after the hook is gone both learners hold the same weights bit for bit."""
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    weights = []
    for check_every in (1, 0):
        learner, weight, hook = _poisoned_learner("skip") if check_every == 1 else _deferred_learner("skip", 0)
        before = weight.detach().clone()
        learner.train_step(x, y)
        assert torch.equal(weight.detach(), before)  # undone on the device (check_every 0: nothing read yet)
        hook.remove()
        learner.train_step(x, y)
        learner.train_step(x, y)
        assert learner.skipped_by_block == [0, 1, 0] and learner.skipped_steps == 1
        weights.append(fingerprint(learner.model))
    assert weights[0] == weights[1]


def test_stop_decided_on_the_device_names_the_first_non_finite_block_and_step_at_the_next_read():
    learner, weight, hook = _deferred_learner("stop", 3, poison=False)
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    learner.train_step(x, y)  # step 0: finite
    hook = weight.register_hook(lambda g: g * float("nan"))
    learner.train_step(x, y)  # step 1: non-finite, not read yet
    with pytest.raises(NonFiniteError, match=r"block 1 .* at step 1 .*every 3 steps"):
        learner.train_step(x, y)  # step 2 ends the third step: the guard is read
    hook.remove()


def test_a_training_step_reads_nothing_from_the_device_when_the_guard_is_deferred(monkeypatch):
    """Issue 30: no ``.item()``, ``bool()``, ``int()``, ``float()`` or ``.tolist()`` of a tensor in a DGL K=4 step
    (what would stall a GPU's launch queue), with the guard read every 50 steps; with ``check_every=1`` the same
    step reads the device once per block."""
    reads = []
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    for check_every, expected in ((50, 0), (1, 4)):
        torch.manual_seed(0)
        learner = LocalLearner(create_model("resnet20"), "dgl", 4, input_shape=(3, 16, 16), check_every=check_every)
        learner.train_step(x, y)  # the optimizers' state exists from here on
        with monkeypatch.context() as m:
            for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist"):
                real = getattr(torch.Tensor, name)
                m.setattr(torch.Tensor, name, lambda self, *a, _real=real, _n=name: reads.append(_n) or _real(self, *a))
            learner.train_step(x, y)
        assert len(reads) == expected, reads
        reads.clear()


def test_a_run_with_the_guard_on_the_device_stops_before_its_next_checkpoint(tmp_path, capsys):
    """A run reads the guard every --log-every steps and before every checkpoint: at lr 1e30 block 0's loss is NaN
    at step 1; the run stops at the step-3 checkpoint with exit 5, naming block 0 and step 1, and saves nothing."""
    code, err = _refused(capsys, tmp_path / "nan", "--lr", "1e30", "--max-steps", "6", "--tensorboard", "off")
    assert code == 5 and "block 0 has a non-finite loss or gradient at step 1" in err and "every 50 steps" in err
    assert not (tmp_path / "nan" / "checkpoints").exists() or not list((tmp_path / "nan" / "checkpoints").iterdir())
