"""`locallearn exits` (issue 29 item 2): counted multiply-accumulates equal a hand count, the replayed exit rule is
EarlyExit's, and calibration reads held-out training examples, never the test set."""

import json
import math
import statistics

import pytest
import torch
from torch import nn

from locallearn import LocalLearner, create_model
from locallearn.cli import main
from locallearn.data import Batch
from locallearn.exits import choose, count_macs, head_outputs, path_costs, replay


def test_counted_macs_equal_a_hand_count():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 10))
    # conv: 2 output channels x 16 positions x (1 input channel x 3 x 3) = 288; linear: 32 x 10 = 320 (biases and
    # ReLU are not multiply-accumulates)
    assert count_macs(net, torch.rand(1, 1, 4, 4)) == 288 + 320


def test_the_replayed_rule_is_early_exits_rule_on_the_same_samples():
    torch.manual_seed(0)
    learner = LocalLearner(create_model("resnet20"), "dgl", 4, input_shape=(3, 16, 16))
    x, y = torch.rand(32, 3, 16, 16), torch.randint(0, 10, (32,))
    for _ in range(3):
        learner.train_step(x, y)
    learner.model.eval()
    learner.method.eval()
    batches = [Batch(x[:16], y[:16], x[:16]), Batch(x[16:], y[16:], x[16:])]
    conf, pred, labels = head_outputs(learner, batches)
    blocks, heads = path_costs(learner, (3, 16, 16), torch.device("cpu"))
    assert heads[-1] is None and all(h > 0 for h in heads[:-1]) and all(b > 0 for b in blocks)
    cumulative = torch.tensor(
        [sum(blocks[: e + 1]) + sum(heads[: e + 1]) for e in range(3)] + [sum(blocks) + sum(heads[:3])]
    )
    threshold = conf[0].median().item()
    got = replay(conf, pred, labels, cumulative, threshold)
    logits, exits = learner.early_exit(threshold)(x)
    assert got["accuracy"] == (logits.argmax(1) == y).float().mean().item()
    assert got["exit_shares"] == torch.bincount(exits, minlength=4).div(32).tolist()
    assert got["macs_per_image"] == cumulative[exits].float().mean().item()
    assert 0 < got["exit_shares"][0] < 1  # some left at the first head
    full_right = (pred[-1] == labels).float()  # the network's own classifier, on the same samples
    assert got["drop"] == pytest.approx(full_right.mean().item() - got["accuracy"])


def test_the_threshold_is_chosen_on_a_confidence_bound_of_the_paired_drop():
    """Issue 29: the cheapest τ whose held-out drop merely fits sits at the edge and lands beyond it half the time.
    400 samples, two exits: at τ = 0.5 every sample leaves at the head, which is right where the network is except on
    12 samples it gets wrong and 8 it gets right instead: drop (12 − 8) / 400 = 1 point, sd of the differences
    √(20/400 − 0.01²)·√(400/399), so the one-sided 95 % bound is 1 + 1.645 · 100 · sd / 20 ≈ 2.84 points."""
    n = 400
    labels = torch.zeros(n, dtype=torch.long)
    net = torch.zeros(n, dtype=torch.long)
    head = net.clone()
    net[:8], head[8:20] = 1, 1  # the network wrong on 8 the head gets right; the head wrong on 12 more
    pred, conf = torch.stack([head, net]), torch.ones(2, n)
    macs = torch.tensor([10, 100])
    sure = replay(conf, pred, labels, macs, 0.5, z=statistics.NormalDist().inv_cdf(0.95))
    sd = math.sqrt((20 / n - 0.01**2) * n / (n - 1))
    assert sure["drop"] == pytest.approx(0.01) and sure["answered_differently"] == pytest.approx(20 / n)
    assert sure["drop_bound"] == pytest.approx(0.01 + 1.6448536 * sd / 20)
    never = replay(conf, pred, labels, macs, 1.01, z=1.6448536)
    assert never["drop"] == never["drop_bound"] == 0 and never["macs_per_image"] == 100
    assert choose([sure, never], max_drop=2.0) is never  # 1 point lost, but 2.84 not ruled out
    assert choose([sure, never], max_drop=3.0) is sure
    assert choose([replay(conf, pred, labels, macs, 0.5), never], max_drop=1.0)["threshold"] == 0.5  # z = 0


def test_calibration_reads_held_out_training_examples_and_writes_exits_json(tmp_path, capsys):
    out = tmp_path / "run"
    train = ["train", "--dataset", "synthetic", "--image-size", "16", "--arch", "resnet20", "--method", "dgl",
             "--K", "3", "--batch-size", "16", "--max-steps", "4", "--device", "cpu", "--no-progress", "--quiet",
             "--data.synthetic_train_size=96", "--data.synthetic_test_size=40", "--holdout", "32",
             "--tensorboard", "off", "--out", str(out)]  # fmt: skip
    assert main(train) == 0
    capsys.readouterr()
    calibrate = ["exits", "--checkpoint", str(out / "checkpoint.pt"), "--max-drop", "100", "--latency-seconds", "0.05"]
    assert main(calibrate) == 0  # on the run's holdout
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "exits.json").read_text())
    # the last 32 of the 96 training examples; the run trained on the first 64 only
    assert report["holdout_indices"] == [64, 96] and report["holdout_trained_on"] is False
    assert report["examples"] == {"holdout": 32, "test": 40}  # the test set itself (40 images), read once
    chosen = report["chosen"]
    assert chosen["threshold"] == min(r["threshold"] for r in report["curve_holdout"])  # any drop allowed: cheapest
    assert report["full_network"]["macs_per_image"] == sum(report["block_macs"])
    assert set(report["cpu_latency_ms"]) == {"batch_1", "batch_256"}
    other = tmp_path / "no-holdout"  # a run without --holdout: calibration needs --holdout N
    plain = [a for a in train if a not in ("--holdout", "32", str(out))] + [str(other)]  # "--out" stays last
    assert main(plain) == 0
    capsys.readouterr()
    assert main(["exits", "--checkpoint", str(other / "checkpoint.pt")]) == 2
    assert "never the test set" in capsys.readouterr().err
    assert main(["report", str(out), "-o", str(tmp_path / "report")]) == 0  # the curve, drawn by locallearn report
    assert (tmp_path / "report" / "accuracy_vs_compute.png").stat().st_size > 1000
    assert f"threshold {chosen['threshold']} (chosen on 32 held-out" in (tmp_path / "report" / "report.md").read_text()
