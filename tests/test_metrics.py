"""Memory measurement on CPU: a window's growth leaves out what was resident before it opened."""

import pytest
import torch

from locallearn.metrics import MemoryWindow, memory_in_use

MiB = 2**20
CPU = torch.device("cpu")


def _resident(mib: int) -> torch.Tensor:
    return torch.ones(mib * MiB // 4)  # ones() touches every page, so the tensor is resident


def test_cpu_window_subtracts_its_baseline():
    probe = MemoryWindow(CPU)
    if not probe.exact:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    before = _resident(96)  # resident before the window opens: not the window's
    window = MemoryWindow(CPU)
    small = _resident(4)
    peak, growth = window.close()
    assert peak >= memory_in_use(CPU) - 8 * MiB and peak > 96 * MiB
    assert growth < 48 * MiB, growth / MiB
    window = MemoryWindow(CPU)
    more = _resident(128)
    _, growth = window.close()
    assert growth > 100 * MiB, growth / MiB
    del before, small, more
