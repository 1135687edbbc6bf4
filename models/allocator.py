"""The C heap of a process that runs a model: keep freed activation memory for the next batch.

A forward pass allocates and frees the same large activation buffers every
batch. With glibc's default malloc settings those buffers are handed back to
the kernel when freed (unmapped, or trimmed off the top of the heap), so the
next batch touches fresh pages: each 4 KiB page costs a page fault and the
kernel zeroes it. For a small CNN on CPU that is a large part of the gap to
the model's own speed. Measured on the demo student (mobilenetv3_small_100,
112 px, batch 64, one thread): 9,000 to 18,000 faults per batch with glibc's
defaults, none in a `Scorer` (`tests/test_allocator.py` counts them). With
the arena setting below and one-pass input normalisation on top, the scoring
pipeline's steady state went from 0.74 to 0.87 of the model-only speed
(benchmarks/RESULTS.md, runs 7 and 8).

The settings are those of glibc's ``mallopt`` (also reachable as the
``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables,
read only when a process starts: a Ray worker is already running when it
becomes an actor):

- ``M_MMAP_MAX`` at 0: no block comes from mmap, whatever its size; every block
  comes from the heap, where a freed one is there for the next batch. (The
  other way, ``M_MMAP_THRESHOLD``, stops at 32 MiB, and larger activations are
  common: one conv output of the demo teacher, resnet10t at 112 px and batch
  64, is 51 MB. With that threshold at 32 MiB the teacher's actor took about
  97,000 page faults a second and ran 15 to 20 % below the model's own speed;
  a bare forward pass, 12,500 faults and 10 % slower a batch. glibc still maps
  memory when the heap cannot grow, so an allocation never fails for this.)
- ``M_TRIM_THRESHOLD`` at 256 MiB: free memory at the top of the heap is kept
  up to that amount instead of being returned after every batch;
- ``M_ARENA_MAX`` at 1: every thread allocates from the main heap. With
  glibc's defaults a thread that finds the heap's lock taken (Ray's own
  threads allocate all the time, and Ray Data calls the actor on a thread of
  its own) gets a heap of its own (an arena), which glibc deletes or shrinks
  whenever it empties, whatever the two settings above say: measured in a
  scoring actor of the demo student, 13,000 to 26,000 page faults a second in
  steady state, about 70 with one arena. A model process has one thread that
  allocates much, so the single heap's lock is not contended for long. A thread
  that already has a heap of its own when this is called keeps it.

The cost is that a process keeps freed memory it could have returned: up to
256 MiB at the top of the heap, and any freed block below a live one (a large
block used to be unmapped when freed), until a later allocation reuses it. That
is what a process that runs the same batch shapes over and over wants: its
heap grows to the largest batch's working set and stays there (the maximum RSS
of a bare forward pass of the teacher was the same, 924 to 955 MB, with and
without the mmap setting). Other C libraries (musl, macOS) are left alone.
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
