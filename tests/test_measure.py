"""Measured memory beside the estimate: the measurement's baseline, the bench's fresh-process rows, the run summary's
training-step figures, evaluation batches, the automatic choice of auxiliary nets, and reconstruction targets."""

import json

import pytest
import torch

from locallearn import LocalLearner, create_model
from locallearn.bench import BenchConfig, markdown, run_bench
from locallearn.data import DataConfig, build_data, default_eval_batch_size
from locallearn.errors import UserError
from locallearn.heads import Decoder, UpsamplingDecoder
from locallearn.measure import Measurement, estimated_step_bytes, measure_in_subprocess, measure_steps
from locallearn.methods import any_model_methods
from locallearn.metrics import MemoryWindow

MiB = 2**20
CPU = torch.device("cpu")


def _needs_resettable_peak():
    if not MemoryWindow(CPU, reset=True).exact:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")


def _warmup_then_two_steps() -> Measurement:
    """The measured row: a warm-up that keeps 160 MiB (like optimizer state) and frees 160 MiB at once (garbage), then
    two steps of 64 MiB each at their peak, freed again."""
    kept = []

    def warmup_then_step():
        if not kept:
            kept.append(torch.ones(160 * MiB // 4))
            torch.ones(160 * MiB // 4).sum()
            return
        torch.ones(64 * MiB // 4).sum()

    return measure_steps(warmup_then_step, CPU, steps=2, warmup=1, images_per_step=8, timed=True)


def test_measured_steps_count_what_the_steps_allocate_and_not_what_came_before():
    """The warm-up's garbage is handed back and what exists before the steps is the baseline, not the growth.

    Measured as the bench measures a row, in a process of its own: the peak mark is the process's, and a test worker
    carries other tests' threads and heap (in CI's worker the growth once read 128 MiB, two steps' worth)."""
    _needs_resettable_peak()
    m = measure_in_subprocess(_warmup_then_two_steps, timeout=120)
    assert 56 * MiB < m.growth_bytes < 112 * MiB, m.growth_bytes / MiB
    assert m.baseline_bytes > 160 * MiB and m.peak_bytes >= m.baseline_bytes + m.growth_bytes - 8 * MiB
    assert m.images_per_second > 0 and m.reserved_bytes is None and m.steps == 2


def test_estimated_step_bytes_leaves_out_what_exists_before_a_step():
    parts = {"Parameter": 10, "Buffer": 1, "Optstate": 10, "Gradient": 5, "Activation": 70, "Temp": 4}
    assert estimated_step_bytes(100, parts) == 79


def test_bench_without_measuring_starts_no_process_and_leaves_the_measured_columns_empty(monkeypatch):
    # the measured rows themselves (every row in a fresh process): tests/test_memory.py's bench run through the CLI
    import locallearn.measure as measure

    monkeypatch.setattr(measure, "measure_in_subprocess", lambda *a, **k: pytest.fail("a row was measured"))
    cfg = BenchConfig(
        arch="resnet20",
        image_size=16,
        batch_size=64,
        method="dgl",
        ks=[2],
        splits=["even"],
        measure=False,
        time_steps=0,
    )
    rows = run_bench(cfg, log=lambda line: None)
    assert [r.label for r in rows] == ["E2E", "E2E + checkpointing per stage", "dgl K=2 even"]
    assert all(r.measured_growth_bytes is None and r.images_per_second is None for r in rows)
    assert all(0 < r.estimated_step_bytes < r.estimated_peak_bytes for r in rows)
    text = markdown(cfg, rows, "test machine", "locallearn bench ...")
    assert "| E2E | 1 | [] |" in text


def test_a_failed_measurement_is_reported_and_the_other_rows_kept(monkeypatch):
    import locallearn.measure as measure

    def fail(*args, **kwargs):
        raise RuntimeError("measuring e2e [] failed (exit status -9): killed")

    monkeypatch.setattr(measure, "measure_in_subprocess", fail)
    lines = []
    cfg = BenchConfig(arch="resnet20", image_size=16, batch_size=4, method="dgl", ks=[2], splits=["even"])
    rows = run_bench(cfg, log=lines.append)
    assert len(rows) == 3 and all(r.measured_growth_bytes is None for r in rows)
    assert any("not measured" in line and "exit status -9" in line for line in lines)


def test_the_run_summary_reports_the_training_steps_apart(tmp_path):
    from locallearn.cli import main

    out = tmp_path / "run"
    code = main(
        ["train", "--dataset", "synthetic", "--image-size", "16", "--arch", "resnet20", "--method", "dgl", "--K", "2",
         "--batch-size", "32", "--max-steps", "2", "--epochs", "1", "--out", str(out), "--device", "cpu",
         "--data.synthetic_train_size=64", "--data.synthetic_test_size=64"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("process_peak_memory_bytes", "train_steps_memory_growth_bytes", "eval_memory_growth_bytes"):
        assert key in summary
    assert summary["process_peak_memory_bytes"] >= summary["train_steps_peak_memory_bytes"] > 0
    assert summary["process_peak_memory_bytes"] >= summary["memory_in_use_before_training_bytes"]


def test_evaluation_batches_hold_no_more_images_than_training_at_large_sizes():
    assert default_eval_batch_size(32, (3, 224, 224)) == 32
    assert default_eval_batch_size(128, (1, 28, 28)) == 1000
    assert default_eval_batch_size(128, (3, 96, 96)) == 128 and default_eval_batch_size(16, (3, 96, 96)) == 111
    cfg = DataConfig(name="synthetic", image_size=112, synthetic_train_size=64, synthetic_test_size=200)
    _, test, _ = build_data(cfg, batch_size=16)
    assert test.batch_size == 81  # 1000 · 3·32·32 // (3·112·112)
    _, test, _ = build_data(cfg, batch_size=16, eval_batch_size=50)
    assert test.batch_size == 50


def test_synthetic_data_is_a_pure_function_of_the_seed_and_made_in_chunks():
    from locallearn.data import load_arrays
    from locallearn.data.datasets import SYNTHETIC_CHUNK

    cfg = DataConfig(name="synthetic", image_size=24, synthetic_train_size=3 * SYNTHETIC_CHUNK + 5)
    a, b = load_arrays(cfg), load_arrays(cfg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].dtype == torch.uint8
    chunks = a[0].float().flatten(1)[: 3 * SYNTHETIC_CHUNK].view(3, SYNTHETIC_CHUNK, -1)
    assert not torch.equal(chunks[0], chunks[1])  # each chunk draws its own noise
    means = torch.stack([a[0][a[1] == c].float().mean(0) for c in range(2)])
    assert (means[0] - means[1]).abs().mean() > 1  # the class patterns survive the chunking


def _infopro_nets(size, **options):
    model = create_model("resnet18", num_classes=10)
    learner = LocalLearner(model, "infopro+man", 2, input_shape=(3, size, size), method_options=options)
    return learner.method


def test_infopro_picks_imagenet_auxiliary_nets_for_large_inputs_and_says_so():
    large = _infopro_nets(128)
    assert large.head_kind == "bottleneck" and isinstance(large.decoders[0], UpsamplingDecoder)
    assert "ImageNet" in large.aux_summary and "128×128" in large.aux_summary
    small = _infopro_nets(64)
    assert small.head_kind == "1c2f" and isinstance(small.decoders[0], Decoder)
    assert "CIFAR" in small.aux_summary
    chosen = _infopro_nets(128, head="2c2f", decoder="infopro")  # the user's choice wins
    assert chosen.head_kind == "2c2f" and isinstance(chosen.decoders[0], Decoder)
    assert "as configured" in chosen.aux_summary


@pytest.mark.parametrize("method", any_model_methods())
def test_every_method_trains_on_normalised_plain_tensors(method):
    torch.manual_seed(0)
    x = (torch.rand(4, 3, 16, 16) - 0.5) / 0.25  # values outside [0, 1], as a normalising loader gives
    learner = LocalLearner(create_model("resnet20"), method, 1 if method == "e2e" else 3)
    stats = learner.train_step(x, torch.tensor([0, 1, 2, 3]))
    assert stats and all(torch.isfinite(v) for v in stats.values())


def test_a_reconstruction_target_is_used_and_checked():
    torch.manual_seed(0)
    x, y = (torch.rand(4, 3, 16, 16) - 0.5) / 0.25, torch.tensor([0, 1, 2, 3])
    target = torch.rand(4, 3, 16, 16)

    def first_loss(**kwargs):
        torch.manual_seed(1)
        learner = LocalLearner(create_model("resnet20"), "infopro", 3, input_shape=(3, 16, 16))
        return learner.train_step(x, y, **kwargs)["loss/0"]

    assert first_loss(target=target) != first_loss()  # the decoder rebuilds the target, not x
    learner = LocalLearner(create_model("resnet20"), "infopro", 3)
    with pytest.raises(UserError, match=r"outside \[0, 1\]"):
        learner.train_step(x, y, target=x)
    with pytest.raises(UserError, match="inputs' shape"):
        learner.train_step(x, y, target=target[:, :1])


def test_the_allocator_knob_is_checked_and_takes_effect_in_its_own_process():
    import subprocess
    import sys

    from locallearn.allocator import set_mmap_threshold

    with pytest.raises(UserError, match="outside 0"):
        set_mmap_threshold(64 * MiB)  # checked before anything changes (this process keeps glibc's defaults)
    # In a child, so the suite's own allocator is left alone: with a fixed 256 KiB threshold, 16 MiB tensors come
    # from mmap and leave the resident set when freed.
    script = (
        "import sys, torch; from locallearn.allocator import set_mmap_threshold; from locallearn.metrics import "
        "memory_in_use\n"
        "ok = set_mmap_threshold(256 * 1024) if sys.argv[1] == 'fixed' else True\n"
        "cpu = torch.device('cpu'); xs = [torch.ones(4 * 2**20) for _ in range(8)]; del xs\n"
        "before = memory_in_use(cpu); xs = [torch.ones(4 * 2**20) for _ in range(8)]; del xs\n"
        "print(ok, (memory_in_use(cpu) - before) // 2**20)"
    )
    results = {}
    for mode in ("fixed",):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        ok, kept = out.stdout.split()
        results[mode] = (ok, int(kept))
    assert results["fixed"][0] == "True" and results["fixed"][1] < 16, results
    # glibc's default often keeps the second round resident (127 MiB measured here) but not always (its dynamic
    # threshold and top-of-heap trimming depend on the heap's layout), so only the knob's guarantee is asserted.
