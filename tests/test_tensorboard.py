"""TensorBoard event files and run.json: the tags a run writes, their points, their values (the same as
metrics.jsonl), nothing when off, a clear error when asked for without the package, and a crashed run that resumes
into the same directory without duplicated or lost points and with both starts in run.json."""

import importlib.util
import json
import logging
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from locallearn import tensorboard_log
from locallearn.cli import main

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# 64 training images in batches of 16: 4 steps per epoch, 2 epochs; K=3 DGL blocks, each with a classifier head
TINY = [
    "train",
    "--dataset", "synthetic", "--image-size", "16", "--arch", "resnet20", "--batch-size", "16",
    "--data.synthetic_train_size=64", "--data.synthetic_test_size=32", "--method", "dgl", "--K", "3",
    "--epochs", "2", "--no-progress", "--quiet",
]  # fmt: skip
STEPS, EPOCH_STEPS = list(range(1, 9)), [4, 8]
STEP_TAGS = [f"block{k}/{name}" for k in range(3) for name in ("loss", "train_accuracy", "lr")] + ["train/lr"]
EPOCH_TAGS = [
    *(f"block{k}/{name}" for k in range(3) for name in ("epoch_loss", "epoch_train_accuracy", "test_accuracy")),
    "test/accuracy",
    "test/top5_accuracy",  # 10 classes
    "test/loss",
    "train/images_per_second",
    "memory/peak_mib",
]


def _train(args: list[str], monkeypatch) -> int:
    argv = ["locallearn", *map(str, args)]
    monkeypatch.setattr(sys, "argv", argv)  # what run.json records: the command as the shell gave it
    return main(argv[1:])


def _scalars(logdir: Path, purge: bool = True) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0}, purge_orphaned_data=purge)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tags_points_and_values_match_metrics_and_run_json_describes_the_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = [*TINY, "--tensorboard", "on", "--log-every", "1", "--out", out]
    assert _train(args, monkeypatch) == 0
    scalars = _scalars(out / "tensorboard")
    assert set(scalars) == set(STEP_TAGS) | set(EPOCH_TAGS)
    for tag in STEP_TAGS:
        assert [s for s, _ in scalars[tag]] == STEPS, tag
    for tag in EPOCH_TAGS:
        assert [s for s, _ in scalars[tag]] == EPOCH_STEPS, tag
    rows = _rows(out)
    approx = lambda values: pytest.approx(values, rel=1e-6)  # noqa: E731  (event files hold float32)
    assert [v for _, v in scalars["test/accuracy"]] == approx([r["test_accuracy"] for r in rows])
    assert [v for _, v in scalars["test/loss"]] == approx([r["test_loss"] for r in rows])
    assert [v for _, v in scalars["test/top5_accuracy"]] == approx([r["test_top5_accuracy"] for r in rows])
    for k in range(3):
        assert [v for _, v in scalars[f"block{k}/test_accuracy"]] == approx([r["block_accuracies"][k] for r in rows])
        assert [v for _, v in scalars[f"block{k}/epoch_loss"]] == approx([r[f"loss/{k}"] for r in rows])
        # the epoch's mean loss is the mean of its step losses
        steps = [v for _, v in scalars[f"block{k}/loss"]]
        assert [sum(steps[:4]) / 4, sum(steps[4:]) / 4] == pytest.approx([r[f"loss/{k}"] for r in rows], rel=1e-5)
    assert [v for _, v in scalars["train/lr"]][-1] == pytest.approx(rows[-1]["lr"], abs=1e-7)
    assert rows[-1]["block_lrs"] == [rows[-1]["lr"]] * 3  # DGL: every block steps with the run's schedule
    assert all(v > 0 for _, v in scalars["memory/peak_mib"])

    record = json.loads((out / "run.json").read_text())
    (start,) = record["starts"]
    assert start["argv"] == ["locallearn", *map(str, args)]
    assert shlex.split(start["command"]) == start["argv"]
    assert start["versions"]["torch"] == str(torch.__version__) and start["versions"]["tensorboard"]
    assert {"torchvision", "numpy", "locallearn"} <= start["versions"].keys()
    assert datetime.fromisoformat(start["started"]) <= datetime.now().astimezone()
    assert start["cwd"] and start["hostname"] and start["cpu"] and start["cpu_count"] >= 1
    assert start["torch_threads"] == torch.get_num_threads() and start["resumed_from"] is None
    assert {"git_commit", "git_dirty", "python", "platform", "cuda", "env"} <= start.keys()


def test_off_writes_no_event_files(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _train([*TINY, "--epochs", "1", "--tensorboard", "off", "--out", out], monkeypatch) == 0
    assert not (out / "tensorboard").exists()
    assert (out / "run.json").is_file() and (out / "metrics.jsonl").is_file()


def test_a_crashed_run_resumes_into_the_same_events_and_run_json(tmp_path, monkeypatch):
    """Crash after step 7 (checkpoints every 2 steps: the newest is step 6, and step 7's scalars are already written):
    the writer is closed on the way out, and the resumed run's new event file purges step 7 and writes it again."""
    out = tmp_path / "run"
    args = [*TINY, "--tensorboard", "on", "--log-every", "1", "--checkpoint-every", "2", "--out", out]
    original = tensorboard_log.TensorBoardLog.train_step

    def crash_at_7(self, learner, stats):
        original(self, learner, stats)
        if learner.step == 7:
            raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(tensorboard_log.TensorBoardLog, "train_step", crash_at_7)
        with pytest.raises(RuntimeError, match="simulated crash"):
            _train(args, patch)
    crashed = _scalars(out / "tensorboard")
    assert [s for s, _ in crashed["block0/loss"]] == STEPS[:7]  # flushed and closed by the error path
    assert _train([*args, "--resume", "auto"], monkeypatch) == 0

    scalars = _scalars(out / "tensorboard")
    for tag in STEP_TAGS:
        assert [s for s, _ in scalars[tag]] == STEPS, tag  # step 7 once: the crashed run's is purged
    for tag in EPOCH_TAGS:
        assert [s for s, _ in scalars[tag]] == EPOCH_STEPS, tag
    raw = _scalars(out / "tensorboard", purge=False)  # both files as written: step 7 is there twice
    assert [s for s, _ in raw["block0/loss"]] == [*STEPS[:7], 7, 8]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    rows = _rows(out)
    assert [v for _, v in scalars["test/accuracy"]] == pytest.approx([r["test_accuracy"] for r in rows], rel=1e-6)

    first, second = json.loads((out / "run.json").read_text())["starts"]
    assert first["resumed_from"] is None and "--resume" not in first["argv"]
    assert second["resumed_at_step"] == 6 and second["resumed_from"].endswith("step-000000006.pt")
    assert second["argv"][-2:] == ["--resume", "auto"] and second["started"] >= first["started"]


def test_on_without_the_package_is_one_clear_error_and_auto_says_how_to_get_it(tmp_path, monkeypatch, capsys, caplog):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert _train([*TINY, "--tensorboard", "on", "--out", tmp_path / "run"], monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install tensorboard" in err and "--tensorboard off" in err
    assert not (tmp_path / "run").exists()  # refused before any work
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="locallearn"):
        assert tensorboard_log.wanted("auto") is False
    assert [r.getMessage() for r in caplog.records] == [
        "tensorboard: off (the package is not installed; pip install tensorboard to get event files)"
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--log-every", "-1"], "train.log_every must be >= 0"),
        (["--train.tensorboard=maybe"], "train.tensorboard must be one of auto, on, off"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path, monkeypatch, capsys, flags, message):
    assert _train([*TINY, *flags, "--out", tmp_path / "run"], monkeypatch) == 2
    assert message in capsys.readouterr().err


def test_log_every_spacing_and_method_report_scalars(tmp_path):
    tb = tensorboard_log.TensorBoardLog(tmp_path, log_every=3)
    # a method that sets its own rates (SoftHebb's classifier phase): block 0 does not learn, block 1 at 0.002
    learner = SimpleNamespace(step=0, current_lr=lambda: 0.1, block_lrs=lambda: [1.0, 0.002], learns=lambda k: k == 1)
    for step in range(1, 8):
        learner.step = step
        tb.train_step(learner, {"loss/0": torch.tensor(float(step)), "acc/0": torch.tensor(0.5)})
    row = {"step": 7, "test_accuracy": 0.25, "block_accuracies": [None, 0.25], "images_per_second": 10.0}
    report = {"hebb1/norm_mean": 1.5, "hebb1/converged": 3, "note": "text is not a scalar"}
    tb.end_epoch(row, report, peak_bytes=2**21)
    tb.close()
    tb.close()  # twice is harmless (the runner closes on every path)
    scalars = _scalars(tmp_path)
    assert scalars["block0/loss"] == [(3, 3.0), (6, 6.0)] and [s for s, _ in scalars["train/lr"]] == [3, 6]
    assert scalars["block1/lr"] == [(3, pytest.approx(0.002)), (6, pytest.approx(0.002))]
    assert "block0/lr" not in scalars  # a block that does not learn in the phase has no rate
    assert scalars["method/hebb1/norm_mean"] == [(7, 1.5)] and scalars["method/hebb1/converged"] == [(7, 3.0)]
    assert scalars["memory/peak_mib"] == [(7, 2.0)] and scalars["block1/test_accuracy"] == [(7, 0.25)]
    assert "block0/test_accuracy" not in scalars and not any("note" in tag for tag in scalars)


def test_a_resumed_runs_event_file_sorts_after_the_files_it_purges(tmp_path):
    """TensorBoard reads event files in name order (creation second, host, pid, per-process counter): a run resumed
    in the same process within the same second could be named "…10" beside "…9" and read first, so its purge of
    the crashed steps would come before them (seen in a fresh-clone suite run)."""
    old = tmp_path / f"events.out.tfevents.{int(time.time())}.host.1.9"
    old.write_bytes(b"")
    log = tensorboard_log.TensorBoardLog(tmp_path, 1, purge_step=0)
    log.writer.close()
    names = sorted(p.name for p in tmp_path.glob("events.out.tfevents.*"))
    assert len(names) == 2 and names[0] == old.name
