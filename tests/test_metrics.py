"""Memory measurement on CPU: a window's growth leaves out what was resident before it opened, and a run's windows
leave the kernel's peak mark to the tools outside it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MiB = 2**20


@pytest.fixture(scope="module")
def scenarios() -> dict:
    """tests/memory_windows.py's scenarios, measured in a fresh process (a test worker's resident set is not one)."""
    proc = subprocess.run([sys.executable, "-m", "tests.memory_windows"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ran(result: dict) -> dict:
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


def test_cpu_window_subtracts_its_baseline(scenarios):
    r = _ran(scenarios["baseline"])  # 96 MiB resident before the window, 4 MiB in it, then 128 MiB in another
    assert r["peak"] >= r["rss"] - 8 * MiB and r["peak"] > 96 * MiB
    assert r["growth_small"] < 48 * MiB, r["growth_small"] / MiB
    assert r["growth_more"] > 100 * MiB, r["growth_more"] / MiB


def test_a_training_window_never_lowers_the_kernels_peak_mark_and_samples_below_it(scenarios):
    """Issue 30: /usr/bin/time, getrusage and schedulers read the kernel's peak mark at exit, so a run's windows
    must not reset it. A window below an earlier peak (160 MiB) reports what its sampling thread saw (64 MiB)."""
    r = _ran(scenarios["sampled"])
    assert r["mark_after"] >= r["mark"]  # nothing was reset
    assert not r["exact"] and r["samples"] >= 5
    assert 56 * MiB < r["growth"] < 160 * MiB, r["growth"] / MiB  # the 64 MiB (RSS moves a little besides)
    assert r["peak"] < r["mark"]


def test_a_window_that_raises_the_peak_mark_reports_it_exactly(scenarios):
    r = _ran(scenarios["raises_mark"])
    assert r["exact"] and r["peak"] == r["mark"]  # the new mark is the window's own peak
    assert r["growth"] >= r["need"] - 8 * MiB


def test_usr_bin_time_sees_at_least_the_peak_a_cli_run_reports(tmp_path):
    """Issue 30: the maximum resident set the kernel reports when the run exits (what ``/usr/bin/time``, ``getrusage``
    and a scheduler show; read here with ``os.wait4``) is at least the run's own ``process_peak_memory_bytes``. The
    training steps are the run's largest allocation (E2E at batch 256: about 0.55 GiB over the rest); with windows
    that reset the mark, the kernel reported 1.18 GB for a run whose summary said 1.43 GB (measured when written)."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "locallearn", "train", "--dataset", "synthetic", "--image-size", "32",
            "--arch", "resnet20", "--method", "e2e", "--K", "1", "--batch-size", "256", "--max-steps", "1",
            "--device", "cpu", "--no-progress", "--tensorboard", "off", "--data.synthetic_train_size=256",
            "--data.synthetic_test_size=32", "--out", str(out)]  # fmt: skip
    with open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # reaps the child: its rusage, as /usr/bin/time gets it
        err.seek(0)
        assert os.waitstatus_to_exitcode(status) == 0, err.read()[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert usage.ru_maxrss * 1024 >= summary["process_peak_memory_bytes"] >= summary["train_steps_peak_memory_bytes"]
    assert summary["train_steps_memory_growth_bytes"] > 256 * MiB  # the steps' own growth is still measured
