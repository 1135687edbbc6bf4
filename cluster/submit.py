"""Runs as Ray jobs on an existing cluster: the library under ``fiqa submit``, ``jobs`` and ``stop``.

``fiqa submit`` talks to the cluster's Jobs API (the dashboard, port 8265)
through Ray's ``JobSubmissionClient``. What a job needs travels in its
``runtime_env``:

* the config, resolved (``--set`` applied, validated by ``fiqa submit`` so a bad config
  fails before anything is submitted), as ``config.yaml`` in a small
  ``working_dir``; the job's entrypoint is ``python3 fiqa_job.py run config.yaml``
  (or ``stage NAME config.yaml``) run from that directory. ``fiqa_job.py``
  (`fiqa.cluster.job_launcher`, standard library only) runs ``python -m fiqa.cli``
  with the interpreter the cluster's Ray workers use, not whichever Python the
  head's PATH finds first, and names what is missing when that interpreter lacks
  fiqa's dependencies;
* the code: a copy of the ``fiqa`` package as a ``py_modules`` entry, so the
  job runs the code that validated the config even when the cluster's image
  holds an older release (``--no-ship-code`` runs the image's installed copy
  instead). Third-party dependencies come from the image.

Local paths in the config are made absolute before shipping, because the job
runs in the unpacked ``working_dir``, not where ``fiqa submit`` ran; they must
be paths the cluster sees (on Kubernetes, use ``s3://`` URLs).

The submission id names the run: ``fiqa-<run name>-<stage or all>-<hash of
run_dir>``, and ``-2``, ``-3``... for later attempts, since Ray never reuses an
id. A run has at most one active job: submitting the same run and config
again while a job is pending or running attaches to it; anything else for
that run_dir is refused until that job ends. Resubmitting a finished,
failed or stopped run starts a new attempt, which resumes it (finished
stages are skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

import fiqa
from fiqa.config import ConfigError, RunConfig

DEFAULT_DASHBOARD_PORT = 8265
ACTIVE = ("PENDING", "RUNNING")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
CONNECT_TIMEOUT_S = 5.0
POLL_S = 2.0
# fiqa's folders that setuptools maps onto sub-packages (pyproject's
# package-dir); the others (fiqa.data) live inside the fiqa/ folder itself.
MAPPED_SUBPACKAGES = ("models", "pipelines", "cluster")
# Keys whose values are local paths or shard specs (str or list of str).
PATH_KEYS = (
    ("run_dir",),
    *(("data", k) for k in ("labeled_train", "labeled_val", "test", "unlabeled_1", "unlabeled_2")),
    ("data", "unlabeled_1_truth"),
    ("data", "unlabeled_2_truth"),
    ("teacher", "pretrained_weights"),
    ("student", "pretrained_weights"),
)


class ClusterError(RuntimeError):
    """The cluster cannot be reached, or its Jobs API refused a request."""


# ---------------------------------------------------------------------------
# Addresses and the client


def dashboard_url(address: str) -> str:
    """``host``, ``host:port`` or ``http(s)://host[:port]`` → the Jobs API base URL."""
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = "http://" + address
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"address {address!r}: give the Ray dashboard's URL, e.g. "
            f"http://HEAD:{DEFAULT_DASHBOARD_PORT} (not a ray:// or GCS address)"
        )
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"address {address!r}: bad port") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port or DEFAULT_DASHBOARD_PORT}{parts.path}"


def resolve_address(flag: str | None, config_address: str | None = None) -> str:
    """The dashboard URL: ``--address``, else ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS``
    (Ray's own variables), else ``ray.address`` when it is an http(s) URL."""
    for value in (
        flag,
        os.environ.get("RAY_API_SERVER_ADDRESS"),
        os.environ.get("RAY_ADDRESS"),
        config_address if config_address and config_address.startswith("http") else None,
    ):
        if value:
            return dashboard_url(value)
    raise ConfigError(
        "no Ray address: pass --address http://HEAD:8265 or set RAY_ADDRESS "
        "(for a KubeRay cluster: kubectl port-forward svc/<cluster>-head-svc 8265:8265)"
    )


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str, headers: dict[str, str] | None = None):
    """A ``JobSubmissionClient`` for the dashboard at ``address`` (a URL from
    :func:`resolve_address`), failing within seconds when nothing answers there."""
    import requests

    try:  # Ray's client sends its first request without a timeout: probe first
        requests.get(f"{address}/api/version", timeout=(CONNECT_TIMEOUT_S, 2 * CONNECT_TIMEOUT_S))
    except requests.RequestException as e:
        raise ClusterError(
            f"no Ray dashboard answers at {address} ({type(e).__name__}). Is the cluster "
            f"up, and is its dashboard port ({DEFAULT_DASHBOARD_PORT}) forwarded?"
        ) from None

    from ray.job_submission import JobSubmissionClient

    # The client lets RAY_ADDRESS override the address it is given; ours
    # already took it into account, and an explicit --address must win.
    try:
        with _without_env("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # ConnectionError, AuthenticationError, RuntimeError
        hint = ""
        if "uthenticat" in str(e):
            hint = (
                " The cluster uses token authentication: set RAY_AUTH_MODE=token and "
                "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to its token."
            )
        raise ClusterError(f"the Ray Jobs API at {address} refused: {e}{hint}") from None


# ---------------------------------------------------------------------------
# What a job is made of


def _slug(text: str, limit: int = 32) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "run"


def _is_local(path: str) -> bool:
    return "://" not in path


def job_config(cfg: RunConfig) -> dict[str, Any]:
    """The config as the job gets it: local paths absolute, no ``ray.address``
    (the job's driver joins its own cluster through the ``RAY_ADDRESS`` the
    Jobs API sets)."""
    d = cfg.to_dict()
    for key in PATH_KEYS:
        node = d
        for part in key[:-1]:
            node = node[part]
        value = node[key[-1]]
        if isinstance(value, str) and value and _is_local(value):
            node[key[-1]] = os.path.abspath(value)
        elif isinstance(value, list):
            node[key[-1]] = [os.path.abspath(v) if _is_local(v) else v for v in value]
    d["ray"]["address"] = None
    return d


def config_fingerprint(shipped: dict[str, Any]) -> str:
    return hashlib.sha256(yaml.safe_dump(shipped, sort_keys=True).encode()).hexdigest()[:16]


def selection(stage: str | None, until: str | None = None) -> str:
    """What a job runs: ``all``, one stage's name, or ``until <stage>``."""
    return stage or (f"until {until}" if until else "all")


def submission_base_id(run_dir: str, stage: str | None, until: str | None = None) -> str:
    """``fiqa-<run name>-<stage, all or until-stage>-<8 hex of run_dir>``: the same run and
    selection, the same id."""
    run_dir = run_dir.rstrip("/")
    digest = hashlib.sha256(run_dir.encode()).hexdigest()[:8]
    name = _slug(run_dir.rsplit("/", 1)[-1])
    what = selection(stage, until).replace("_", "-").replace(" ", "-")
    return f"fiqa-{name}-{what}-{digest}"


# The job's launcher, as shipped in its working_dir (see fiqa.cluster.job_launcher).
LAUNCHER = "fiqa_job.py"


def entrypoint(
    stage: str | None, config_name: str = "config.yaml", until: str | None = None
) -> str:
    if stage:
        return f"python3 {LAUNCHER} stage {stage} {config_name}"
    return f"python3 {LAUNCHER} run {config_name}" + (f" --until {until}" if until else "")


def package_code(dest: str | Path) -> Path:
    """Copy the importable ``fiqa`` package, with every sub-package in place, to
    ``dest/fiqa`` (in a checkout, models/ pipelines/ cluster/ are separate folders)."""
    root = Path(dest) / "fiqa"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(Path(fiqa.__file__).parent, root, ignore=ignore)
    for name in MAPPED_SUBPACKAGES:
        src = Path(importlib.import_module(f"fiqa.{name}").__file__).parent
        target = root / name
        if not target.exists():
            shutil.copytree(src, target, ignore=ignore)
    return root


def build_runtime_env(
    shipped: dict[str, Any], workdir: str | Path, ship_code: bool = True
) -> dict[str, Any]:
    """Write the job's files under ``workdir`` and return its ``runtime_env``."""
    workdir = Path(workdir)
    job_dir = workdir / "job"
    job_dir.mkdir(parents=True)
    (job_dir / "config.yaml").write_text(yaml.safe_dump(shipped, sort_keys=False))
    shutil.copyfile(Path(__file__).with_name("job_launcher.py"), job_dir / LAUNCHER)
    env: dict[str, Any] = {
        "working_dir": str(job_dir),
        "env_vars": {"PYTHONUNBUFFERED": "1"},  # logs reach `--follow` as they happen
    }
    if ship_code:
        env["py_modules"] = [str(package_code(workdir / "code"))]
    return env


# ---------------------------------------------------------------------------
# Submitting, attaching, waiting


def _attempts(jobs: list, base: str) -> list:
    pattern = re.compile(rf"{re.escape(base)}(-\d+)?")
    return [j for j in jobs if j.submission_id and pattern.fullmatch(j.submission_id)]


def _next_id(jobs: list, base: str) -> str:
    numbers = [
        int(j.submission_id.rsplit("-", 1)[1]) if j.submission_id != base else 1
        for j in _attempts(jobs, base)
    ]
    return base if not numbers else f"{base}-{max(numbers) + 1}"


def submit_run(
    client,
    cfg: RunConfig,
    stage: str | None = None,
    ship_code: bool = True,
    until: str | None = None,
) -> tuple[str, bool]:
    """Submit ``cfg`` (one ``stage``, the stages ``until`` one, or all) as a job; returns
    (submission id, attached), attached being True when the same job was already active."""
    if stage and until:
        raise ValueError("a job runs one stage or the stages until one, not both")
    shipped = job_config(cfg)
    run_dir = shipped["run_dir"]
    fingerprint = config_fingerprint(shipped)
    base = submission_base_id(run_dir, stage, until)
    metadata = {
        "fiqa_run_dir": run_dir,
        "fiqa_stage": selection(stage, until),
        "fiqa_config": fingerprint,
    }
    for _ in range(3):  # another submitter may take the id between listing and submitting
        jobs = client.list_jobs()
        for job in jobs:
            meta = job.metadata or {}
            if status_name(job.status) in ACTIVE and meta.get("fiqa_run_dir") == run_dir:
                if meta.get("fiqa_stage") == metadata["fiqa_stage"] and (
                    meta.get("fiqa_config") == fingerprint
                ):
                    return job.submission_id, True
                raise ClusterError(
                    f"run {run_dir} already has an active job {job.submission_id} "
                    f"({status_name(job.status)}, stage {meta.get('fiqa_stage')}, "
                    f"{'same' if meta.get('fiqa_config') == fingerprint else 'another'} config); "
                    f"wait for it to end, or stop it: fiqa stop {job.submission_id}"
                )
        submission_id = _next_id(jobs, base)
        with tempfile.TemporaryDirectory(prefix="fiqa-submit-") as tmp:
            runtime_env = build_runtime_env(shipped, tmp, ship_code=ship_code)
            try:
                return (
                    client.submit_job(
                        entrypoint=entrypoint(stage, until=until),
                        submission_id=submission_id,
                        runtime_env=runtime_env,
                        metadata=metadata,
                    ),
                    False,
                )
            except RuntimeError as e:
                if "already" not in str(e):
                    raise ClusterError(f"the cluster refused the job: {e}") from None
    raise ClusterError(f"could not find a free submission id for {base}")


def status_name(value: Any) -> str:
    """A job's status as a plain string (``JobStatus`` is a str enum)."""
    return str(getattr(value, "value", value))


def wait_for(client, submission_id: str, quiet: bool = False) -> str:
    """Poll until the job ends; report each status change on stderr; return the status."""
    last = None
    while True:
        status = status_name(client.get_job_status(submission_id))
        if status != last and not quiet:
            print(f"{submission_id}: {status}", file=sys.stderr, flush=True)
            last = status
        if status in TERMINAL:
            return status
        time.sleep(POLL_S)


def follow(client, submission_id: str) -> str:
    """Stream the job's logs to stdout until it ends; return its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # the stream broke before the job ended: fall back to polling
        print(f"log stream closed ({e}); waiting for the job", file=sys.stderr)
    return wait_for(client, submission_id, quiet=True)
