"""What the console shows: the project's own lines by default, Ray's as well with ``-v``.

By default a run prints its stages, progress and results, and Ray's Python loggers print
warnings only. Ray writes everything to its session's log directory anyway (the console
names it once, `ray_logs_note`), so what is dropped here is not lost:

* Ray's knobs where Ray has one: the ``ray`` logger's level, Ray Data's console handler
  and ``DataContext.print_on_execution_start``, Ray Train's `ray.train.LoggingConfig`
  (`train_logging_config`);
* lines other Ray processes stream to the driver go through Ray's log deduplicator, which
  drops what matches ``RAY_DEDUP_LOGS_SKIP_REGEX`` (set here before Ray is imported);
* Ray's C++ core worker in this process writes to file descriptor 2 directly:
  `NativeStderrFilter` passes those writes through a pipe that drops `RAY_NOISE`.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading

# Lines Ray prints that need no action from a user. Each is a regular expression searched in
# one line.
RAY_NOISE = (
    # Ray's own actors (Ray Data's actor pools, Ray Train's PreemptionWatcher) are restartable
    # and take their arguments from the object store; Ray warns about that as an error.
    r"core_worker\.cc:\d+: Actor with class name: .* max_restarts > 0",
    # Ray Data, once per dataset and process
    r"Dataset \S+ execution finished in",
    r"Starting execution of Dataset ",
    r"Execution plan of Dataset ",
    r"Progress bars disabled\. To enable",
    # Ray Train's data manager uses an option Ray Data deprecated (warning and source line)
    r"RayDeprecationWarning: `ExecutionOptions\.exclude_resources`",
    r"^\s*self\.exclude_resources = exclude_resources\s*$",
    # Ray Train, once per epoch: the whole report, and the checkpoint's path
    r"Reporting training result \d+: TrainingReport\(",
    r"Checkpoint successfully created at: ",
    # A local Ray's default since 2.5x, said by every command that starts one
    r"Token authentication is enabled for this Ray cluster\. Set RAY_AUTH_MODE",
)
NOISE = re.compile("|".join(f"(?:{p})" for p in RAY_NOISE))

_verbose = False  # set by `configure`; read when Ray and Ray Train are set up
CONSOLE_HANDLER = "fiqa-console"


def verbose() -> bool:
    """Whether Ray's own output is wanted on the console (``fiqa -v``)."""
    return _verbose


def is_noise(line: str) -> bool:
    return NOISE.search(line) is not None


class NoiseFilter(logging.Filter):
    """Drops `RAY_NOISE` records (for Ray's console handlers in this process)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_noise(record.getMessage())


class ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS message``; the level is named when it is a warning or worse."""

    def __init__(self, with_names: bool = False):
        super().__init__(datefmt="%H:%M:%S")
        self.with_names = with_names

    def format(self, record: logging.LogRecord) -> str:
        head = self.formatTime(record, self.datefmt)
        if record.levelno >= logging.WARNING:
            head += f" {record.levelname}"
        if self.with_names:
            head += f" {record.name}:"
        text = f"{head} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure(verbose: bool, starts_ray: bool = False) -> None:
    """The console of one command: log format and levels; Ray's noise filtered unless verbose.

    ``starts_ray``: the command starts or joins Ray in this process; then, unless verbose,
    what Ray streams and writes natively is filtered too. Call before Ray is imported.
    """
    global _verbose
    _verbose = verbose
    if starts_ray and not verbose:
        skip_streamed_noise()
        NativeStderrFilter.install()
    handler = logging.StreamHandler()  # (sys.stderr as it is now: after the filter's swap)
    handler.setFormatter(ConsoleFormatter(with_names=verbose))
    handler.set_name(CONSOLE_HANDLER)
    root = logging.getLogger()
    for h in [h for h in root.handlers if h.get_name() == CONSOLE_HANDLER]:
        root.removeHandler(h)  # an earlier command's, in the same process (tests)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("fiqa").setLevel(logging.DEBUG if verbose else logging.INFO)
    # botocore (aiobotocore under s3fs) says at INFO where it found credentials, on every
    # command that reads a bucket
    for name in ("botocore", "aiobotocore"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def skip_streamed_noise() -> None:
    """Have Ray's log deduplicator drop `RAY_NOISE` lines streamed from other processes.

    Ray reads these variables when it is imported, so this runs before. The worker-line
    prefix, ``(RayTrainWorker pid=...)``, goes too: it names Ray's processes, not the run's.
    """
    if "ray" in sys.modules:
        logging.getLogger(__name__).debug("Ray already imported: streamed lines not filtered")
    user = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX")
    if not user:
        os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = NOISE.pattern
    elif NOISE.pattern not in user:  # once: commands run again in one process (tests)
        os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = f"{user}|{NOISE.pattern}"
    os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")


def quiet_ray_in_driver() -> None:
    """Before ``ray.init``: Ray's loggers in this process show warnings only, Ray Data prints
    no execution plans (nor in the processes it runs datasets in); its log files keep
    everything."""
    import ray.data  # (importing Ray sets up its loggers: adjusted after)

    ctx = ray.data.DataContext.get_current()
    ctx.print_on_execution_start = _verbose
    if _verbose:
        return
    logging.getLogger("ray").setLevel(logging.WARNING)
    # Said while ray.init leaves Ray's loggers without handlers (Python's last resort prints
    # it), so filtered where it is logged.
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, NoiseFilter) for f in auth.filters):
        auth.addFilter(NoiseFilter())
    for h in logging.getLogger("ray.data").handlers:
        # The console handler; the file handlers (ray-data*.log) keep their level.
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(logging.WARNING)
            h.addFilter(NoiseFilter())


def train_logging_config() -> object | None:
    """Ray Train's `LoggingConfig` for a trainer's `RunConfig`: per-report and checkpoint lines
    at INFO stay in Ray Train's log files unless verbose; None where Ray Train has none."""
    import ray.train

    config = getattr(ray.train, "LoggingConfig", None)  # (Ray Train v2 only)
    return config(log_level="INFO" if _verbose else "WARNING") if config else None


def ray_logs_note(session_dir: str | None) -> str | None:
    """The one line saying where Ray's full logs are (None when verbose: they are on screen)."""
    if _verbose or not session_dir:
        return None
    return f"Ray's own logs: {os.path.join(session_dir, 'logs')} (fiqa -v shows them here)"


def drop_noise(chunk: bytes) -> bytes:
    """``chunk`` without its complete lines that are `RAY_NOISE`; anything else as it came."""
    if b"\n" not in chunk:
        return chunk
    kept = [
        line
        for line in chunk.splitlines(keepends=True)
        if not (line.endswith(b"\n") and is_noise(line.decode("utf-8", "replace")))
    ]
    return b"".join(kept)


class NativeStderrFilter:
    """File descriptor 2 becomes a pipe whose reader forwards all but `RAY_NOISE` lines.

    Only native writes (Ray's C++ core worker) take that path: ``sys.stderr`` is re-opened on
    the terminal's descriptor, so Python's output is not delayed and ``isatty()`` still holds.
    """

    _installed: NativeStderrFilter | None = None

    def __init__(self) -> None:
        self.terminal = os.dup(2)
        read, write = os.pipe()
        self.read = read
        self.stream_before = sys.stderr
        sys.stderr.flush()
        os.dup2(write, 2)
        os.close(write)
        self.thread = threading.Thread(target=self._pump, name="fiqa-stderr-filter", daemon=True)
        self.thread.start()
        sys.stderr = os.fdopen(
            self.terminal,
            "w",
            buffering=1,
            encoding=getattr(self.stream_before, "encoding", None) or "utf-8",
            errors="backslashreplace",
            closefd=False,
        )

    @classmethod
    def install(cls) -> None:
        if cls._installed is not None:
            return
        try:
            if sys.stderr.fileno() != 2:
                return  # Python's stderr was redirected (a test, an embedding app): leave it be
        except (AttributeError, OSError, ValueError):
            return
        try:
            cls._installed = cls()
        except OSError:  # no descriptor 2 to filter (a daemon, a closed stderr)
            return
        # atexit runs the last registered first: Ray's exit (registered when Ray is imported,
        # after this) is still filtered, then this restores descriptor 2.
        atexit.register(cls.uninstall)

    @classmethod
    def uninstall(cls) -> None:
        f = cls._installed
        if f is None:
            return
        cls._installed = None
        sys.stderr.flush()
        os.dup2(f.terminal, 2)  # the pipe's last writer is gone: the pump drains it and ends
        f.thread.join(timeout=2)
        sys.stderr = f.stream_before

    def _pump(self) -> None:
        while True:
            try:
                chunk = os.read(self.read, 1 << 16)
            except OSError:
                return
            if not chunk:
                os.close(self.read)
                return
            out = memoryview(drop_noise(chunk))
            while out:
                out = out[os.write(self.terminal, out) :]
