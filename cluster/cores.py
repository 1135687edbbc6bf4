"""Cores of their own for the scoring actors that run their model on CPU.

A scoring actor on a CPU node runs a model with a fixed number of torch threads
beside the decode tasks that feed it. Left to the kernel, the two keep landing
on the same core while another stands idle, so (as CPU inference guides advise:
one model instance per set of cores) each such actor claims cores of its own
and pins itself to them, and the decode tasks keep off claimed cores while
they run.

A claim is a lock (``flock``) on one file per core, in a directory of this
machine's shared memory, held by the actor's process for its lifetime. The
kernel releases it when the process ends, however it ends, so a crashed actor
leaves no stale claim and nothing has to clean up.

Claiming is only safe where this process may use exactly the cores that Ray
counts on its node, as on a machine of one's own or a Kubernetes pod with a
cpuset of its own (``cores_are_ours``). In a container limited by a CPU quota
instead, the affinity mask spans every core of the host, which other pods use
too, and pinning there would stack every pod's actors onto the same cores.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

_held: dict[int, int] = {}  # core -> file descriptor of its lock, kept open while claimed


@functools.cache
def claims_dir() -> Path:
    """Where the lock files live: shared memory when there is some (one per machine or pod)."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    d = base / f"fiqa-cores-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def allowed_cores() -> set[int]:
    """The cores this process may run on."""
    return set(os.sched_getaffinity(0))


def _pin_process(cores: set[int]) -> None:
    """Set the mask of every thread of this process (``sched_setaffinity(0)`` sets only the
    calling thread's, and Ray runs an actor's calls on a thread of their own); threads
    started later inherit it from the thread that starts them."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(int(tid), cores)


def cores_are_ours(node_cpus: float) -> bool:
    """Whether this process may use exactly the cores Ray counts on its node (then pinning
    to some of them cannot collide with another machine's or pod's processes)."""
    return node_cpus > 0 and len(allowed_cores()) == int(node_cpus)


def _try_lock(core: int, kind: int) -> int | None:
    fd = os.open(claims_dir() / f"core-{core}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def claimed_cores() -> set[int]:
    """Cores of this process's mask that a live process has claimed (this one included)."""
    taken = set(_held)
    for core in allowed_cores() - taken:
        fd = _try_lock(core, fcntl.LOCK_SH)  # granted unless someone holds the claim
        if fd is None:
            taken.add(core)
        else:
            os.close(fd)
    return taken


def claim(n: int) -> list[int] | None:
    """Claim ``n`` free cores (highest numbers first) and pin this process to them.

    Returns the cores, or None, leaving the process unpinned, when fewer than
    ``n`` are free or claiming would leave no core unclaimed for the tasks
    that feed the actor. A process claims once; a second call returns its cores.
    """
    if _held:
        return sorted(_held)
    allowed = allowed_cores()
    if n < 1 or n >= len(allowed):
        return None
    got: dict[int, int] = {}
    for core in sorted(allowed, reverse=True):
        fd = _try_lock(core, fcntl.LOCK_EX)
        if fd is not None:
            got[core] = fd
            if len(got) == n:
                break
    if len(got) < n or not allowed - set(got) - claimed_cores():
        for fd in got.values():
            os.close(fd)  # closing the file releases the lock
        return None
    _held.update(got)
    _pin_process(set(got))
    return sorted(got)


@contextlib.contextmanager
def off_claimed_cores() -> Iterator[set[int]]:
    """Run the body on this process's cores that nobody has claimed; the mask is restored
    afterwards (Ray reuses a task's worker process for other work). Yields the cores used:
    all of them when none is claimed, or when every one is."""
    before = allowed_cores()
    free = before - claimed_cores()
    if not free or free == before:
        yield before
        return
    _pin_process(free)
    try:
        yield free
    finally:
        _pin_process(before)
