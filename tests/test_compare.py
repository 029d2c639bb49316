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
            "--rows",
            "E2E",
            "auglocal",
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
    assert len(results) == 2 * 2  # e2e and auglocal (one of six local methods), two seeds each
    assert [r["seed"] for r in results] == [0, 1, 0, 1] and {r["method"] for r in results} == {"e2e", "auglocal"}
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


def test_gap_recovered_is_the_share_of_the_base_methods_gap_that_man_closes():
    from locallearn.compare import gap_recovered

    def run(row, method, seed, acc):
        return {"row": row, "method": method, "seed": seed, "test_accuracy": acc}

    results = [
        run("E2E", "e2e", 0, 0.90),
        run("E2E", "e2e", 1, 0.92),
        run("dgl, K=16 (infopro: 16 blocks)", "dgl", 0, 0.80),
        run("dgl, K=16 (infopro: 16 blocks)", "dgl", 1, 0.82),
        run("dgl+man, K=16 (man: 15 blocks)", "dgl+man", 0, 0.85),
        run("dgl+man, K=16 (man: 15 blocks)", "dgl+man", 1, 0.88),
        run("infopro, K=16 (infopro: 16 blocks)", "infopro", 0, 0.80),  # no infopro+man row: no line
        run("dgl+man, K=4 (even: 4 blocks)", "dgl+man", 0, 0.85),  # no dgl row at K=4: no line
    ]
    assert gap_recovered(results) == [
        "- K=16: dgl+man closes 55 % of dgl's gap to E2E on the means of seeds [0, 1] (per seed: 50 %, 60 %)."
    ]


def _e2e_only(tmp_path, seed):
    out = tmp_path / f"s{seed}"
    argv = ["compare", "--suite", "methods", "--K", "2", "--rows", "E2E", "--seeds", str(seed), "--out", str(out)]
    argv += ["--set", "data.name='synthetic'", "data.image_size=16", "data.synthetic_train_size=32"]
    argv += ["data.synthetic_test_size=16", "train.batch_size=16", "train.max_steps=1", "model.arch='resnet20'"]
    assert main(argv) == 0
    return out


def test_merge_pools_seeds_run_apart_and_rejects_bad_input(tmp_path, capsys):
    s0, s1 = _e2e_only(tmp_path, 0), _e2e_only(tmp_path, 1)
    before = (s0 / "results.json").read_text()
    capsys.readouterr()
    assert main(["compare", "--merge", str(s0), str(s1), "--out", str(tmp_path / "merged")]) == 0
    table = (tmp_path / "merged" / "table.md").read_text()
    assert "| E2E | 1 | " in table and " ± " in table and f"`{s1}`: `locallearn compare" in table
    assert len(json.loads((tmp_path / "merged" / "results.json").read_text())) == 2
    assert (s0 / "results.json").read_text() == before  # sources are only read
    assert main(["compare", "--merge", str(tmp_path / "merged"), "--out", str(tmp_path / "again")]) == 0
    merged_command = f"locallearn compare --merge {s0} {s1} --out {tmp_path / 'merged'}"
    assert f"- `{tmp_path / 'merged'}`: `{merged_command}`\n" in (tmp_path / "again" / "table.md").read_text()

    assert main(["compare", "--merge", str(s0), str(s0), "--out", str(tmp_path / "twice")]) == 2
    assert "same row and seed" in capsys.readouterr().err
    assert main(["compare", "--merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m2")]) == 2
    assert "no results.json" in capsys.readouterr().err
    (s1 / "results.json").write_text('[{"row": "E2E"')  # a run cut off mid-write
    assert main(["compare", "--merge", str(s0), str(s1), "--out", str(tmp_path / "merged")]) == 2
    assert "not JSON" in capsys.readouterr().err
    assert "| E2E | 1 | " in (tmp_path / "merged" / "table.md").read_text()  # the earlier merge is untouched
