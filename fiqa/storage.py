"""Where a run's files live: local paths and ``s3://`` URLs behind one small API.

(Over 400 lines on purpose: every storage call of the product goes through this one
module, so that configuration, the commit protocol and retries are written once.)

Everything a run writes (tables, manifests, models, reports, plots, Ray Train
checkpoints) goes through here, so a run directory may be a local folder or
an ``s3://bucket/prefix`` and a new machine resumes a run from the bucket alone.

* **Configuration.** Credentials come only from the standard AWS chain
  (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
  ``AWS_PROFILE`` and ``~/.aws``, instance roles). The optional ``storage.*``
  config section adds the endpoint of an S3-compatible store, the region, the
  addressing style and the retry budget. `configure` makes those the defaults
  of every ``s3://`` filesystem in this process (fsspec's own per-protocol
  defaults) and exports them, never the credentials, to the environment that
  Ray workers inherit (`worker_env`).
* **Commit protocol.** `write_bytes` / `atomic_write` make an object visible
  only when complete: a local file is written under a temporary name and
  renamed; an object store receives one PUT of the whole object (a PUT is
  atomic per object). Multi-object outputs commit with a last object written
  after the others (a stage's ``manifest.json``, a model's ``model.json``).
* **Retries.** Each request is retried by botocore (adaptive mode,
  ``storage.max_attempts``); each whole operation is retried here with
  exponential backoff for ``storage.retry_seconds`` on transient errors
  (connection refused or reset, timeouts, 5xx, throttling). A persistent or
  non-transient error raises `StorageError` naming the object and the cause.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import IO, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from fiqa.config import StorageConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

_config = StorageConfig()
_options: dict[str, Any] = {}
_exported: set[str] = set()  # environment variables `configure` set

# Error codes and HTTP statuses that mean "try again later", not "this is wrong".
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "BandwidthLimitExceeded",
}
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


class StorageError(OSError):
    """A storage operation failed for good; the message names the object and the cause."""


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for local paths and URLs alike."""
    out = base.rstrip("/") if base not in ("/", "") else base
    for p in parts:
        out = f"{out}/{p.strip('/')}" if out else p
    return out


def _s3_options(cfg: StorageConfig) -> dict[str, Any]:
    """s3fs keyword arguments for ``cfg`` (no credentials: botocore finds those itself)."""
    client: dict[str, Any] = {}
    if cfg.endpoint_url:
        client["endpoint_url"] = cfg.endpoint_url
    if cfg.region:
        client["region_name"] = cfg.region
    botocore_cfg: dict[str, Any] = {
        "retries": {"max_attempts": cfg.max_attempts, "mode": "adaptive"},
        "connect_timeout": 10,
        "read_timeout": 60,
    }
    if cfg.addressing_style != "auto":
        botocore_cfg["s3"] = {"addressing_style": cfg.addressing_style}
    # No listings cache: other processes (Ray workers, a previous attempt) write the
    # same prefixes, and a stale listing would hide or resurrect committed parts.
    opts: dict[str, Any] = {"config_kwargs": botocore_cfg, "use_listings_cache": False}
    if client:
        opts["client_kwargs"] = client
    return opts


def configure(cfg: StorageConfig | None) -> None:
    """Make ``cfg`` the storage settings of this process (and of Ray workers started after)."""
    global _config, _options
    _config = cfg or StorageConfig()
    _options = _s3_options(_config)
    # fsspec applies these to every s3 filesystem it creates, so code that opens
    # s3:// URLs without our options (model checkpoints, Ray Data) agrees with us.
    for proto in ("s3", "s3a"):
        fsspec.config.conf[proto] = dict(_options)
    env = worker_env()
    for stale in _exported - set(env):  # exported by an earlier configure, no longer set
        os.environ.pop(stale, None)
    os.environ.update(env)
    _exported.clear()
    _exported.update(env)


def options() -> dict[str, Any]:
    """The s3fs options in force, to hand explicitly to Ray tasks (e.g. ``ScoreJob``)."""
    return json.loads(json.dumps(_options))


def worker_env() -> dict[str, str]:
    """Environment for Ray workers: the non-secret storage settings, never credentials.

    ``FSSPEC_S3`` carries the s3fs defaults (fsspec reads it at import);
    ``AWS_ENDPOINT_URL_S3`` and ``AWS_REGION`` reach libraries that read only
    the environment, such as pyarrow's S3 filesystem under Ray Data.
    """
    env = {"FSSPEC_S3": json.dumps(_options)}
    if _config.endpoint_url:
        env["AWS_ENDPOINT_URL_S3"] = _config.endpoint_url
    if _config.region:
        env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = _config.region
    return env


def filesystem(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding ``url`` and the path of ``url`` on it.

    ``storage_options`` replaces the options of `configure` for a remote ``url``
    (Ray tasks receive the driver's explicitly, e.g. ``ScoreJob.storage_options``);
    without them, an ``s3://`` filesystem gets those of `configure` (in the driver)
    or of ``FSSPEC_S3`` (in Ray workers, through fsspec's defaults).
    """
    if not is_remote(url):
        path = url[len("file://") :] if url.startswith("file://") else url
        return LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    protocol, path = url.split("://", 1)
    if storage_options is None:
        storage_options = _options if protocol in ("s3", "s3a") else {}
    return fsspec.filesystem(protocol, **storage_options), path


def redact(text: str) -> str:
    """``text`` with any credential of the environment replaced by ``***``."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        out.append(e)
        seen.add(id(e))
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return out


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying: connection trouble, timeouts, 5xx, throttling."""
    import botocore.exceptions as bexc

    for e in _chain(exc):
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            return False
        if isinstance(e, bexc.ClientError):
            err = e.response.get("Error", {})
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return err.get("Code") in _TRANSIENT_CODES or status >= 500 or status == 429
        if isinstance(
            e,
            (
                bexc.ConnectionError,  # endpoint refused, connection closed, timeouts
                bexc.HTTPClientError,
                bexc.IncompleteReadError,
                bexc.ResponseStreamingError,
                ConnectionError,
                TimeoutError,
            ),
        ):
            return True
        if isinstance(e, OSError) and e.errno in (errno.EREMOTEIO, errno.ETIMEDOUT, errno.EAGAIN):
            return True
        if type(e).__module__.startswith("aiohttp") and "Connection" in type(e).__name__:
            return True
    return False


def _is_io_error(exc: BaseException) -> bool:
    return any(
        isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("botocore", "aiohttp")
        for e in _chain(exc)
    )


def _cause(exc: BaseException) -> str:
    """The most specific message in the exception chain, without credentials."""
    root = _chain(exc)[-1]
    best = exc if str(exc) else root
    return redact(f"{type(best).__name__}: {best}"[:500])


def retry(fn: Callable[[], T], what: str, op: str = "access") -> T:
    """Call ``fn`` until it succeeds, retrying transient storage errors with backoff.

    Gives up after ``storage.retry_seconds`` with a `StorageError` naming
    ``op`` and ``what`` (the object) and the cause. ``FileNotFoundError``
    passes through unchanged (callers test for absence with it); other
    non-transient errors become a `StorageError` at once.
    """
    start = time.monotonic()
    delay, attempt = 0.5, 0
    while True:
        attempt += 1
        try:
            return fn()
        except FileNotFoundError:
            raise
        except StorageError:
            raise
        except Exception as e:
            elapsed = time.monotonic() - start
            if not _is_io_error(e):  # our own errors (e.g. a bad spec) are not storage's
                raise
            if not is_transient(e):
                hint = ""
                if any(isinstance(c, PermissionError) for c in _chain(e)):
                    hint = (
                        " (access denied: check the credentials, AWS_ACCESS_KEY_ID / "
                        "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and the bucket's policy)"
                    )
                raise StorageError(f"cannot {op} {what}: {_cause(e)}{hint}") from e
            if elapsed + delay > _config.retry_seconds:
                raise StorageError(
                    f"cannot {op} {what}: {_cause(e)} (gave up after {attempt} attempt(s) "
                    f"in {elapsed:.0f} s; storage.retry_seconds={_config.retry_seconds:g})"
                ) from e
            log.warning(
                "storage: %s %s failed (%s); retry %d in %.1f s",
                op,
                what,
                _cause(e),
                attempt,
                delay,
            )
            time.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(delay * 2, 8.0)


def exists(url: str) -> bool:
    """A file, or a directory / prefix holding at least one object."""
    fs, path = filesystem(url)
    return retry(lambda: fs.exists(path), url, "check")


def info(url: str) -> dict:
    fs, path = filesystem(url)
    return retry(lambda: fs.info(path), url, "stat")


def infos(urls: list[str]) -> list[dict]:
    """`info` of many objects, in order. On object storage, one listing per prefix (a
    request per 1,000 objects) replaces a HEAD per object: 10,000 shards are stat-ed in
    seconds rather than minutes. Objects a listing does not show are stat-ed one by one."""
    out: dict[str, dict] = {}
    by_parent: dict[str, list[str]] = {}
    for u in urls:
        if is_remote(u):
            by_parent.setdefault(u.rsplit("/", 1)[0], []).append(u)
    for parent, members in by_parent.items():
        if len(members) < 2:
            continue
        fs, path = filesystem(parent)

        def ls(fs=fs, path=path) -> list[dict]:
            try:
                return fs.ls(path, detail=True, refresh=True)
            except FileNotFoundError:
                return []

        listed = {e["name"].rstrip("/").split("/")[-1]: e for e in retry(ls, parent, "list")}
        for u in members:
            entry = listed.get(u.rsplit("/", 1)[1])
            if entry is not None and entry.get("type") == "file":
                out[u] = entry
    return [out[u] if u in out else info(u) for u in urls]


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return retry(lambda: fs.cat_file(path), url, "read")


def read_text(url: str) -> str:
    return read_bytes(url).decode()


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def _write_local(path: str, write: Callable[[IO[bytes]], None]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(url: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``url`` with ``write(file)`` so that it appears complete or not at all."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        _write_local(path, write)
        return
    buf = io.BytesIO()
    write(buf)
    data = buf.getvalue()
    try:
        retry(lambda: fs.pipe_file(path, data), url, "write")  # one PUT: atomic
    except FileNotFoundError as e:  # a write finds nothing missing but the bucket
        raise StorageError(f"cannot write {url}: {_cause(e)}") from e


def write_bytes(url: str, data: bytes) -> None:
    atomic_write(url, lambda f: f.write(data))


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode())


def write_json(url: str, obj: Any) -> None:
    write_text(url, json.dumps(obj, indent=2, sort_keys=True, default=str))


def put_file(local_path: str, url: str) -> None:
    """Copy a local file to ``url`` (atomically, as `write_bytes`)."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        import shutil

        def copy(f: IO[bytes]) -> None:
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, f)

        _write_local(path, copy)
        return
    try:
        retry(lambda: fs.put_file(local_path, path), url, "write")
    except FileNotFoundError as e:
        raise StorageError(f"cannot write {url}: {_cause(e)}") from e


def rm(url: str, recursive: bool = True) -> None:
    """Remove ``url`` (a file, or a directory / prefix and all under it); absent is fine."""
    fs, path = filesystem(url)

    def remove() -> None:
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    retry(remove, url, "delete")


def listdir(url: str) -> list[str]:
    """Full paths / URLs of the entries directly under ``url``, sorted; [] if it is absent."""
    fs, path = filesystem(url)

    def ls() -> list[str]:
        try:
            return fs.ls(path, detail=False)
        except FileNotFoundError:
            return []

    return _as_urls(retry(ls, url, "list"), url)


def glob(pattern: str) -> list[str]:
    """Full paths / URLs matching ``pattern`` (``*``, ``?``, ``[...]``), sorted; [] if none."""
    fs, path = filesystem(pattern)
    return _as_urls(retry(lambda: fs.glob(path), pattern, "list"), pattern)


def _as_urls(paths: list[str], like: str) -> list[str]:
    """fsspec's paths as full URLs of ``like``'s scheme (it drops ``s3://``), sorted."""
    if is_remote(like):
        scheme = like.split("://", 1)[0]
        paths = [p if "://" in p else f"{scheme}://{p}" for p in paths]
    return sorted(paths)


def publish(local_dir: str, url: str, files: list[str]) -> None:
    """Copy ``files`` of ``local_dir`` to ``url``; the last one is the commit marker.

    The marker is removed first and written last, so a reader that checks the
    marker never sees a mix of an old and a new export.
    """
    rm(join(url, files[-1]), recursive=False)
    rm(url)
    for name in files:
        put_file(os.path.join(local_dir, name), join(url, name))


def ray_storage(url: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``.

    Local: an absolute path and no filesystem. Object storage: the bucket path
    and a pyarrow filesystem over the same s3fs configuration as everything
    else (endpoint, region, addressing, retries); credentials are not part of
    it (each process resolves them itself).
    """
    if not is_remote(url):
        return os.path.abspath(url), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(url)
    return path, PyFileSystem(FSSpecHandler(fs))


def check_reachable(url: str, what: str = "run_dir") -> None:
    """Fail, naming the endpoint, if the store holding ``url`` does not answer within
    ``storage.retry_seconds``; one quick request at a time, so that bound holds (each of a
    run's requests gets ``storage.max_attempts`` tries with backoff, which a wrong endpoint
    would otherwise multiply into minutes)."""
    if not is_remote(url):
        return
    protocol, path = url.split("://", 1)
    quick = options() if protocol in ("s3", "s3a") else {}
    if protocol in ("s3", "s3a"):
        quick["config_kwargs"] = {
            **quick.get("config_kwargs", {}),
            "retries": {"max_attempts": 1, "mode": "standard"},
            "connect_timeout": 3,
            "read_timeout": 5,  # a port that accepts and never answers (a port-forward, say)
        }
    fs = fsspec.filesystem(protocol, skip_instance_cache=True, **quick)
    if hasattr(fs, "retries"):
        fs.retries = 1  # s3fs's own retries of a timed-out read (this instance only)
    endpoint = _config.endpoint_url or os.environ.get(
        "AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL", "AWS's default endpoint")
    )
    start, delay = time.monotonic(), 0.5
    while True:
        try:
            fs.exists(path.rstrip("/") + "/.fiqa-reach-check")
            return
        except Exception as e:
            connection = any(
                "Connect" in type(c).__name__ or isinstance(c, (ConnectionError, TimeoutError))
                for c in _chain(e)
            )
            if not connection:
                return  # it answered (denied, say): the checks after this one say what is wrong
            elapsed = time.monotonic() - start
            said = f"{what} {url}: the object store at {endpoint} does not answer ({_cause(e)})"
            if elapsed + delay > _config.retry_seconds:
                raise StorageError(
                    f"{said}; check storage.endpoint_url (or AWS_ENDPOINT_URL_S3) and that "
                    f"the store is up (tried for {elapsed:.0f} s; storage.retry_seconds="
                    f"{_config.retry_seconds:g})"
                ) from e
            if delay == 0.5:  # the first failure: said once, then the wait
                log.warning("%s; trying for up to %g s", said, _config.retry_seconds)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


def check_writable(url: str, what: str = "run_dir") -> None:
    """Fail fast, with a clear message, if ``url`` cannot be written and deleted."""
    if not is_remote(url):
        try:
            os.makedirs(url, exist_ok=True)
        except OSError as e:
            raise StorageError(f"{what} {url}: cannot create it: {e}") from None
        return
    check_reachable(url, what)
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    probe = join(url, f".fiqa-write-check-{uuid.uuid4().hex[:12]}")
    try:
        write_bytes(probe, b"ok")
        rm(probe, recursive=False)
    except (FileNotFoundError, StorageError) as e:
        if any(isinstance(c, FileNotFoundError) for c in _chain(e)):
            raise StorageError(
                f"{what} {url}: bucket {bucket!r} does not exist (or is not visible to these "
                f"credentials); create it first"
            ) from e
        raise StorageError(f"{what} {url}: not writable: {e}") from e
