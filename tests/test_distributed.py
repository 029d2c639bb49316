"""Scale-out on torch.distributed: data-parallel ranks hold identical weights, pipelined training ends on the
single-process fingerprint (DGL, and MAN++ with staleness 0), a grid of 2 stages x 2 replicas ends on the
data-parallel fingerprint, preemption stops every stage and resumes exactly, and a process that dies ends the run
within a bounded time. The distributed runs are real launches of ``locallearn train`` with 2 or 4 gloo processes on
CPU (through ``torchrun``, or with the environment it sets)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from locallearn import LocalLearner, create_model
from locallearn.cli import main
from locallearn.distributed.pipeline import (
    balance,
    checkpoint_pipeline_state,
    grid_position,
    measure_block_seconds,
    stage_state_keys,
)
from locallearn.durable import verify
from locallearn.errors import CheckpointError, UserError
from locallearn.methods import any_model_methods
from locallearn.metrics import fingerprint
from tests.conftest import make_batches

TRAIN = [
    "-m", "locallearn", "train", "--dataset", "synthetic", "--image-size", "16", "--arch", "resnet20", "--K", "3",
    "--batch-size", "32", "--epochs", "1", "--device", "cpu", "--no-progress", "--data.synthetic_train_size=192",
    "--data.synthetic_test_size=32", "--dist.timeout_s=60",
]  # fmt: skip
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DIRECT = ["(two ranks without torchrun's agent)"]  # one thread per process, in single-process runs as well


def _run(cmd: list[str], out: Path, *extra: str) -> dict:
    return _run_all([(cmd, out, extra)])[0]


def _run_all(runs: list[tuple[list[str], Path, tuple[str, ...]]]) -> list[dict]:
    """Launch the runs side by side (results do not depend on load: one thread per process) and wait for all.

    ``DIRECT`` as the command starts the two ranks without torchrun's agent (the environment torchrun would set),
    which saves the agent's start-up where the test is about results, not about torchrun."""
    groups = []
    for cmd, out, extra in runs:
        argv = [*TRAIN, "--out", str(out), *extra]
        if cmd is DIRECT:
            groups.append(_ranks(argv, 2))
        else:
            groups.append([_popen([*cmd, *argv], ENV)])
    summaries = []
    for procs, (_, out, _) in zip(groups, runs):
        for proc in procs:
            _, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr[-3000:]
        summaries.append(json.loads((out / "summary.json").read_text()))
    return summaries


def _popen(argv: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _ranks(argv: list[str], world: int) -> list[subprocess.Popen]:
    """``world`` ranks of ``python argv`` with the environment torchrun would set (no agent)."""
    port = _free_port()
    envs = [{**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port)} for r in range(world)]  # fmt: skip
    return [_popen([sys.executable, *argv], env) for env in envs]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- in-process ------------------------------------------------------------------------------------------------------
def test_balance_minimises_the_slowest_stage():
    assert balance([1, 1, 1, 1], 2) == [2]
    assert balance([4, 1, 1, 1, 1], 2) == [1]
    assert balance([1, 2, 3, 4, 5, 6], 3) == [3, 5]  # 1+2+3 | 4+5 | 6: the slowest stage costs 9
    costs = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    starts = balance(costs, 3)
    bounds = [0, *starts, len(costs)]
    worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
    best = min(  # brute force over every pair of cuts
        max(sum(costs[:i]), sum(costs[i:j]), sum(costs[j:]))
        for i in range(1, len(costs) - 1)
        for j in range(i + 1, len(costs))
    )
    assert worst == best
    with pytest.raises(Exception, match="at least as many blocks"):
        balance([1.0, 2.0], 3)


@pytest.mark.parametrize("method", sorted(any_model_methods()))
def test_every_state_key_belongs_to_exactly_one_block(method):
    k = 1 if method == "e2e" else 4
    learner = LocalLearner(create_model("resnet20", num_classes=10, in_channels=1), method, k, input_shape=(1, 16, 16))
    model_keys, method_keys = [], []
    for b in range(k):
        m, a = stage_state_keys(learner, range(b, b + 1))
        model_keys += m
        method_keys += a
    assert sorted(model_keys) == sorted(learner.model.state_dict())
    assert sorted(method_keys) == sorted(learner.method.state_dict())


def test_measuring_block_times_changes_nothing():
    learner = LocalLearner(
        create_model("resnet20", num_classes=10, in_channels=1), "dgl+man", 3, input_shape=(1, 28, 28)
    )
    before = fingerprint(learner.model), fingerprint(learner.method), learner.step
    seconds = measure_block_seconds(learner, make_batches(1)[0], steps=1)
    assert len(seconds) == 3 and all(s > 0 for s in seconds)
    assert (fingerprint(learner.model), fingerprint(learner.method), learner.step) == before
    assert all(not opt.state for opt in learner.optimizers)  # momentum buffers of the timed steps are gone


def test_measuring_block_times_does_not_compile(monkeypatch):
    """Rank 0 times the blocks alone: compiling there would leave the other stages' compile handshake unanswered."""
    from locallearn import compiled

    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    learner = LocalLearner(create_model("resnet20", num_classes=10, in_channels=1), "dgl", 2, input_shape=(1, 28, 28),
                           compile="default")  # fmt: skip
    measure_block_seconds(learner, make_batches(1)[0], steps=1)
    assert learner.compiled is not None and learner.compiled.compiles(8) and learner.compile_seconds == 0


def test_parallel_modes_need_torchrun(capsys):
    assert main(["train", "--parallel", "pipeline", "--dataset", "synthetic", "--max-steps", "1"]) == 2
    assert "torchrun" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse's choices
        main(["train", "--parallel", "sideways", "--dataset", "synthetic"])
    assert exit_info.value.code == 2


# -- torchrun launches -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """Single-process, single-thread runs the pipelined ones must reproduce bit for bit."""
    root = tmp_path_factory.mktemp("sequential")
    methods = ("dgl", "man++")
    runs = _run_all([([sys.executable], root / m, ("--method", m, "--log-every", "1")) for m in methods])
    return {m: {**summary, "out": root / m} for m, summary in zip(methods, runs)}


def test_data_parallel_ranks_hold_identical_weights_and_resume_exactly(tmp_path):
    """Every rank ends with the same backbone and auxiliary nets (MAN's EMA copies included); a SIGTERM to every
    process stops both ranks at one step, and the resumed run ends on the uninterrupted run's weights. The
    preempted run waits for each block's gradient average (--dist.overlap=false), the whole one overlaps it with
    the next block's work (the default): the same weights, bit for bit."""
    args = ("--method", "dgl+man", "--checkpoint-every", "2")
    out = tmp_path / "preempted"
    proc = _start(out, *args, "--dist.overlap=false")
    whole = _start(tmp_path / "dp", *args)  # side by side: one thread per process, results do not depend on load
    _wait_for(out / "checkpoints" / "step-000000002.json", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert "SIGTERM received" in stderr
    _, whole_err = whole.communicate(timeout=300)
    assert whole.returncode == 0, whole_err[-3000:]
    summary = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert summary["parallel"] == "data" and summary["world_size"] == 2
    prints = summary["rank_fingerprints"]
    assert len(prints) == 2 and prints[0] == prints[1] == summary["fingerprint"]
    assert len(set(summary["rank_method_fingerprints"])) == 1
    assert summary["steps"] == 6  # --batch-size is global: 192 examples / 32, as one process
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    resumed = _run(DIRECT, out, *args, "--dist.overlap=false", "--resume", "auto")
    assert resumed["resumed_from"] is not None
    assert resumed["fingerprint"] == summary["fingerprint"]
    assert resumed["rank_method_fingerprints"] == summary["rank_method_fingerprints"]


def test_pipelined_man_with_staleness_0_is_sequential_man(tmp_path, sequential):
    """MAN++ (InfoPro heads: the [0, 1] images travel too; EMA copy and learnable scale across the stage boundary):
    staleness 0 is exact; staleness 1 lags the EMA by a step, which changes the weights (so the test can fail)."""
    args = ("--method", "man++", "--parallel", "pipeline", "--dist.stages=[1]")
    exact, stale = _run_all([(DIRECT, tmp_path / "s0", args), (DIRECT, tmp_path / "s1", (*args, "--staleness", "1"))])
    assert exact["fingerprint"] == sequential["man++"]["fingerprint"]
    assert stale["pipeline_staleness"] == 1 and stale["fingerprint"] != sequential["man++"]["fingerprint"]


def test_pipelined_mixup_is_sequential_mixup(tmp_path):
    """Mixup and cutmix are drawn once per step on stage 0 and the soft targets travel with the activations (the
    mixed [0, 1] images too, for MAN++'s InfoPro decoders): the pipelined run ends on the single-process weights,
    also with another bound on the micro-batches in flight (timing only)."""
    args = ("--method", "man++", "--mixup", "0.8", "--cutmix", "1.0", "--label-smoothing", "0.1")
    sequential, pipelined = _run_all(
        [([sys.executable], tmp_path / "seq", args), (DIRECT, tmp_path / "pipe", (*args, "--parallel", "pipeline",
                                                                                  "--dist.stages=[1]",
                                                                                  "--dist.in_flight=4"))]
    )  # fmt: skip
    assert pipelined["fingerprint"] == sequential["fingerprint"] and pipelined["pipeline_in_flight"] == 4
    assert pipelined["block_accuracies"] == sequential["block_accuracies"]


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*TORCHRUN, *TRAIN, "--out", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,  # its own process group: a scheduler signals every process of the job
    )


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), proc.stderr.read()[-3000:] if proc.poll() is not None else "timed out"


def test_pipelined_dgl_is_sequential_dgl_also_after_preemption(tmp_path, sequential):
    """Pipelined DGL (stages balanced by measured time) ends on the single-process fingerprint, and its TensorBoard
    step scalars are the single-process run's for every block, the later stage's included; so does a pipelined run
    stopped by SIGTERM to every process (all stages stop at one step, well inside a 30 s grace period) and resumed
    with --resume auto."""
    out = tmp_path / "run"
    args = ("--method", "dgl", "--parallel", "pipeline", "--checkpoint-every", "2")
    proc = _start(out, *args)
    whole = _start(tmp_path / "whole", *args, "--log-every", "1")  # side by side: one thread per process
    _wait_for(out / "checkpoints" / "step-000000004.json", proc)
    signalled = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)  # every process: torchrun's agent and both stages
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - signalled < 30
    assert "SIGTERM received" in stderr
    _, whole_err = whole.communicate(timeout=300)
    assert whole.returncode == 0, whole_err[-3000:]
    uninterrupted = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert uninterrupted["pipeline_stages"] in ([[0], [1, 2]], [[0, 1], [2]])
    assert uninterrupted["fingerprint"] == sequential["dgl"]["fingerprint"]
    assert uninterrupted["block_accuracies"] == sequential["dgl"]["block_accuracies"]
    steps = _step_scalars(tmp_path / "whole" / "tensorboard")
    assert sorted(steps) == [f"block{k}/{name}" for k in range(3) for name in ("loss", "train_accuracy")]
    assert all([step for step, _ in points] == list(range(1, 7)) for points in steps.values())
    assert steps == _step_scalars(sequential["dgl"]["out"] / "tensorboard")
    summary = _run(DIRECT, out, *args, "--resume", "auto")
    assert summary["resumed_from"] is not None
    assert summary["fingerprint"] == sequential["dgl"]["fingerprint"]


def _step_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """The per-block step scalars (``block{k}/loss``, ``block{k}/train_accuracy``) of a run's event files."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if t.startswith("block") and t.endswith(("/loss", "/train_accuracy"))]
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags}


def _accuracy_rank(rank: int, port: int, results) -> None:
    import torch
    import torch.distributed as dist

    from locallearn.distributed.data_parallel import global_accuracies

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    labels = torch.zeros(3 if rank == 0 else 1, dtype=torch.long)  # unequal shards: 3 and 1 examples
    stats = {"acc/0": torch.tensor(1.0 if rank == 0 else 0.0), "loss/0": torch.tensor(0.5)}
    global_accuracies(stats, labels)
    results[rank] = (stats["acc/0"].item(), stats["loss/0"].item())
    dist.destroy_process_group()


def test_data_parallel_train_accuracy_is_the_whole_batch_not_one_shard():
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_accuracy_rank, args=(_free_port(), results), nprocs=2)
        assert dict(results) == {0: (0.75, 0.5), 1: (0.75, 0.5)}  # 3 of 4 right, weighted by shard; loss untouched


# -- a grid of pipeline stages x data-parallel replicas --------------------------------------------------------------
def test_a_pipelined_checkpoint_resumes_only_on_the_pipeline_that_wrote_it():
    """Each rank gets its own state back from a checkpoint of the same shape; a sequential checkpoint (no pipeline
    states) resumes from its weights; any other shape is refused by name instead of resuming inexactly."""
    states = [{"starts": [0, 2], "replicas": 2, "rank": r} for r in range(4)]
    assert checkpoint_pipeline_state(states, 3, 4, [0, 2], 2)["rank"] == 3
    assert checkpoint_pipeline_state(None, 1, 2, [0, 2], 1) is None
    old = [{"starts": [0, 2], "rank": r} for r in range(2)]  # written before the grid: no "replicas" key
    assert checkpoint_pipeline_state(old, 1, 2, [0, 2], 1)["rank"] == 1
    for rank, world, starts, replicas in ((0, 2, [0, 2], 1), (0, 4, [0, 1], 2), (1, 4, [0, 2], 1), (0, 8, [0, 2], 4)):
        with pytest.raises(CheckpointError, match=r"written by pipeline stages \[0, 2\] x 2 replica\(s\) on 4 "):
            checkpoint_pipeline_state(states, rank, world, starts, replicas)


def test_grid_positions_and_refusals():
    assert [grid_position(r, 6, 2) for r in (0, 2, 3, 5)] == [(0, 0, 3), (2, 0, 3), (0, 1, 3), (2, 1, 3)]
    for world, replicas in ((4, 3), (2, 2), (4, 0)):  # not a divisor; one stage per replica; none
        with pytest.raises(UserError, match="--dist.replicas"):
            grid_position(0, world, replicas)


def test_replicas_are_refused_outside_a_pipeline_and_where_they_make_no_grid(monkeypatch):
    from locallearn.config import RunConfig
    from locallearn.runner import _parallel_mode

    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun sets it
    cfg = RunConfig()
    cfg.dist.replicas = 2
    with pytest.raises(UserError, match="--dist.replicas 2 is for --parallel pipeline"):
        _parallel_mode(cfg)  # auto: data parallel under torchrun
    cfg.dist.parallel = "pipeline"
    with pytest.raises(UserError, match="does not make a grid of 3 processes"):
        _parallel_mode(cfg)


GRID = ("--method", "dgl", "--parallel", "pipeline", "--replicas", "2", "--checkpoint-every", "2")


def _wait_for_file(path: Path, procs: list[subprocess.Popen], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), [p.communicate()[1][-2000:] for p in procs if p.poll() is not None] or "timed out"


def test_grid_is_data_parallel_also_after_preemption(tmp_path):
    """2 stages x 2 replicas (4 processes, stages balanced by time): each replica trains on half of every batch and
    the replicas of a stage average its blocks' gradients, so the grid ends on the 2-rank data-parallel run's weights
    bit for bit (the same shards, the same sums; with BatchNorm both differ from one process only by each shard's
    batch statistics). It is stopped by SIGTERM to every process after a checkpoint and resumed: still those weights."""
    out = tmp_path / "grid"
    grid = _ranks([*TRAIN, "--out", str(out), *GRID], 4)
    data_parallel = _ranks([*TRAIN, "--out", str(tmp_path / "dp"), "--method", "dgl"], 2)  # side by side
    _wait_for_file(out / "checkpoints" / "step-000000002.json", grid)
    for proc in grid:
        proc.send_signal(signal.SIGTERM)
    for proc in grid:
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM and "SIGTERM received" in stderr, stderr[-2000:]
    for proc in data_parallel:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
    reference = json.loads((tmp_path / "dp" / "summary.json").read_text())
    resumed = _run_ranks([*TRAIN, "--out", str(out), *GRID, "--resume", "auto"], 4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["steps"] == reference["steps"] == 6
    assert summary["parallel"] == "pipeline" and summary["world_size"] == 4 and summary["pipeline_replicas"] == 2
    assert len(summary["pipeline_wait_seconds"]) == 4
    assert summary["fingerprint"] == reference["fingerprint"]
    assert summary["block_accuracies"] == reference["block_accuracies"]
    assert resumed == [0, 0, 0, 0]


def _run_ranks(argv: list[str], world: int) -> list[int]:
    procs = _ranks(argv, world)
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
    return [proc.returncode for proc in procs]


def test_a_grid_process_that_dies_ends_every_rank_with_a_clear_error(tmp_path):
    """Without torchrun's agent to tear the job down: killing stage 1 of replica 1 ends its stage 0 (messages),
    stage 1 of replica 0 (gradient averages) and rank 0 (the stop agreement) within seconds, each with the error
    that names the cause and the way on; the checkpoints left behind are complete."""
    out = tmp_path / "grid"
    procs = _ranks([*TRAIN, "--out", str(out), *GRID, "--epochs", "5"], 4)
    _wait_for_file(out / "checkpoints" / "step-000000002.json", procs)
    procs[3].kill()
    killed = time.monotonic()
    for proc in procs[:3]:
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode != 0 and "another process of the run failed" in stderr, stderr[-2000:]
    assert time.monotonic() - killed < 30  # not the 60 s timeout: each rank sees a socket of its peers close
    procs[3].communicate()
    for manifest in sorted((out / "checkpoints").glob("step-*.json")):
        assert verify(manifest) is None
