"""CPU memory allocator settings for PyTorch and ONNX Runtime on Linux (glibc); imports only bsf_nnunet.errors.

PyTorch has no caching allocator on CPU: every activation is a fresh ``malloc`` and glibc serves blocks above its mmap
threshold (at most 32 MB) with a new ``mmap`` and returns them on ``free``. A Swin-UNETR step allocates hundreds of
such blocks (window attention matrices, activations at full resolution), so each step pays page faults for memory
it just gave back: on 2 cores a third of the CPU time of a toy training step went to the kernel.
:func:`tune_cpu_allocator` tells glibc (``mallopt``) to serve large blocks from its heap and to trim it only above
2 GB free, so freed memory is reused: the toy step ran 1.7x faster, a forward 1.9x (docs/performance.md), at the
price of keeping the peak resident (the process does not shrink after it).

``BSF_CPU_MALLOC=0`` keeps glibc's defaults. Other C libraries (musl, macOS) are left alone. The trainers call it
when they train on CPU, and ``nnUNetv2_predict`` when it predicts on CPU; forked workers inherit it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

from .settings import value

MALLOC_ENV = "BSF_CPU_MALLOC"
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_TRIM_ABOVE = 2 ** 31 - 1  # bytes free at the heap's top before glibc gives them back: the largest it takes

_state: dict = {}


def _glibc() -> Optional[ctypes.CDLL]:
    """The process's glibc, or None (another C library, or no ``mallopt``)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc


def cpu_malloc_wanted() -> bool:
    """``BSF_CPU_MALLOC``: ``0`` keeps the C library's defaults; unset or ``1`` tunes it."""
    return value(MALLOC_ENV)


def tune_cpu_allocator() -> str:
    """Make glibc reuse freed large blocks (once per process); returns a line that says what was done."""
    if "line" in _state:
        return _state["line"]
    if not cpu_malloc_wanted():
        line = f"CPU allocator: the C library's defaults ({MALLOC_ENV}=0)"
    else:
        libc = _glibc()
        if libc is None:
            line = "CPU allocator: not glibc, left as it is"
        elif libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE) == 1:
            _state["tuned_libc"] = libc
            line = (f"CPU allocator: glibc reuses freed memory (no mmap per large block, trimming only above 2 GB "
                    f"free): faster steps, the peak stays resident; {MALLOC_ENV}=0 turns this off")
        else:
            line = "CPU allocator: glibc refused mallopt, left as it is"
    _state["line"] = line
    return line


def release_free_cpu_memory() -> None:
    """Give the heap's free pages back to the kernel (``malloc_trim``) when :func:`tune_cpu_allocator` kept them,
    e.g. between training and the final validation, whose buffers differ from the training step's."""
    libc = _state.get("tuned_libc")
    if libc is not None:
        libc.malloc_trim(0)
