"""Pipelined local learning: the K blocks in S contiguous stages, one process each, all working at once.

Stage s trains blocks ``starts[s] .. starts[s+1]-1``. For micro-batch t it receives the detached output of stage
s−1 with the labels (and, for reconstruction losses, the [0, 1] images), runs its blocks with their local losses and
optimizer steps (:meth:`LocalLearner.train_blocks`), and sends its own output on to stage s+1. No gradient and no
backward message crosses a stage, so while stage s+1 trains on micro-batch t, stage s already trains on t+1: the
"update unlocking" of local learning, which ``torch.distributed.pipelining`` and DeepSpeed's pipeline (one loss at
the last stage, gradients sent back) cannot express. Messages are ``torch.distributed`` point-to-point sends.

Exact by design. In the sequential engine (per-block step order) block k steps on micro-batch t before block k+1
sees micro-batch t, and block k+1's input is detached, so block k+1's result depends only on block k's output —
exactly what it receives here. (A stage always steps in per-block order: ``step_order="after_all"`` gives the same
weights, see :mod:`locallearn.engine`, but would hold back MAN's parameter versions.) Every process builds the whole
learner from the same seed, so the blocks start with the same weights; each stage's learner counts its own steps, so
the schedule is the same. For every method whose block k reads nothing of block k+1 (DGL, InfoPro, AugLocal) the
pipeline therefore ends with bit-for-bit the weights of a single process with the same seed, data order and thread
count (tested).

MAN and MAN++: the EMA copy of block k follows block k+1's first layer (``method.downstream_reads``). When block k+1
lives on the next stage, that stage sends the layer's parameters upstream after each of its steps (a message of one
layer's size); stage s copies version v (the parameters after step v) into its own copy of the layer and calls
``method.downstream_stepped(k)``, applying versions in order. ``staleness`` = d: before its step t stage s needs
versions up to t−1−d. With d = 0 that is exactly what the sequential engine has applied by then, so the result is
sequential MAN's (tested). The version is sent right after block k+1's own step (the first of its stage) and
applied right before block k runs (the last of its stage), so with d = 0 only block k waits for block k+1 of the
micro-batch before: a step takes at least max(stage s, stage s+1, block k + block k+1). With d ≥ 1 block k's EMA
lags d more steps behind block k+1 (with m = 0.995 its time constant is ~200 steps) and no stage waits for the next.

Checkpoints: stage 0 (rank 0) drives. At a checkpoint it sends a ``GATHER`` command down the pipeline; each stage,
having finished every micro-batch before it, sends the state of its blocks and auxiliary nets, its optimizers, RNG
state, the not yet applied parameter versions and its statistics to rank 0, which writes one checkpoint of the same
format as a single-process run (plus each stage's pipeline state, so a pipelined resume is exact).

A 2-D grid (``--dist.replicas R``): R copies of the pipeline, each on its own shard of every batch, the replicas of
a stage averaging their gradients as data parallelism does (:class:`PipelineStage`). Each replica's stage 0 drives
its pipeline through the same loop; they agree on stopping, and at a checkpoint every rank joins one gather (rank 0
writes replica 0's weights and every rank's RNG state). With BatchNorm the result is the data-parallel one (each
replica normalises with its shard's statistics), not the single process's.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from locallearn.data import Batch
from locallearn.distributed.context import DistContext
from locallearn.distributed.data_parallel import DataParallel, agree_stop, block_tensors
from locallearn.engine import eval_blocks, eval_report, eval_sums
from locallearn.errors import CheckpointError, UserError
from locallearn.memory import balanced_boundaries
from locallearn.rng import rng_state, set_rng_state

TRAIN, EVAL, EVAL_END, GATHER, STOP = 1, 2, 3, 4, 5
HEADER = 14  # [command, arg, dtype, channels_last, has_raw, ndim, d0 .. d5, soft classes (0: none), soft dtype]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
TAG_HEADER, TAG_H, TAG_Y, TAG_RAW, TAG_SNAPSHOT, TAG_SOFT, TAG_COMPILED, TAG_STATS = 1, 2, 3, 4, 5, 6, 7, 8
STEP_STATS = ("loss", "acc", "clip")  # a block's statistics of one step that a later stage reports to rank 0
IN_FLIGHT = 2  # default: micro-batches a stage may run ahead of the next one (bounds the memory of unsent outputs)


def balance(costs: list[float], stages: int) -> list[int]:
    """First block of stages 1 .. S−1 for contiguous stages minimising the largest stage cost (exact, by dynamic
    programming over the K blocks)."""
    if not 1 <= stages <= len(costs):
        raise UserError(f"{stages} pipeline stages need at least as many blocks, the run has K={len(costs)}: raise --K")
    # the splitter's exact min-max partition, with blocks for layers and no auxiliary cost at any cut; the trailing
    # zero stands for its "classifier" (always in the last part), so the last block may be a stage of its own
    return balanced_boundaries([*costs, 0.0], [0.0] * (len(costs) + 2), stages)


def measure_block_seconds(learner: Any, batch: Batch, steps: int = 2) -> list[float]:
    """Seconds of one training step of each block (forward, local loss, backward, optimizer) on ``batch``, the mean
    over ``steps`` after one warm-up step. The learner's whole state is restored afterwards, so measuring changes
    no result. A compiled learner's blocks are timed eagerly: compiling here, on rank 0 alone, would take the
    compiling out of the first training step on that rank only, and the stages' compile handshake after that step
    would wait forever (and the relative cost of the blocks is what the balance needs)."""
    import copy

    saved = copy.deepcopy(learner.state_dict())
    compiled, learner.compiled = learner.compiled, None
    seconds = [0.0] * len(learner.blocks)
    for step in range(steps + 1):
        h = batch.x
        for k in range(len(learner.blocks)):
            start = time.perf_counter()
            _, h = learner.train_blocks(batch, h, range(k, k + 1))
            if learner.device.type == "cuda":
                torch.cuda.synchronize(learner.device)
            if step:
                seconds[k] += (time.perf_counter() - start) / steps
        # train_blocks advanced the step counter once per block; the restore below resets it
    learner.load_state_dict(saved)
    learner.compiled = compiled
    return seconds


def _common_dtype(tensors: list[Tensor]) -> torch.dtype:
    """The dtype every one of ``tensors`` converts to exactly (a layer's parameters travel as one flat message)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def stage_state_keys(learner: Any, blocks: range) -> tuple[list[str], list[str]]:
    """The keys of ``learner.model.state_dict()`` and ``learner.method.state_dict()`` that belong to ``blocks``: the
    blocks' own parameters and buffers, and their auxiliary nets' (``method.block_state``). Over all stages every
    key belongs to exactly one (tested for every method), so the stages' parts make the whole state."""
    owned = {id(t) for t in block_tensors(learner, blocks)}

    def keys(module: torch.nn.Module) -> list[str]:
        return [name for name, t in module.state_dict(keep_vars=True).items() if id(t) in owned]

    return keys(learner.model), keys(learner.method)


def grid_position(rank: int, world: int, replicas: int) -> tuple[int, int, int]:
    """(stage, replica, stages) of ``rank`` in a grid of ``world`` processes: ``replicas`` pipelines of
    ``world / replicas`` stages, rank = replica × stages + stage (replica 0 is ranks 0 .. stages−1)."""
    if replicas < 1 or world % replicas or world // replicas < 2:
        raise UserError(
            f"--dist.replicas {replicas} does not make a grid of {world} processes: it must divide them and leave at "
            "least 2 pipeline stages per replica (stages = processes / replicas); for replicas only use --parallel data"
        )
    stages = world // replicas
    return rank % stages, rank // stages, stages


def checkpoint_pipeline_state(
    states: list[dict[str, Any]] | None, rank: int, world: int, starts: list[int], replicas: int
) -> dict[str, Any] | None:
    """This rank's pipeline state in a checkpoint's per-rank ``states`` (None: a checkpoint of a run that was not
    pipelined, which a pipeline resumes from its weights as they are). A pipelined checkpoint resumes exactly only on
    the pipeline that wrote it, so another shape — other stage boundaries, replicas or number of processes — is a
    :class:`CheckpointError` naming both, where falling back to the weights alone would lose each rank's RNG state
    and, at ``--staleness`` > 0, the parameter versions in flight, without a word."""
    if states is None:
        return None
    written = states[0]
    wrote = f"{written['starts']} x {written.get('replicas', 1)} replica(s) on {len(states)} process(es)"
    if len(states) != world or written["starts"] != starts or written.get("replicas", 1) != replicas:
        raise CheckpointError(
            f"the checkpoint was written by pipeline stages {wrote}, this run has {starts} x {replicas} replica(s) on "
            f"{world} process(es): resume with the same --dist.stages, --dist.replicas and number of processes (or "
            "from a checkpoint of a run that was not pipelined)"
        )
    return states[rank]


class PipelineStage:
    """This process's stage of a pipelined learner: blocks ``starts[stage] .. starts[stage+1]-1``.

    With ``replicas`` R > 1 the processes form a 2-D grid: R pipelines of S = world / R stages, each fed its own
    shard of every batch (rank = replica × S + stage, see :func:`grid_position`). The R replicas of a stage average
    their blocks' gradients before each step (:class:`locallearn.distributed.data_parallel.DataParallel` over the
    stage's group, overlapped as ``overlap`` says), so every replica of a block holds the same weights and the run
    is the data-parallel run of the same global batch, pipelined. Each replica's stage 0 drives its pipeline; rank 0
    (replica 0) writes.

    Args:
        learner: the whole learner, built identically on every rank (same seed).
        ctx: the process group.
        starts: the first block of stages 1 .. S−1.
        staleness: d, see the module docstring (0: exactly sequential MAN).
        replicas: R, data-parallel copies of the pipeline (1: a plain pipeline, one stage per process).
        overlap: with R > 1, start block k's gradient average right after its backward (see ``--dist.overlap``).
        in_flight: micro-batches a stage may run ahead of the next (sent, not yet received): more absorbs jitter in
            the stages' times at the memory of that many outputs; for MAN at staleness 0 more does not help (block k
            waits for block k+1's version of the step before).
    """

    def __init__(
        self,
        learner: Any,
        ctx: DistContext,
        starts: list[int],
        staleness: int = 0,
        replicas: int = 1,
        overlap: bool = True,
        in_flight: int = IN_FLIGHT,
        stats_every: int = 0,
    ) -> None:
        k = len(learner.blocks)
        stage, replica, stages = grid_position(ctx.rank, ctx.world, replicas)
        bounds = [0, *starts, k]
        if len(starts) != stages - 1 or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise UserError(
                f"pipeline stages {starts} do not cut K={k} blocks into {stages} non-empty stages (one per process "
                f"of each of {replicas} replica(s)): give {stages - 1} increasing first-block indices in 1..{k - 1} "
                "(--dist.stages), or leave it unset to balance by time"
            )
        if in_flight < 1:
            raise UserError(f"--dist.in_flight must be >= 1 micro-batch, got {in_flight}")
        if staleness < 0:
            raise UserError(f"--dist.staleness must be >= 0 steps, got {staleness}")
        # A stage steps each block right after its own backward even when the config says after_all: the weights are
        # the same under both orders (tests/test_engine.py), and a block k+1 that steps only at the end of its stage
        # would make block k on the stage before wait for the whole stage (MAN, staleness 0): measured 19 s of
        # waiting in 40 steps of InfoPro+MAN K=15, 63.6 instead of ~70 img/s.
        learner.step_order = "per_block"
        self.learner, self.ctx, self.staleness, self.in_flight = learner, ctx, staleness, in_flight
        self.stage, self.stages, self.replica, self.replicas = stage, stages, replica, replicas
        self.starts = bounds
        self.blocks = range(bounds[self.stage], bounds[self.stage + 1])
        # the replicas of each stage average their gradients (every process makes every group, in the same order);
        # stage 0's group, the drivers, also agrees when to stop
        self.dp: DataParallel | None = None
        self.drivers = None
        if replicas > 1:
            groups = [dist.new_group([r * stages + s for r in range(replicas)]) for s in range(stages)]
            self.dp = DataParallel(learner, ctx, overlap=overlap, group=groups[stage], blocks=self.blocks)
            self.drivers = groups[0]
        of_replica = f" of replica {replica}" if replicas > 1 else ""
        learner.where = f" on pipeline stage {self.stage}{of_replica} (rank {ctx.rank})"
        reads = learner.method.downstream_reads()
        first, last = self.blocks.start, self.blocks.stop - 1
        # the layer of my first block that the stage before reads (I send it), and my copy of the next stage's
        self.source = reads.get(first - 1) if self.stage > 0 else None
        self.reader = last if self.stage < stages - 1 and last in reads else None
        self.next_layer = reads[last] if self.reader is not None else None
        self.applied = learner.step - 1  # versions (parameters after step v) applied to next_layer: 0 .. applied
        self.pending: list[Tensor] = []  # versions received but not yet applied, in order
        self.sends: list[tuple[list[dist.Work], list[Tensor]]] = []
        self.snapshot_sends: list[tuple[dist.Work, Tensor]] = []
        self.sums: dict[str, Tensor] = {}  # statistics since the last gather (stages > 0)
        self.count = 0
        # seconds this stage waited: for its input, for the next stage's parameter versions (MAN, staleness), for
        # the next stage to take its outputs (back-pressure); the pipeline's bubbles, reported in summary.json
        self.waits = {"input": 0.0, "versions": 0.0, "backpressure": 0.0}
        self.model_keys, self.method_keys = stage_state_keys(learner, self.blocks)
        self.prev, self.next = ctx.rank - 1, ctx.rank + 1  # my replica's stages before and after mine
        # every stats_every steps replica 0's later stages send their blocks' step statistics to rank 0 (the step
        # scalars of TensorBoard), which receives them without waiting: (step, stage, work, buffer) in order
        self.stats_every = stats_every
        self.stats_recvs: list[tuple[int, int, Any, Tensor]] = []
        self.stats_sends: list[tuple[Any, Tensor]] = []

    # -- messages ----------------------------------------------------------------------------------------------------
    def _send(
        self, command: int, arg: int = 0, h: Tensor | None = None, y: Tensor | None = None, raw=None, soft=None
    ) -> None:
        if self.stage == self.stages - 1:
            return
        header = torch.zeros(HEADER, dtype=torch.int64)
        header[0], header[1] = command, arg
        tensors: list[tuple[Tensor, int]] = []
        if h is not None:
            nhwc = h.dim() == 4 and not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last)
            wire = h.permute(0, 2, 3, 1) if nhwc else h.contiguous()  # NHWC storage sent as it lies
            header[2], header[3] = DTYPES.index(h.dtype), int(nhwc)
            header[4], header[5] = int(raw is not None), h.dim()
            header[6 : 6 + h.dim()] = torch.tensor(h.shape)
            tensors = [(wire, TAG_H), (y.contiguous(), TAG_Y)]
            if raw is not None:
                tensors.append((raw.float().contiguous(), TAG_RAW))
            if soft is not None:  # mixup / cutmix targets: every stage's losses read them
                header[12], header[13] = soft.shape[1], DTYPES.index(soft.dtype)
                tensors.append((soft.contiguous(), TAG_SOFT))
        header = header.to(self._wire_device)
        works = [dist.isend(header, self.next, tag=TAG_HEADER)]
        works += [dist.isend(t, self.next, tag=tag) for t, tag in tensors]
        self.sends.append((works, [header, *(t for t, _ in tensors)]))
        start = time.perf_counter()
        while len(self.sends) > self.in_flight:  # back-pressure: never more than that many micro-batches in flight
            for work in self.sends.pop(0)[0]:
                work.wait()
        self.waits["backpressure"] += time.perf_counter() - start

    @property
    def _wire_device(self) -> torch.device:
        return self.learner.device if self.ctx.backend == "nccl" else torch.device("cpu")

    def _recv(self) -> tuple[int, int, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        header = torch.empty(HEADER, dtype=torch.int64, device=self._wire_device)
        start = time.perf_counter()
        dist.recv(header, self.prev, tag=TAG_HEADER)
        self.waits["input"] += time.perf_counter() - start
        values = header.tolist()
        command, arg = values[0], values[1]
        if command not in (TRAIN, EVAL):
            return command, arg, None, None, None, None
        dtype, channels_last, has_raw, ndim = DTYPES[values[2]], bool(values[3]), bool(values[4]), values[5]
        shape = values[6 : 6 + ndim]
        device = self.learner.device
        if channels_last:
            n, c, hh, ww = shape
            h = torch.empty(n, hh, ww, c, dtype=dtype, device=device)
            dist.recv(h, self.prev, tag=TAG_H)
            h = h.permute(0, 3, 1, 2)  # channels_last strides, as the sending block produced it
        else:
            h = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(h, self.prev, tag=TAG_H)
        y = torch.empty(shape[0], dtype=torch.int64, device=device)
        dist.recv(y, self.prev, tag=TAG_Y)
        raw = None
        if has_raw:
            raw = torch.empty(shape[0], *self.learner.input_shape, dtype=torch.float32, device=device)
            dist.recv(raw, self.prev, tag=TAG_RAW)
        soft = None
        if values[12]:
            soft = torch.empty(shape[0], values[12], dtype=DTYPES[values[13]], device=device)
            dist.recv(soft, self.prev, tag=TAG_SOFT)
        return command, arg, h, y, raw, soft

    def _flat_source(self) -> Tensor:
        params = [p.detach().reshape(-1) for p in self.source.parameters()]
        dtype = _common_dtype(params)
        return torch.cat([p.to(dtype) for p in params])

    def _send_snapshot(self) -> None:
        """After a step: the parameters of my first layer, which the stage before me reads (MAN's EMA source)."""
        if self.source is None:
            return
        flat = self._flat_source()
        self.snapshot_sends.append((dist.isend(flat, self.prev, tag=TAG_SNAPSHOT), flat))
        # completed sends are dropped; an incomplete one is never waited for here (the stage before may itself be
        # waiting for my next output: waiting on its receive could deadlock)
        self.snapshot_sends = [(w, t) for w, t in self.snapshot_sends if not w.is_completed()]

    def _recv_version(self) -> Tensor:
        """The next parameter version of the next stage's layer, from the wire (the layout of ``_flat_source``)."""
        params = list(self.next_layer.parameters())
        flat = torch.empty(sum(p.numel() for p in params), dtype=_common_dtype(params), device=self.learner.device)
        start = time.perf_counter()
        dist.recv(flat, self.next, tag=TAG_SNAPSHOT)
        self.waits["versions"] += time.perf_counter() - start
        return flat

    def _next_version(self) -> Tensor:
        return self.pending.pop(0) if self.pending else self._recv_version()

    @torch.no_grad()
    def _apply_versions(self, upto: int) -> None:
        """Bring my copy of the next stage's layer to version ``upto``, one version at a time, each followed by
        ``method.downstream_stepped`` (what the sequential engine does after each of that block's steps)."""
        if self.next_layer is None:
            return
        while self.applied < upto:
            flat, offset = self._next_version(), 0
            for p in self.next_layer.parameters():
                p.copy_(flat[offset : offset + p.numel()].view(p.shape))
                offset += p.numel()
            self.applied += 1
            self.learner.method.downstream_stepped(self.reader)

    def _receive_all_versions(self) -> None:
        """Receive (not apply) every version the next stage has sent: all of steps 0 .. step−1."""
        if self.next_layer is None:
            return
        while self.applied + len(self.pending) < self.learner.step - 1:
            self.pending.append(self._recv_version())

    # -- training ----------------------------------------------------------------------------------------------------
    def _before_block(self, k: int) -> None:
        if k == self.reader:  # as late as possible: the blocks before it have run meanwhile
            self._apply_versions(self.learner.step - 1 - self.staleness)

    def _after_step(self, k: int) -> None:
        if k == self.blocks.start:  # as early as possible: the stage before may be waiting for this version
            self._send_snapshot()

    def _train(self, batch: Batch, h: Tensor) -> dict[str, Tensor]:
        compiled_before = self.learner.compile_seconds
        stats, out = self.learner.train_blocks(batch, h, self.blocks, self._before_block, self._after_step)
        self._send(TRAIN, self.learner.step, out, batch.y, batch.raw if self._needs_raw else None, batch.soft)
        if self.dp is not None:  # after the send: the next stage need not wait for the replicas' exchange
            self.dp.after_step(stats, batch.y)
        if self.learner.compile_seconds != compiled_before:  # this step compiled my blocks
            self._compiled_handshake()
        return stats

    def _compiled_handshake(self) -> None:
        """After the step that compiled my blocks: wait until every later stage has compiled its own (each says so
        upstream once its first step and its successors' are done), and count that wait as compile time. Without it
        stage 0, which times the run, would count the later stages' compiling as training time (back-pressure holds
        it after two micro-batches)."""
        start = time.perf_counter()
        if self.stage < self.stages - 1:
            done = torch.zeros(1, device=self._wire_device)
            dist.recv(done, self.next, tag=TAG_COMPILED)
        if self.stage > 0:
            dist.send(torch.ones(1, device=self._wire_device), self.prev, tag=TAG_COMPILED)
        self.learner.compiled.seconds += time.perf_counter() - start

    @property
    def _needs_raw(self) -> bool:
        return self.learner.method.uses_raw

    def train_step(self, batch: Batch) -> dict[str, Tensor]:
        """Stage 0: train my blocks on ``batch`` and send their output on. Returns my blocks' statistics."""
        learner = self.learner
        learner.build(tuple(batch.x.shape[1:]))
        batch = learner.prepare_batch(batch)  # mixed here once: the soft targets travel with the activations
        stats = self._train(batch, batch.x)
        if self.ctx.rank == 0 and self._reports_stats():
            for stage in range(1, self.stages):  # replica 0's stage s is rank s
                buffer = torch.empty(2 * len(STEP_STATS) * self._stage_blocks(stage), dtype=torch.float64,
                                     device=self._wire_device)  # fmt: skip
                work = dist.irecv(buffer, stage, tag=TAG_STATS)
                self.stats_recvs.append((learner.step, stage, work, buffer))
        return stats

    # -- the later stages' step statistics, for rank 0's step scalars ------------------------------------------------
    def _reports_stats(self) -> bool:
        return self.replica == 0 and self.stats_every > 0 and self.learner.step % self.stats_every == 0

    def _stage_blocks(self, stage: int) -> int:
        return self.starts[stage + 1] - self.starts[stage]

    def _send_step_stats(self, stats: dict[str, Tensor]) -> None:
        """Send my blocks' statistics of this step to rank 0: (present, value) per block and name of STEP_STATS."""
        device = self._wire_device
        present = torch.ones((), dtype=torch.float64, device=device)
        absent = torch.zeros((), dtype=torch.float64, device=device)
        parts = []
        for k in self.blocks:
            for name in STEP_STATS:
                value = stats.get(f"{name}/{k}")  # over NCCL no host read: the values travel from the device
                parts += [absent, absent] if value is None else [present, value.detach().to(device, torch.float64)]
        buffer = torch.stack(parts)
        self.stats_sends = [(work, sent) for work, sent in self.stats_sends if not work.is_completed()]
        self.stats_sends.append((dist.isend(buffer, 0, tag=TAG_STATS), buffer))

    def step_stats(self, wait: bool = False) -> list[tuple[int, dict[str, float]]]:
        """Rank 0: the later stages' step statistics that have arrived, oldest first, as ``(step, {"loss/k": ...})``
        (all of them, waiting, with ``wait``). They arrive a few steps after rank 0's own (the stages behind it)."""
        done = []
        while self.stats_recvs:
            step, stage, work, buffer = self.stats_recvs[0]
            if not wait and not work.is_completed():
                break
            work.wait()
            self.stats_recvs.pop(0)
            flat = buffer.cpu().view(-1, 2).tolist()
            names = [f"{name}/{k}" for k in range(self.starts[stage], self.starts[stage + 1]) for name in STEP_STATS]
            done.append((step, {key: value for key, (present, value) in zip(names, flat) if present}))
        return done

    @torch.no_grad()
    def evaluate(self, batches) -> dict:
        """Stage 0: evaluate the whole pipeline (a plain forward pipeline); the accuracies of every block, summed
        over the stages, on every rank."""
        learner = self.learner
        learner.model.eval()
        learner.method.eval()
        sums = eval_sums(learner)
        for batch in batches:
            x = batch.x.contiguous(memory_format=torch.channels_last) if learner.channels_last else batch.x
            out = eval_blocks(learner, x, batch.y, self.blocks, sums)
            self._send(EVAL, 0, out, batch.y)
        self._send(EVAL_END)
        learner.model.train()
        learner.method.train()
        dist.all_reduce(sums)
        return eval_report(sums)

    def serve(self) -> int:
        """Stages > 0: follow stage 0's commands until ``STOP``; returns its argument (0, or the signal that stopped
        the run)."""
        learner = self.learner
        sums = None
        while True:
            command, arg, h, y, raw, soft = self._recv()
            if command == TRAIN:
                stats = self._train(Batch(h, y, raw, soft), h)
                if self._reports_stats():
                    self._send_step_stats(stats)
                for key, value in stats.items():
                    self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
                self.count += 1
            elif command == EVAL:
                if sums is None:
                    learner.model.eval()
                    learner.method.eval()
                    sums = eval_sums(learner)
                out = eval_blocks(learner, h, y, self.blocks, sums)
                self._send(EVAL, 0, out, y)
            elif command == EVAL_END:
                self._send(EVAL_END)
                learner.model.train()
                learner.method.train()
                sums = eval_sums(learner) if sums is None else sums
                dist.all_reduce(sums)
                sums = None
            elif command == GATHER:
                self._send(GATHER, arg)
                self.gather()
            elif command == STOP:
                self._send(STOP, arg)
                self.drain()
                return arg
            else:
                raise RuntimeError(f"pipeline stage {self.stage} received unknown command {command}")

    # -- state -------------------------------------------------------------------------------------------------------
    def _stage_state(self) -> dict[str, Any]:
        learner = self.learner
        self._receive_all_versions()
        if self.replica > 0:  # replica 0 holds the same weights and statistics; only my own RNG state is mine
            self.sums, self.count = {}, 0
            return {"stage": self.stage, "replica": self.replica, "pipeline": self.pipeline_state(),
                    "waits": dict(self.waits)}  # fmt: skip
        model_state = learner.model.state_dict()
        method_state = learner.method.state_dict()
        state = {
            "stage": self.stage,
            "blocks": [self.blocks.start, self.blocks.stop],
            "model": {k: model_state[k].detach().cpu().clone() for k in self.model_keys},
            "method": {k: method_state[k].detach().cpu().clone() for k in self.method_keys},
            "optimizers": {b: learner.optimizers[b].state_dict() for b in self.blocks},
            "skipped_by_block": {b: learner.skipped_by_block[b] for b in self.blocks},
            "pipeline": self.pipeline_state(),
            "sums": {k: v.cpu() for k, v in self.sums.items()},
            "waits": dict(self.waits),
        }
        self.sums, self.count = {}, 0
        return state

    def pipeline_state(self) -> dict[str, Any]:
        """What a pipelined resume needs beyond the learner: applied and pending parameter versions, RNG state."""
        rng = rng_state()
        copy = None if self.next_layer is None else [p.detach().cpu().clone() for p in self.next_layer.parameters()]
        return {
            "applied": self.applied,
            "pending": [t.cpu() for t in self.pending],
            "replica": copy,  # the key of checkpoints written before the grid: the copy of the next stage's layer
            "rng": rng,
            "staleness": self.staleness,
            "starts": self.starts,
            "replicas": self.replicas,
        }

    @torch.no_grad()
    def restore_pipeline_state(self, state: dict[str, Any] | None) -> None:
        """After ``learner.load_state_dict``: this stage's pipeline state from a pipelined checkpoint of the same shape
        (:func:`checkpoint_pipeline_state`), or, from a sequential one (None), the copy of the next stage's layer as
        the checkpoint holds it (version step−1) and nothing pending."""
        if state is None:
            self.applied, self.pending = self.learner.step - 1, []
            return
        self.applied = int(state["applied"])
        device = self.learner.device
        self.pending = [t.to(device) for t in state["pending"]]
        if self.next_layer is not None and state["replica"] is not None:
            for p, value in zip(self.next_layer.parameters(), state["replica"]):
                p.copy_(value)
        set_rng_state(state["rng"])

    def gather(self) -> list[dict[str, Any]] | None:
        """Every rank's stage state on rank 0, in rank order (a collective of the whole grid: each replica's stage 0
        sends ``GATHER`` down its pipeline first, see :meth:`collect`)."""
        payload = None if self.ctx.rank == 0 else self._stage_state()
        out = [None] * self.ctx.world if self.ctx.rank == 0 else None
        dist.gather_object(payload, out, dst=0)
        return out

    @torch.no_grad()
    def collect(self) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
        """Stage 0: bring every stage's blocks, auxiliary nets, optimizers and counters into rank 0's learner (so its
        ``state_dict`` and fingerprint are those of the whole model). Returns the other stages' statistic sums since
        the last collect, and every rank's pipeline state (for the checkpoint). Stage 0 of another replica takes
        part in the gather and returns ``({}, None)``."""
        self._send(GATHER)
        if self.ctx.rank != 0:
            self.gather()
            return {}, None
        states = self.gather()[1:]
        learner = self.learner
        self._receive_all_versions()
        model_state, method_state = learner.model.state_dict(), learner.method.state_dict()
        sums: dict[str, Tensor] = {}
        pipeline = [self.pipeline_state()] + [state["pipeline"] for state in states]
        self.stage_waits = [dict(self.waits)] + [state["waits"] for state in states]
        for state in states:
            if "model" not in state:
                continue  # another replica: its weights are replica 0's
            for key, value in state["model"].items():
                model_state[key].copy_(value)
            for key, value in state["method"].items():
                method_state[key].copy_(value)
            for b, opt_state in state["optimizers"].items():
                learner.optimizers[b].load_state_dict(opt_state)
            for b, n in state["skipped_by_block"].items():
                learner.skipped_by_block[b] = n
            sums.update({k: v.to(learner.device) for k, v in state["sums"].items()})
        return sums, pipeline

    def agree_stop(self, signum: int | None) -> int | None:
        """Each replica's stage 0: the signal any of them received, so every pipeline stops at the same step."""
        return signum if self.drivers is None else agree_stop(signum, self._wire_device, self.drivers)

    def stop(self, signum: int = 0) -> None:
        """Stage 0: tell every stage to finish (``signum``: the signal that stopped the run, 0 at the normal end)."""
        self._send(STOP, signum)
        self.drain()

    def drain(self) -> None:
        """Wait for my sends to complete and receive what the next stage still sends, so no message is left."""
        self._receive_all_versions()
        for works, _ in self.sends:
            for work in works:
                work.wait()
        self.sends = []
        for work, _ in self.snapshot_sends:
            work.wait()
        self.snapshot_sends = []
        for work, _ in self.stats_sends:
            work.wait()
        self.stats_sends = []
        self.step_stats(wait=True)  # rank 0: what the runner did not take (a run stopped between log steps)
