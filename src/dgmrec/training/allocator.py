"""Keep freed large buffers in the process heap during training (glibc only; a no-op elsewhere).

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and returns it
with ``munmap`` when freed. A training step that allocates the same few ``n_items x d`` tensors again and again
(115 MB each for 7,050 items x 4,096-d image features) therefore makes the kernel zero and map every page anew
on every step. Serving them from the heap instead, and not trimming the heap when they are freed, lets the next
step reuse the same pages. Numerics are untouched; the memory stays with the process until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_done = False


def reuse_freed_memory() -> bool:
    """Switch glibc malloc to heap-only, untrimmed allocation once per process; True when it took effect."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _done
