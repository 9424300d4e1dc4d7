"""Numeric settings of a vectorised call: fp32, TF32 matrix units, or bf16 autocast.

* ``fp32``: full float32 everywhere (TF32 off for matmul and cuDNN) — the setting under
  which results equal the serial executor's.
* ``tf32``: float32 storage, TF32 tensor cores for matmul and convolutions (CUDA; on the
  CPU the same as fp32).
* ``bf16``: ``torch.autocast`` to bfloat16 for matmul/conv; parameters, updates and the
  optimiser arithmetic stay float32.

Also `keep_freed_memory`: glibc tuning that keeps freed buffers in the process instead of
returning them to the OS (measured: vmap over convolutions otherwise spends as much system
time in page faults on fresh >100 MB buffers as in arithmetic).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from typing import Iterator

import torch

PRECISIONS = ("fp32", "tf32", "bf16")


@contextlib.contextmanager
def precision(mode: str, device_type: str) -> Iterator[None]:
    """Applies `mode` (one of PRECISIONS) for the duration of the block, then restores."""
    if mode not in PRECISIONS:
        raise ValueError(f"unknown precision {mode!r}")
    tf32 = mode != "fp32"
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        if mode == "bf16":
            with torch.autocast(device_type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Tells glibc malloc to serve large blocks from the heap and never trim it, and to make
    no new arenas for threads started from now on (the same as ``MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=<huge> MALLOC_ARENA_MAX=1``), process-wide. A thread's own arena
    grows in heaps of at most 64 MB, so a large block there is mapped and unmapped call after
    call: a vectorised CNN cohort ran 1.65x slower in a second thread. New threads get the main
    heap only while no other arena exists, though: torch's worker threads make one at their
    first parallel operation, and glibc then hands new threads the existing arenas in turn. So
    the heavy work stays in the main thread (a vectorised sweep's shared calls and evaluations).
    Returns False where this is not glibc (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
        ok = ok and libc.mallopt(_M_ARENA_MAX, 1) == 1
        return ok and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
