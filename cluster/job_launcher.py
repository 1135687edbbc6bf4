"""A `fiqa submit` job's entrypoint: fiqa run by the interpreter the cluster's Ray workers use.

Standard library only, for any Python 3: `fiqa submit` ships this file into the job's
``working_dir`` as ``fiqa_job.py`` and the job runs ``python3 fiqa_job.py ARGS``. The
head's PATH may find another Python than the cluster's (a head started as
``.venv/bin/ray start --head`` from a shell where the venv is not active), so this script
looks for the interpreter of the Ray worker that started the entrypoint (the job
supervisor: the site-packages its ``ray/_raylet.so`` was loaded from, in /proc), checks
that it can import what fiqa needs, and execs ``python -m fiqa.cli ARGS`` with it. When
something is missing, it names what, in which interpreter, and how to fix it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

# What `python -m fiqa.cli` imports on a cluster (pyproject's dependencies, by module name).
REQUIRED = (
    "fiqa",
    "ray",
    "torch",
    "torchvision",
    "timm",
    "pyarrow",
    "fsspec",
    "s3fs",
    "webdataset",
    "numpy",
    "PIL",
    "yaml",
    "scipy",
    "safetensors",
    "matplotlib",
    "tqdm",
)
_RAYLET = re.compile(r"(/\S*)/lib/python(\d+\.\d+)/(?:site|dist)-packages/ray/_raylet[^/]*\.so$")
_CHECK = (
    "import importlib.util as u, sys\n"
    "print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))"
)


def python_of_raylet_maps(maps: str) -> list[str]:
    """Candidate interpreters for a process whose memory maps (``/proc/PID/maps``) hold
    Ray's ``_raylet`` extension: the ``bin/`` pythons of the environment it came from."""
    for line in maps.splitlines():
        m = _RAYLET.search(line.strip())
        if m:
            prefix, version = m.group(1), m.group(2)
            return [f"{prefix}/bin/python{v}" for v in (version, "3", "")]
    return []


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def ray_worker_python(pid: int | None = None, depth: int = 4) -> str | None:
    """The interpreter of the nearest ancestor that is a Ray worker (Linux; None elsewhere)."""
    pid = os.getppid() if pid is None else pid
    for _ in range(depth):
        if not pid or pid <= 1:
            return None
        try:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()
        except OSError:
            return None
        found = python_of_raylet_maps(maps)
        if found:
            try:  # a user-site install: the interpreter itself (symlinks resolved)
                found.append(os.readlink(f"/proc/{pid}/exe"))
            except OSError:
                pass
            for python in found:
                if os.path.isfile(python) and os.access(python, os.X_OK):
                    return python
            return None
        pid = _parent(pid)
    return None


def missing_modules(python: str, modules: tuple[str, ...] = REQUIRED) -> list[str]:
    """The ``modules`` that ``python`` cannot import (all of them if it does not run)."""
    try:
        out = subprocess.run(
            [python, "-c", _CHECK, *modules], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.SubprocessError):
        return list(modules)
    if out.returncode != 0:
        return list(modules)
    return out.stdout.split()


def explain(python: str, how: str, missing: list[str]) -> str:
    fiqa_only = missing == ["fiqa"]
    fix = (
        "fiqa itself is missing: submit without --no-ship-code, or install fiqa in the "
        "cluster's image"
        if fiqa_only
        else "install fiqa's dependencies into the cluster's environment (its image, or "
        "`pip install -c requirements.lock .`), or start the head from the environment "
        "that has them (e.g. `source .venv/bin/activate` before `ray start --head`)"
    )
    return f"fiqa job: {python} ({how}) cannot import {', '.join(missing)}.\nTo fix it, {fix}."


def main(argv: list[str]) -> int:
    python = ray_worker_python()
    how = "the interpreter of the cluster's Ray workers"
    if python is None:
        python = sys.executable
        how = "the head's python3 on its PATH; the Ray workers' interpreter was not found"
    missing = missing_modules(python)
    if missing:
        print(explain(python, how, missing), file=sys.stderr, flush=True)
        return 1
    sys.stdout.flush()
    os.execv(python, [python, "-m", "fiqa.cli", *argv])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
