"""``locallearn report``: real PNGs and a table from run directories; configurations grouped over seeds and labelled
by what differs; MAN's share of the gap to E2E computed from the runs."""

import json
import struct
from pathlib import Path

import pytest
import yaml

from locallearn.cli import main
from locallearn.config import RunConfig
from locallearn.report import PLOT_DPI, PLOT_SIZE, PLOTS, find_runs, gap_closed, group_runs, load_run, table

TINY = ["--dataset", "synthetic", "--image-size", "16", "--arch", "resnet20", "--batch-size", "16", "--epochs", "2",
        "--device", "cpu", "--no-progress", "--data.synthetic_train_size=64",
        "--data.synthetic_test_size=32"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Real runs: E2E, and DGL at K=2 over two seeds."""
    root = tmp_path_factory.mktemp("runs")
    for name, extra in {
        "e2e": ["--method", "e2e", "--K", "1"],
        "dgl-s0": ["--method", "dgl", "--K", "2"],
        "dgl-s1": ["--method", "dgl", "--K", "2", "--seed", "1"],
    }.items():
        assert main(["train", *TINY, *extra, "--out", str(root / name)]) == 0
    return root


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_the_report_renders_pngs_and_a_table_from_real_runs(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(runs), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    text = (out / "report.md").read_text()
    for name in PLOTS:
        width, height = _png_size(out / name)
        assert (width, height) == (PLOT_SIZE[0] * PLOT_DPI, PLOT_SIZE[1] * PLOT_DPI)
        assert (out / name).stat().st_size > 10_000  # drawn, not blank
        assert f"]({name})" in text
    # grouped over seeds, labelled by what differs between the configurations
    assert "| e2e, K=1 | 1 | 1 |" in text and "| dgl, K=2 | 2 | 2 |" in text
    assert "| dgl, K=2 | 2 | 2 |" in printed  # the table, readable in a terminal
    assert "3 runs in 2 configurations" in text and "synthetic on resnet20" in text
    summaries = [json.loads((runs / n / "summary.json").read_text())["test_accuracy"] for n in ("dgl-s0", "dgl-s1")]
    per_seed = " / ".join(f"{100 * a:.2f}" for a in summaries)
    assert f"| {per_seed} |" in text


def test_bad_run_directories_are_refused_in_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere"), "-o", str(tmp_path / "r")]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "-o", str(tmp_path / "r")]) == 2
    assert "no finished run" in capsys.readouterr().err
    assert not (tmp_path / "r" / "report.md").exists()


def _fake_run(
    root: Path, name: str, method: str, k: int, seed: int, acc: float, steps_mib: int | None = None, **extra
) -> None:
    """A run directory as ``locallearn train`` leaves it, with a chosen final accuracy."""
    run = root / name
    run.mkdir(parents=True)
    cfg = RunConfig()
    cfg.train.method, cfg.train.K, cfg.train.seed, cfg.train.out = method, k, seed, str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    history = [{"epoch": 1, "test_accuracy": acc - 0.1, "block_accuracies": [None] * k},
               {"epoch": 2, "test_accuracy": acc, "block_accuracies": [acc - 0.05] * (k - 1) + [acc]}]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    summary = {"method": method, "K": k, "seed": seed, "test_accuracy": acc, "best_test_accuracy": acc,
               "block_accuracies": history[-1]["block_accuracies"], "peak_memory_bytes": 2**20 * (100 + 10 * k),
               "peak_memory_kind": "cpu_peak_rss", "images_per_second": 100.0, "wall_seconds": 60.0}  # fmt: skip
    if steps_mib is not None:
        summary["train_steps_memory_growth_bytes"] = 2**20 * steps_mib
    summary.update(extra)
    (run / "summary.json").write_text(json.dumps(summary))


def test_man_s_share_of_the_gap_is_computed_per_seed_and_on_the_means(tmp_path):
    for seed, (e2e, dgl, man) in enumerate([(0.90, 0.80, 0.85), (0.92, 0.82, 0.88)]):
        _fake_run(tmp_path, f"e2e-{seed}", "e2e", 1, seed, e2e)
        _fake_run(tmp_path, f"dgl-{seed}", "dgl", 4, seed, dgl)
        _fake_run(tmp_path, f"man-{seed}", "dgl+man", 4, seed, man)
    _fake_run(tmp_path, "infopro-0", "infopro", 4, 0, 0.8)  # no infopro+man: no line for it
    groups = group_runs([load_run(p) for p in find_runs([tmp_path])])
    assert [g.label for g in groups] == ["dgl, K=4", "e2e, K=1", "infopro, K=4", "dgl+man, K=4"]  # directory order
    lines = gap_closed(groups)
    assert len(lines) == 1
    assert "**dgl+man, K=4** closes 55 % of **dgl, K=4**'s gap to **e2e, K=1**" in lines[0]
    assert "per seed: 50 %, 60 %" in lines[0]


def test_the_table_gives_the_training_steps_memory_beside_the_process_peak(tmp_path):
    _fake_run(tmp_path, "e2e-0", "e2e", 1, 0, 0.9, steps_mib=370)
    _fake_run(tmp_path, "dgl-0", "dgl", 4, 0, 0.8, steps_mib=230)
    _fake_run(tmp_path, "dgl-1", "dgl", 4, 1, 0.8, steps_mib=250)
    rows = {
        line.split(" | ")[0]: line.split(" | ")
        for line in table(group_runs([load_run(p) for p in find_runs([tmp_path])])).splitlines()
    }
    assert rows["| e2e, K=1"][6:8] == ["110", "370"]  # process peak, training steps (MiB)
    assert rows["| dgl, K=4"][6:8] == ["140", "250"]  # the largest over seeds
    _fake_run(tmp_path, "old-0", "infopro", 4, 0, 0.8)  # a run from before the measurement: a dash, not a zero
    rows = {
        line.split(" | ")[0]: line.split(" | ")
        for line in table(group_runs([load_run(p) for p in find_runs([tmp_path])])).splitlines()
    }
    assert rows["| infopro, K=4"][7] == "–"


def test_a_sweep_s_runs_come_in_its_grid_s_order_not_alphabetically(tmp_path):
    names = ["e2e-s0", "dgl-s0", "dgl+man-s0"]  # the grid's order; alphabetically dgl+man would come first
    for name, method, k in zip(names, ["e2e", "dgl", "dgl+man"], [1, 4, 4]):
        _fake_run(tmp_path / "runs", name, method, k, 0, 0.8)
    trials = [{"name": n, "label": n, "seed": 0} for n in names]
    (tmp_path / "grid.json").write_text(json.dumps({"source": "g.yaml", "trials": trials}))
    assert [p.name for p in find_runs([tmp_path])] == names
    (tmp_path / "grid.json").write_text("not json")  # unreadable: by path, never an error
    assert [p.name for p in find_runs([tmp_path])] == sorted(names)


def test_the_table_has_a_top5_column_for_imagenet_runs_only(tmp_path):
    _fake_run(tmp_path / "fm", "dgl-0", "dgl", 4, 0, 0.8, dataset="fashion-mnist", test_top5_accuracy=0.99)
    assert "top-5" not in table(group_runs([load_run(p) for p in find_runs([tmp_path / "fm"])]))
    for seed, top5 in enumerate([0.90, 0.92]):
        _fake_run(tmp_path / "in", f"dgl-{seed}", "dgl", 4, seed, 0.7, dataset="imagenet", test_top5_accuracy=top5)
    header, rule, row = table(group_runs([load_run(p) for p in find_runs([tmp_path / "in"])])).splitlines()
    cells = header.split(" | ")
    assert cells[5] == "top-5 %" and row.split(" | ")[5] == "91.00 ± 1.41" and rule.count("|") == header.count("|")
