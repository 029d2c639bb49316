"""The comparison benchmark's plumbing on a tiny synthetic run (the benchmark itself is not a test)."""

import json

from locallearn.cli import main
from locallearn.compare import paper_split


def test_paper_splits_use_the_true_block_counts():
    assert paper_split("infopro+man", 16) == ("man", 15)
    assert paper_split("man++", 16) == ("man++", 16)
    assert paper_split("auglocal", 16) == ("layerwise", 14)
    assert paper_split("dgl", 16) == ("infopro", 16)
    assert paper_split("dgl", 4) == ("even", 4)


def test_compare_writes_a_table(tmp_path, capsys):
    code = main(
        [
            "compare",
            "--suite",
            "methods",
            "--K",
            "2",
            "--seeds",
            "0",
            "1",
            "--out",
            str(tmp_path),
            "--set",
            "data.name='synthetic'",
            "data.image_size=16",
            "data.synthetic_train_size=32",
            "data.synthetic_test_size=16",
            "train.batch_size=16",
            "train.max_steps=1",
            "model.arch='resnet20'",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 2 * 7  # e2e + six local methods, two seeds each
    table = (tmp_path / "table.md").read_text()
    assert table in out and "| auglocal, K=2 (even: 2 blocks) | 2 |" in table and " ± " in table


def test_parity_protocol_puts_every_method_on_the_official_settings():
    from locallearn.compare import method_rows
    from locallearn.config import RunConfig, apply_overrides, load_yaml

    rows = method_rows([4], protocol="parity")
    assert len(rows) == 7 and all(r.presets == ["parity/common"] for r in rows)
    cfg = RunConfig()
    for preset in rows[3].presets:
        load_yaml(cfg, preset)
    apply_overrides(cfg, rows[3].overrides)
    assert (cfg.data.pad_to, cfg.data.channels, cfg.data.limit_train) == (32, 3, 10000)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.step_order) == (3, 128, "after_all")
    assert cfg.train.method == "dgl+man" and cfg.optim.nesterov
