"""The command line: a full train → summary → eval round trip, and one clear line for every kind of bad input."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from locallearn.cli import main

SUMMARY_KEYS = {
    "method",
    "arch",
    "dataset",
    "K",
    "epochs",
    "steps",
    "test_accuracy",
    "best_test_accuracy",
    "block_accuracies",
    "peak_memory_bytes",
    "images_per_second",
    "params_backbone",
    "params_aux",
    "wall_seconds",
    "device",
    "fingerprint",
}
TINY = [
    "--dataset",
    "synthetic",
    "--image-size",
    "16",
    "--arch",
    "resnet20",
    "--batch-size",
    "16",
    "--data.synthetic_train_size=64",
    "--data.synthetic_test_size=32",
    "--no-progress",
    "--quiet",
]


def run_cli(args, capsys):
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_writes_a_run_and_eval_reproduces_it(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["train", *TINY, "--method", "dgl", "--K", "3", "--epochs", "2", "--out", out], capsys)
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert json.loads(stdout) == summary
    assert summary["K"] == 3 and summary["steps"] == 8 and len(summary["block_accuracies"]) == 3
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["peak_memory_bytes"] > 0
    # the memory report: the process's peak, clearly named, and what the training steps themselves added
    assert summary["process_peak_memory_bytes"] >= summary["peak_memory_bytes"]
    growth = summary["train_steps_memory_growth_bytes"]
    assert growth is None or 0 <= growth < summary["peak_memory_bytes"]
    assert summary["memory_in_use_before_training_bytes"] > 0
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert "method: dgl" in (out / "config.yaml").read_text()
    code, stdout, _ = run_cli(["eval", "--checkpoint", out / "checkpoint.pt"], capsys)
    assert code == 0
    report = json.loads(stdout)
    assert report["test_accuracy"] == summary["test_accuracy"]
    assert report["block_accuracies"] == summary["block_accuracies"]
    # the final checkpoint went through the checkpoint store: a manifest beside it, and a damaged file is refused
    from locallearn.durable import verify

    manifest = json.loads((out / "checkpoint.json").read_text())
    assert verify(out / "checkpoint.json") is None and manifest["step"] == 8 and manifest["final"] is True
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped, same size
    code, _, stderr = run_cli(["eval", "--checkpoint", out / "checkpoint.pt"], capsys)
    assert code == 4 and "does not verify against checkpoint.json" in stderr and "SHA-256" in stderr


def test_a_holdout_run_says_it_evaluated_on_validation_data(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *TINY, "--method", "e2e", "--max-steps", "2", "--holdout", "16", "--out", out]
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["evaluated_on"] == "holdout of the last 16 training examples"
    assert "holdout: 16" in (out / "config.yaml").read_text()
    code, stdout, _ = run_cli(["eval", "--checkpoint", out / "checkpoint.pt"], capsys)
    assert code == 0 and json.loads(stdout)["test_accuracy"] == summary["test_accuracy"]  # the same held-out set
    code, stdout, _ = run_cli(["report", out, "-o", tmp_path / "rep"], capsys)
    assert code == 0 and "Validation, not test" in (tmp_path / "rep" / "report.md").read_text()
    assert "Validation, not test" in stdout


def test_same_seed_same_fingerprint(tmp_path, capsys):
    prints = []
    for name in ("a", "b"):
        run_cli(["train", *TINY, "--method", "e2e", "--max-steps", "3", "--out", tmp_path / name], capsys)
        prints.append(json.loads((tmp_path / name / "summary.json").read_text())["fingerprint"])
    run_cli(["train", *TINY, "--method", "e2e", "--max-steps", "3", "--seed", "1", "--out", tmp_path / "c"], capsys)
    assert prints[0] == prints[1] != json.loads((tmp_path / "c" / "summary.json").read_text())["fingerprint"]


def test_yaml_config_and_dotted_overrides(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  method: dgl\n  K: 2\noptim:\n  lr: 0.02\nmethod:\n  n_conv: 1\n")
    out = tmp_path / "run"
    code, _, err = run_cli(
        ["train", "--config", cfg, *TINY, "--max-steps", "1", "--optim.weight_decay=0.0", "--out", out], capsys
    )
    assert code == 0, err
    text = (out / "config.yaml").read_text()
    assert "lr: 0.02" in text and "weight_decay: 0.0" in text and "n_conv: 1" in text


def write_fake_fashion(root: Path, corrupt: str | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    src = Path("/usr/share/datasets/fashion-mnist")
    for name in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ):
        if name == corrupt:
            (root / name).write_bytes(gzip.compress(b"\x00\x00\x08\x03garbage"))
        elif src.exists():
            shutil.copy(src / name, root / name)


BAD_INPUTS = [  # (arguments, what the one line must say, exit status: 2 usage/config, 3 data)
    (["--arch", "resnet33"], "unknown arch 'resnet33'", 2),
    (["--method", "backprop"], "unknown method 'backprop'", 2),
    (["--dataset", "mnist-ish"], "unknown dataset 'mnist-ish'", 2),
    (["--K", "40"], "K=40 does not fit resnet20", 2),
    (["--method", "e2e", "--K", "3"], "use --K 1", 2),
    (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent/dir"], "/nonexistent/dir", 3),
    (["--dataset", "cifar10", "--data-dir", "/tmp"], "CIFAR-10 not found", 3),
    (["--optim.lr=fast"], "optim.lr should be float", 2),
    (["--train.colour=red"], "unknown config field 'train.colour'", 2),
    (["--train.epoch=3"], "did you mean train.epochs?", 2),
    (["--trian.epochs=3"], "did you mean train.epochs?", 2),
    (["--split", "man", "--K", "16", "--arch", "resnet32"], "use --K 15", 2),
    (["--config", "/nonexistent.yaml"], "config file /nonexistent.yaml not found", 2),
]


@pytest.mark.parametrize("args,message,status", BAD_INPUTS)
def test_bad_input_is_one_clear_line(args, message, status, tmp_path, capsys):
    base = [
        "train",
        "--dataset",
        "synthetic",
        "--image-size",
        "16",
        "--arch",
        "resnet20",
        "--no-progress",
        "--max-steps",
        "1",
        "--out",
        tmp_path / "run",
    ]
    code, _, err = run_cli([*base, *args], capsys)
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").exists(), reason="dataset-fashion-mnist not installed"
)
def test_corrupt_idx_file_names_the_file(tmp_path, capsys):
    root = tmp_path / "fm"
    write_fake_fashion(root, corrupt="train-images-idx3-ubyte.gz")
    code, _, err = run_cli(["train", "--data-dir", root, "--max-steps", "1", "--out", tmp_path / "run"], capsys)
    assert code == 3 and "train-images-idx3-ubyte.gz" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_an_existing_run_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("precious")
    code, _, err = run_cli(["train", *TINY, "--max-steps", "1", "--out", out], capsys)
    assert code == 2 and "--overwrite" in err
    assert (out / "summary.json").read_text() == "precious"


def test_the_console_script_exits_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "locallearn.cli", "train", "--arch", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr


def test_list_names_everything(capsys):
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0 and "resnet110" in out and "dgl" in out and "fashion-mnist" in out and "infopro" in out


def test_runs_record_the_commit_of_the_code_they_imported(tmp_path, capsys, monkeypatch):
    """A long benchmark outlives commits: the summary names the code that was loaded, not the checkout at the end."""
    from locallearn import runner

    loaded = runner.git_commit()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("git asked again after import"))
    code, stdout, _ = run_cli(
        ["train", *TINY, "--method", "dgl", "--K", "2", "--max-steps", "1", "--out", tmp_path / "r"], capsys
    )
    assert code == 0 and json.loads(stdout)["git_commit"] == loaded
