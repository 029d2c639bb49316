"""The non-finite guard: a block whose loss or gradient norm is NaN or infinite stops the run or skips its step.

``LocalLearner(nonfinite=..., check_every=...)``; ``--train.nonfinite`` and ``--log-every`` in a run. The guard reads
block k's loss and the total norm of its gradients after its backward pass, before its optimizer step. Where the
decision is read decides what a step costs:

* ``check_every=1`` (the Python API's default): on the host, before the step — one device-to-host read per block
  per step, which on a GPU stalls the launch queue every time. The block never steps on a non-finite value; "stop"
  raises :class:`~locallearn.errors.NonFiniteError` at once.
* ``check_every=N`` (N > 1; a run passes its ``--log-every``) or 0: on the device, and no host read in the step (issue
  30). The decision stays a tensor: per block, the count of non-finite steps and the first of them (with its loss)
  accumulate on the device and are read every N steps (0: only when asked — :meth:`NonFiniteGuard.read`, which a run
  calls before every checkpoint and at every epoch's end, and which ``skipped_steps`` and ``state_dict`` call).
  "skip" still skips exactly: the block's parameters and optimizer state are copied before its step and put back
  where the step was non-finite (``torch.where`` on the device; a state tensor the step created is zeroed, which
  is what SGD's momentum and Adam's moments and step count start from); the method's ``after_step`` still runs (MAN's
  EMA copy then moves toward the restored layer, where the host check skips that update too). "stop" lets the block
  step and raises at the next read, naming the block and the first non-finite step; a run saves nothing in between
  (it reads before every checkpoint), so its last checkpoint holds finite weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from locallearn.errors import NonFiniteError


class OptimizerSnapshot:
    """The parameters and tensor state one optimizer steps, copied, to be put back where a step must not count.

    Optimizer state that is not a tensor (a Python step count of some timm optimizers) cannot be put back on the
    device and advances with a skipped step."""

    def __init__(self, opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        self.opt = opt
        self.params = params
        self.saved = [p.detach().clone() for p in params]
        self.state = {  # (param index, key) -> copy; keys that do not exist yet are created by the step
            (i, key): value.clone()
            for i, p in enumerate(params)
            for key, value in opt.state.get(p, {}).items()
            if isinstance(value, Tensor)
        }

    @torch.no_grad()
    def restore_unless(self, ok: Tensor) -> None:
        """Keep the step where ``ok`` (a 0-dim bool tensor) is true; otherwise put everything back. No host read."""
        for p, old in zip(self.params, self.saved):
            p.copy_(torch.where(ok, p, old))
        for i, p in enumerate(self.params):
            for key, value in self.opt.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    old = self.state.get((i, key))
                    value.copy_(torch.where(ok, value, old if old is not None else torch.zeros_like(value)))


class NonFiniteGuard:
    """Per-block records of non-finite steps, on the learner's device (see the module's docstring).

    ``skipped`` is the host-side count of skipped steps per block (``nonfinite="skip"``), brought up to date by
    :meth:`read`. ``where`` in the messages names the process (" on rank 1"; the learner's)."""

    def __init__(self, mode: str, check_every: int, num_blocks: int, device: torch.device) -> None:
        self.mode, self.check_every = mode, check_every
        self.skipped = [0] * num_blocks
        self.count = torch.zeros(num_blocks, dtype=torch.float64, device=device)  # float64: exact to 2^53
        self.first = torch.full((num_blocks,), -1.0, dtype=torch.float64, device=device)
        self.first_loss = torch.zeros(num_blocks, dtype=torch.float64, device=device)
        self.stop_at: tuple[int, int, float] | None = None  # (step, block, loss) of the first non-finite step read

    @property
    def on_device(self) -> bool:
        return self.mode != "off" and self.check_every != 1

    @staticmethod
    def finite(loss: Tensor, norm: Tensor | None) -> Tensor:
        """A 0-dim bool tensor: the loss (and, given, the gradient norm) are finite. No host read."""
        ok = torch.isfinite(loss.detach().float())
        if norm is not None:
            ok = ok & torch.isfinite(norm.to(loss.device).float())
        return ok

    def record(self, k: int, ok: Tensor, loss: Tensor, step: int) -> None:
        """Count block k's step as non-finite where ``ok`` is false; keep the first such step and its loss."""
        bad = ~ok
        take = bad & (self.first[k] < 0)
        self.count[k] += bad.double()
        step_t = self.first[k].new_full((), float(step))  # a fill, not a copy from the host
        self.first[k] = torch.where(take, step_t, self.first[k])
        self.first_loss[k] = torch.where(take, loss.detach().double(), self.first_loss[k])

    def read(self) -> None:
        """One host read of the device records: counts join ``skipped`` ("skip"), the first non-finite step is kept
        in ``stop_at`` ("stop"), and the records start again."""
        count, first, loss = torch.stack([self.count, self.first, self.first_loss]).tolist()
        if not any(count):
            return
        for k, n in enumerate(count):
            if self.mode == "skip":
                self.skipped[k] += int(n)
            if first[k] >= 0 and (self.stop_at is None or first[k] < self.stop_at[0]):
                self.stop_at = (int(first[k]), k, loss[k])
        self.count.zero_()
        self.first.fill_(-1.0)

    def check(self, where: str = "") -> None:
        """:meth:`read`, then under "stop" raise for the first non-finite step found."""
        if not self.on_device:
            return
        self.read()
        if self.mode == "stop" and self.stop_at is not None:
            step, k, loss = self.stop_at
            raise self.error(k, step, loss, where, found_later=True)

    def error(self, k: int, step: int, loss: float, where: str = "", found_later: bool = False) -> NonFiniteError:
        when = (
            f"; found when the guard was read (every {self.check_every} steps, at checkpoints and epoch ends): the run "
            "saved nothing after it"
            if found_later
            else ": its optimizer did not step"
        )
        return NonFiniteError(
            f"block {k} has a non-finite loss or gradient at step {step}{where} (loss {loss:.4g}){when}; lower "
            "--lr, try --amp none, or pass --train.nonfinite=skip to skip such steps (a run's last checkpoint still "
            "holds finite weights)"
        )
