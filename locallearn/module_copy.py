"""Copies of modules whose tensors are made by a function: cloned (real or fake alike), or fake (shapes only).

``copy.deepcopy`` cannot copy fake tensors, and a deep copy of a real model under ``FakeTensorMode`` would still
allocate real storage; mapping every parameter and buffer first and letting ``deepcopy`` copy the rest avoids both.
A traced model's ``source`` (the user's module, held as a plain attribute) is mapped too, unused parameters
included, so the copy shares nothing with the original.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import Tensor, nn


def copy_module(module: nn.Module, convert: Callable[[Tensor], Tensor]) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are ``convert(t)`` (parameters stay parameters with
    the same ``requires_grad``)."""
    memo: dict[int, object] = {}
    source = getattr(module, "source", None)
    for owner in (module, *([source] if isinstance(source, nn.Module) else [])):
        for p in owner.parameters():
            if id(p) not in memo:
                memo[id(p)] = nn.Parameter(convert(p), requires_grad=p.requires_grad)
        for b in owner.buffers():
            if id(b) not in memo:
                memo[id(b)] = convert(b)
    return copy.deepcopy(module, memo)


def clone_module(module: nn.Module) -> nn.Module:
    """A deep copy whose tensors are cloned with ``Tensor.clone`` (works for real and fake tensors alike)."""
    return copy_module(module, lambda t: t.detach().clone())


def fake_copy(module: nn.Module, mode) -> nn.Module:
    """A copy of a real ``module`` whose tensors are fake tensors of ``mode`` (same shapes, no storage): for models
    whose constructor cannot run under fake tensors, and for planning without allocating anything."""
    return copy_module(module, mode.from_tensor)
