"""Keep freed memory in the process on Linux (glibc), for CPU training.

glibc's malloc serves large blocks with mmap and gives them back with munmap as soon as they are
freed, and trims the heap's free top. A training step allocates and frees the same activation
buffers every time, so on the CPU each step pays page faults and the kernel's zeroing of fresh
pages again: the main command spent 1 min 50 s of 5 min 22 s in the kernel. Raising the two
thresholds keeps those pages for the next step. Measured on the main command's recipe
(`recipe=synth_baseline train.epochs=2`, two threads, same machine, alternated): 45.5 s against
51.4-55.0 s per process, bit-identical results (results/synthetic/README.md has the full-run time).
Nothing changes where glibc is not the C library (macOS, Windows, musl): the call is skipped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # <malloc.h>: free heap top kept before it is given back
M_MMAP_THRESHOLD = -3  # <malloc.h>: smallest request served by its own mmap
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # the ceiling of glibc's own dynamic threshold on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024  # keep up to 1 GiB of freed heap top


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when glibc accepted both."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
