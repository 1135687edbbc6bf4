"""The C heap of a process that runs a model: keep freed activation memory for the next batch.

A forward pass allocates and frees the same large buffers every batch; with glibc's defaults
they go back to the kernel, and the next batch page-faults on fresh, zeroed pages. Settings
(glibc's ``mallopt``; the ``MALLOC_*_`` variables are read only at process start, too late for
a Ray worker that becomes an actor):

- ``M_MMAP_MAX`` 0: every block comes from the heap, where a freed one waits for the next batch
  (``M_MMAP_THRESHOLD`` stops at 32 MiB, and one conv output of a batch can be larger); glibc
  still maps memory when the heap cannot grow.
- ``M_TRIM_THRESHOLD`` 256 MiB: free memory at the top of the heap is kept between batches.
- ``M_ARENA_MAX`` 1: every thread allocates from the main heap, since glibc shrinks or deletes
  a per-thread arena whenever it empties, whatever the settings above (Ray Data calls the
  actor on a thread of its own). A thread that already has an arena keeps it.

The cost: a process keeps freed memory until it reuses it, which suits one that runs the same
batch shapes over and over. Other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

MMAP_MAX = 0
TRIM_THRESHOLD = 256 * 2**20
ARENA_MAX = 1
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # from glibc's <malloc.h>

_applied = False


def retain_freed_memory() -> bool:
    """Apply the settings above to this process (once); False where the C library is not glibc."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, MMAP_MAX) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
        ok = libc.mallopt(_M_ARENA_MAX, ARENA_MAX) == 1 and ok
    except (OSError, AttributeError) as e:
        log.debug("malloc settings not applied: %s", e)
        return False
    _applied = ok
    if not ok:
        log.debug("glibc refused the malloc settings")
    return ok
