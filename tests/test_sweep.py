"""``locallearn sweep``: grid files are parsed strictly, expanded into the runs they describe, and a sweep killed
part-way resumes without redoing finished runs and ends on the same results and table as an uninterrupted one."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from locallearn.cli import main
from locallearn.errors import UserError
from locallearn.sweep import expand, parse_grid

TINY = {
    "data.name": "synthetic",
    "data.image_size": 16,
    "data.synthetic_train_size": 128,
    "data.synthetic_test_size": 32,
    "model.arch": "resnet20",
    "train.batch_size": 16,
    "train.epochs": 2,
    "train.device": "cpu",
}


def test_the_issue_grid_expands_to_five_configurations_over_two_seeds():
    grid = parse_grid(
        {
            "set": {"data": {"limit_train": 500}, "train.epochs": 1},  # nested and dotted alike
            "grid": {"train.method": ["e2e", "dgl", "dgl+man"], "train.K": [1, 4]},
            "exclude": [{"train.method": "e2e", "train.K": 4}],
            "seeds": [0, 1],
        },
        "grid.yaml",
    )
    trials = expand(grid)
    labels = list(dict.fromkeys(t.label for t in trials))
    assert labels == ["e2e, K=1", "dgl, K=1", "dgl, K=4", "dgl+man, K=1", "dgl+man, K=4"]
    assert [t.seed for t in trials] == [0, 1] * 5
    assert all(t.cfg.data.limit_train == 500 and t.cfg.train.epochs == 1 for t in trials)
    assert trials[4].cfg.train.method == "dgl" and trials[4].cfg.train.K == 4 and trials[4].name == "dgl-K=4-s0"


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"grid": {"train.K": [1]}, "sede": [0]}, "unknown key"),
        ({"grid": {"train.K": []}}, "non-empty list"),
        ({"grid": {"train.K": [1, 2]}, "exclude": [{"train.method": "e2e"}]}, "does not vary"),
        ({"grid": {"train.K": [1]}, "exclude": [{"train.K": 1}]}, "leaves no configuration"),
        ({"seeds": [0, 0]}, "repeat"),
        ({"seeds": ["a"]}, "non-negative integers"),
        ({"set": {"train.epoks": 2}}, "train.epoks"),
        ({"set": {"train.seed": 2}}, "seeds: "),
        ({"runs": [{"name": "a"}, {"name": "a"}]}, "share a name"),
        ({"runs": [{"name": "a", "sett": {}}]}, "unknown key"),
    ],
)
def test_a_bad_grid_is_refused_with_the_file_and_key_named(tree, message):
    with pytest.raises(UserError, match=message) as info:
        expand(parse_grid(tree, "my-grid.yaml"))
    assert "my-grid.yaml" in str(info.value) or "train.epoks" in str(info.value)


def test_a_missing_grid_file_is_one_line(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "grid file" in capsys.readouterr().err


def _sweep(grid: Path, out: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # results do not depend on the load beside the test
    return subprocess.Popen(
        [sys.executable, "-m", "locallearn", "sweep", str(grid), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def _accuracy_table(report: str) -> list[str]:
    """The report's table without the columns that measure the machine (memory, img/s, wall time)."""
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    return ["|".join(row.split("|")[:7]) for row in rows]


def test_a_killed_sweep_resumes_without_redoing_finished_runs_and_ends_on_the_same_table(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "set": {**TINY, "train.checkpoint_every": 2},
                "runs": [
                    {"name": "e2e", "set": {"train.method": "e2e", "train.K": 1}},
                    {"name": "dgl+man", "set": {"train.method": "dgl+man", "train.K": 2}},
                ],
                "seeds": [0],
            }
        )
    )
    whole = _sweep(grid, tmp_path / "whole")
    cut = tmp_path / "cut"
    killed = _sweep(grid, cut, start_new_session=True)
    second = cut / "runs" / "dgl+man-s0" / "checkpoints"
    deadline = time.monotonic() + 240
    while killed.poll() is None and time.monotonic() < deadline:
        if second.is_dir() and any(second.glob("step-*.json")):
            break
        time.sleep(0.05)
    assert killed.poll() is None, killed.stderr.read()[-2000:]
    os.killpg(killed.pid, signal.SIGKILL)  # the sweep and its run, as a scheduler or the OOM killer would
    killed.wait()
    first = cut / "runs" / "e2e-s0" / "summary.json"
    assert first.is_file() and not (second.parent / "summary.json").exists()
    first_before = first.stat().st_mtime_ns

    resumed = _sweep(grid, cut)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "2 runs, 1 finished already, 1 to run" in err
    assert first.stat().st_mtime_ns == first_before  # the finished run was not redone
    log = (cut / "logs" / "dgl+man-s0.log").read_text()
    assert re.search(r"resume: taking .*step-\d+\.pt", log), log[-2000:]

    _, whole_err = whole.communicate(timeout=300)
    assert whole.returncode == 0, whole_err[-3000:]
    results = {r["run"]: r for r in json.loads((cut / "results.json").read_text())}
    reference = {r["run"]: r for r in json.loads((tmp_path / "whole" / "results.json").read_text())}
    assert results.keys() == reference.keys() == {"e2e-s0", "dgl+man-s0"}
    for name in results:
        assert results[name]["fingerprint"] == reference[name]["fingerprint"]
        assert results[name]["test_accuracy"] == reference[name]["test_accuracy"]
    assert results["dgl+man-s0"]["resumed_from"] is not None
    table, reference_table = (_accuracy_table((d / "report.md").read_text()) for d in (cut, tmp_path / "whole"))
    assert len(table) == 3 and table == reference_table  # the header and two configurations
    assert "| dgl+man | 2 | 1 |" in "\n".join(table)  # labelled by the sweep's run names
    assert "report.md" in out

    # a second sweep over the finished --out trains nothing and says so
    again = _sweep(grid, cut)
    _, again_err = again.communicate(timeout=120)
    assert again.returncode == 0 and "2 finished already, 0 to run" in again_err


def test_a_run_directory_of_another_configuration_is_never_overwritten(tmp_path):
    from locallearn.sweep import Grid, sweep

    grid = Grid(set={**TINY, "train.max_steps": 1, "train.epochs": 1}, seeds=[0], source="g")
    trials = expand(grid)
    run_dir = tmp_path / "runs" / trials[0].name
    run_dir.mkdir(parents=True)
    cfg = trials[0].cfg.to_dict()
    cfg["optim"]["lr"] = 123.0  # the grid changed since this run was made
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="different configuration"):
        sweep(grid, tmp_path)
    assert (run_dir / "summary.json").read_text() == "{}"


def test_every_packaged_grid_expands_into_valid_runs():
    from locallearn.sweep import grid_names, load_grid

    assert "fashion_mnist_methods" in grid_names()
    for name in grid_names():
        trials = expand(load_grid(name))
        assert trials and len({t.name for t in trials}) == len(trials)
    assert len(expand(load_grid("fashion_mnist_methods"))) == 10  # (e2e + dgl × 2 K + dgl+man × 2 K) × 2 seeds


def test_method_options_are_replaced_by_a_mapping_and_set_one_by_one_when_dotted():
    grid = parse_grid(
        {
            "base": ["softhebb/fashion_mnist_cpu"],
            "runs": [
                {"name": "hebb", "set": {"method.hebbian": "off"}},
                {"name": "bp", "set": {"train.method": "e2e", "method": {}}},
            ],
        },
        "g.yaml",
    )
    hebb, bp = expand(grid)
    assert hebb.cfg.method["hebbian"] == "off" and hebb.cfg.method["hebbian_batch_size"] == 10  # the base's kept
    assert bp.cfg.method == {} and bp.cfg.train.method == "e2e"


def test_without_seeds_each_configuration_keeps_its_own_seed():
    runs = [{"name": "auglocal", "base": ["auglocal/cifar10_resnet32_k16_d1"]}, {"name": "plain"}]
    own = expand(parse_grid({"runs": runs}, "g.yaml"))
    assert [(t.label, t.seed, t.cfg.train.seed) for t in own] == [("auglocal", 1234, 1234), ("plain", 0, 0)]
    assert [t.name for t in own] == ["auglocal-s1234", "plain-s0"]
    given = expand(parse_grid({"runs": runs, "seeds": [3]}, "g.yaml"))
    assert [t.cfg.train.seed for t in given] == [3, 3]  # the grid's seeds replace every configuration's own
