"""Export a trained network for deployment: ``torch.export`` (``.pt2``) or ONNX, checked against the checkpoint.

``locallearn export --checkpoint C --format {exported,onnx} --out F`` (issue 29 item 3) writes the user's plain
network — the backbone alone, no auxiliary part — with a dynamic batch dimension, then loads what it wrote and runs
it on a test batch beside the checkpoint's network: the largest absolute difference of the outputs is reported, and
an export that differs beyond float tolerance is refused (nothing is left at ``F``). ONNX needs the optional
``onnx`` and ``onnxscript`` packages (``pip install 'locallearn[export]'``; torch's dynamo exporter) and is checked with
``onnxruntime`` when that is installed.

With ``--early-exit T`` the early-exit network (:mod:`locallearn.early_exit`) is written instead, as a directory:
its exits are data-dependent (samples leave the batch at a head), which one static graph cannot hold, so each block
and each auxiliary classifier is exported as a graph of its own (``block{k}``, ``head{k}``) beside ``exits.json``
(threshold, order, format). :func:`load_early_exit` runs such a directory with the same exit rule; the check
compares it with :meth:`LocalLearner.early_exit` on the test batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from locallearn.checkpoint import restore_learner
from locallearn.early_exit import exit_rule
from locallearn.errors import UserError

FORMATS = {"exported": ".pt2", "onnx": ".onnx"}
TOLERANCE = 1e-4  # largest absolute output difference accepted (float32 kernels may reassociate sums)
# ONNX files are protobufs, limited to 2 GiB: below this the weights go inside the one file (written beside it and
# renamed, like every other output); above it they go to F.data beside F, written in place.
ONNX_INLINE_LIMIT = 1536 * 2**20


class _Head(nn.Module):
    """Block k's auxiliary classifier as a module of its own (``method.aux_logits(k, ·)``), for export."""

    def __init__(self, method: nn.Module, k: int) -> None:
        super().__init__()
        self.method, self.k = method, k

    def forward(self, h: Tensor) -> Tensor:
        return self.method.aux_logits(self.k, h)


def _onnx_modules() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError(
            "--format onnx needs the onnx and onnxscript packages: pip install 'locallearn[export]'"
        ) from None


def _write(module: nn.Module, example: Tensor, path: Path, fmt: str) -> None:
    """``module`` exported to ``path`` with a dynamic batch dimension (written beside it, then renamed)."""
    dims = ({0: torch.export.Dim("batch", min=1, max=1 << 20)},)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if fmt == "exported":
            torch.export.save(torch.export.export(module, (example,), dynamic_shapes=dims), tmp)
        else:  # the exporter prints its progress: to stderr, so that stdout stays the command's JSON report
            inline = sum(t.numel() * t.element_size() for t in module.state_dict().values()) < ONNX_INLINE_LIMIT
            target = tmp if inline else path  # external weights are named after the file: written in place
            with contextlib.redirect_stdout(sys.stderr):
                torch.onnx.export(module, (example,), str(target), dynamic_shapes=dims, dynamo=True, verbose=False,
                                  external_data=not inline)  # fmt: skip
            if not inline:
                return
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _runner(path: Path, fmt: str):
    """A callable running the exported file on a tensor (None for ONNX without onnxruntime)."""
    if fmt == "exported":
        return torch.export.load(path).module()
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])


def load_early_exit(directory: str | Path):
    """An early-exit directory written by ``locallearn export --early-exit`` (``exported`` format) as a callable
    ``x -> (logits, exit block per sample)``, with :class:`locallearn.early_exit.EarlyExit`'s rule."""
    directory = Path(directory)
    spec = json.loads((directory / "exits.json").read_text())
    if spec["format"] != "exported":
        raise UserError(f"{directory} holds {spec['format']} graphs: run them with their runtime (exits.json)")
    blocks = [torch.export.load(directory / f"block{k}.pt2").module() for k in range(spec["blocks"])]
    heads = {k: torch.export.load(directory / f"head{k}.pt2").module() for k in spec["heads"]}
    threshold = spec["threshold"]

    @torch.no_grad()
    def run(x: Tensor) -> tuple[Tensor, Tensor]:
        return exit_rule(blocks, lambda k, h: heads[k](h) if k in heads else None, x, threshold)

    return run


def export_checkpoint(
    checkpoint: str | Path,
    fmt: str,
    out: str | Path,
    *,
    early_exit: float | None = None,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Export a checkpoint's network (or its early-exit network) to ``out`` and check it; returns the report."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _onnx_modules()
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} exists: choose another --out, or delete it first (nothing is overwritten)")
    learner, cfg, test_loader = restore_learner(checkpoint, data_dir=data_dir, device="cpu")
    learner.model.eval()
    learner.method.eval()
    example = next(iter(test_loader)).x[:8]
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "format": fmt, "out": str(out), "checked_on": "test batch"}
    if early_exit is None:
        _write(learner.model, example, out, fmt)
        run = _runner(out, fmt)
        with torch.no_grad():
            expected = learner.model(example)
            got = run(example) if run is not None else None
    else:
        module = learner.early_exit(early_exit)
        out.mkdir(parents=True)
        try:
            heads = _write_early_exit(learner, example, out, fmt, early_exit)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        report["heads"] = heads
        expected, expected_exits = module(example)
        got = None
        if fmt != "exported":
            report["checked_on"] = "not checked: the early-exit graphs are run and checked in the exported format"
            report["max_abs_difference"] = None
            return report
        if fmt == "exported":
            got, exits = load_early_exit(out)(example)
            if not torch.equal(exits, expected_exits):
                shutil.rmtree(out, ignore_errors=True)
                raise UserError("the exported early-exit network chose other exits than the checkpoint's: not kept")
    if got is None:
        report["max_abs_difference"] = None
        report["checked_on"] = "not checked: install onnxruntime to run the ONNX file"
        return report
    diff = float((got.float() - expected.float()).abs().max())
    report["max_abs_difference"] = diff
    if not diff <= TOLERANCE:
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        raise UserError(
            f"the exported network's outputs differ from the checkpoint's by {diff:.3g} (> {TOLERANCE}): not kept"
        )
    return report


def _write_early_exit(learner, example: Tensor, out: Path, fmt: str, threshold: float) -> list[int]:
    """One graph per block and per auxiliary classifier, and exits.json; returns the blocks that have a head."""
    suffix, heads, h = FORMATS[fmt], [], example
    last = len(learner.blocks) - 1
    with torch.no_grad():
        for k, block in enumerate(learner.blocks):
            _write(block, h, out / f"block{k}{suffix}", fmt)
            h = block(h)
            if k < last and learner.method.aux_logits(k, h) is not None:
                _write(_Head(learner.method, k), h, out / f"head{k}{suffix}", fmt)
                heads.append(k)
    spec = {"format": fmt, "threshold": threshold, "blocks": last + 1, "heads": heads}
    spec["input_shape"] = list(example.shape[1:])
    (out / "exits.json").write_text(json.dumps(spec, indent=1) + "\n")
    return heads
