"""The C heap on CPU (glibc): what makes a process's resident memory follow its live tensors, or not.

On CPU, PyTorch takes tensor memory from ``malloc``. glibc serves large requests by ``mmap`` and returns them to the
operating system on ``free`` — but after the first such free it raises its mmap threshold to that size (up to 32 MiB
on 64-bit), so later activations of that size come from the heap, whose freed memory stays resident and fragments.
A training step's peak resident set then sits above the peak of its live tensors, and more so the more differently
sized tensors a step frees and allocates: measured on ResNet-101 at 224×224, batch 32 (``docs/benchmarks/memory.md``),
InfoPro+MAN K=4 with recomputed auxiliary nets grew 1845 MiB over one step and 2232 MiB over two, against 1567 MiB
of live tensors at the peak; with a fixed threshold of 256 KiB it grew 1587 MiB, and end-to-end 3905 MiB against
3885 MiB estimated. The price is a page fault for every page of every new large tensor: 15–22 % slower steps on that
machine. So it is a knob (``--train.malloc_mmap_threshold``, ``bench --malloc-mmap-threshold``), off by default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

from locallearn.errors import UserError

M_MMAP_THRESHOLD = -3  # mallopt(3): a fixed threshold, which also turns glibc's dynamic adjustment off
MAX_MMAP_THRESHOLD = 32 * 2**20  # glibc's HEAP_MAX on 64-bit: mallopt refuses anything larger


def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only: musl and macOS have neither
    except (OSError, AttributeError):
        return None
    return libc


def set_mmap_threshold(nbytes: int) -> bool:
    """Serve every allocation of at least ``nbytes`` by its own ``mmap``, returned to the OS when freed, from now
    on. Returns False where the C library is not glibc (nothing changes then).

    Raises:
        ValueError: ``nbytes`` outside 0 .. 32 MiB (glibc's limit).
    """
    if not 0 <= nbytes <= MAX_MMAP_THRESHOLD:
        raise UserError(
            f"malloc_mmap_threshold={nbytes} is outside 0 .. {MAX_MMAP_THRESHOLD} bytes (glibc's limit): "
            "pass e.g. 262144 (256 KiB)"
        )
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))


def release_free_memory() -> None:
    """Drop unreachable Python objects and hand the heap memory freed since back to the OS (glibc
    ``malloc_trim``), so that a later peak of the resident set is not hidden by memory freed earlier."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim(0)
