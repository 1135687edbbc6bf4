"""What the benchmark scripts share: the demo models, the pools of shards, samplers of the Ray
processes, and one run of `fiqa label`'s engine with the times of its commits.

The scripts run as ``python benchmarks/<script>.py``, so this folder is on their path and they
import it as ``harness``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import logging
import os
import platform
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from fiqa.config import ScoringConfig

REAL_FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-faces"
MODELS = {"teacher": "resnet10t", "student": "mobilenetv3_small_100"}
SIZE, RESIZE = 112, 128
DECODE_TASK = "MapBatches(read_and_decode)"  # the engine's decode operator, as Ray names it
MIN_STEADY_SHARDS = 16  # under this, the stream's buffer (about 6 shards) leaves no middle


@contextlib.contextmanager
def scratch(work: str | None, prefix: str) -> Iterator[Path]:
    """``work`` (created, kept afterwards), or a temporary directory removed afterwards."""
    path = Path(work or tempfile.mkdtemp(prefix=prefix))
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        if not work:
            shutil.rmtree(path, ignore_errors=True)


# Models and pools -------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for the machine line of a benchmark's output:
    runs on one kind of 2-core machine can land on another (an Intel Xeon, an AMD EPYC)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_checkpoint(arch: str, out: Path) -> str:
    """A checkpoint of ``arch`` with random weights, at the demo's input size."""
    from fiqa.models import create_model, save_checkpoint

    save_checkpoint(
        str(out), create_model(arch), {"arch": arch, "image_size": SIZE, "resize": RESIZE}
    )
    return str(out)


def pool_shards(work: Path, synthetic: int = 0) -> list[str]:
    """The real faces of ../shared/data/real-faces, or ``synthetic`` synthetic ones of 112 px
    in shards of 512 (by default, where there are no real ones: the real pool's shape)."""
    if synthetic or not REAL_FACES.is_dir():
        return make_pool(work, synthetic or 10_240, 112, copies=1)
    return sorted(str(p) for p in REAL_FACES.glob("*.tar"))


def replicate(shards: list[str], times: int, work: Path, name: str = "copy") -> list[str]:
    """The pool ``times`` over, as distinct shard files (hard links where possible)."""
    out = []
    for t in range(times):
        d = work / f"{name}{t}"
        d.mkdir(exist_ok=True)
        for s in shards:
            dst = d / Path(s).name
            if not dst.exists():
                try:
                    os.link(s, dst)
                except OSError:
                    shutil.copyfile(s, dst)
            out.append(str(dst))
    return out


def make_pool(
    work: Path, images: int, source_size: int, copies: int, shard_size: int = 512
) -> list[str]:
    """``images`` synthetic faces of ``source_size`` px in shards of ``shard_size``, then
    ``copies`` - 1 more copies of those shards with every key prefixed, so all keys are
    distinct."""
    from fiqa.data.synthetic import make_demo_data

    sizes = dict.fromkeys(("labeled_train", "labeled_val", "test", "unlabeled_2"), 0)
    make_demo_data(
        work / "synthetic",
        seed=0,
        sizes={**sizes, "unlabeled_1": images},
        shard_size=shard_size,
        image_size=source_size,
    )
    base = sorted((work / "synthetic" / "unlabeled_1").glob("*.tar"))
    jobs = []
    for c in range(1, copies):
        folder = work / f"copy{c}"
        folder.mkdir(exist_ok=True)
        jobs += [(s, folder / s.name, f"c{c}-") for s in base]
    with concurrent.futures.ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1) or 1) as ex:
        copied = list(ex.map(prefix_keys, *zip(*jobs, strict=True))) if jobs else []
    return [str(s) for s in base] + copied


def prefix_keys(src: Path, dst: Path, prefix: str) -> str:
    """A copy of the shard ``src`` whose sample keys start with ``prefix``."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin:
            data = tin.extractfile(m).read() if m.isfile() else None
            m.name = prefix + m.name
            tout.addfile(m, io.BytesIO(data) if data is not None else None)
    return str(dst)


# Samplers ---------------------------------------------------------------------------------------
class Sampler:
    """Samples ``_sample()`` every ``every`` seconds in a thread while in its ``with`` block,
    keeping (time.perf_counter(), value) pairs."""

    def __init__(self, every: float = 0.25):
        self.every, self.samples, self._stop = every, [], threading.Event()

    def _sample(self):
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self._sample()))
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, t0: float, t1: float) -> list:
        return [v for t, v in self.samples if t0 <= t <= t1]

    @property
    def peak(self):
        return max((v for _, v in self.samples), default=0)


class PeakRSS(Sampler):
    """Peak of RSS summed over this process and all its descendants."""

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total


def ray_task_processes(task: str) -> list[psutil.Process]:
    """The Ray workers running a task named ``task`` in the Ray this process started (its
    descendants): a Ray worker's process title is ``ray::<task name>`` while it runs one
    (``ray::IDLE`` between tasks)."""
    title = f"ray::{task}"
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if cmd and cmd[0].startswith(title):
            found.append(p)
    return found


class RunningTasks(Sampler):
    """How many Ray tasks named ``task`` run at once (`ray_task_processes`; a task paused by
    Ray Data's backpressure still counts), and ``peak_uss``: the most memory one of them held
    (unique set size: what a process alone holds, what Ray Data compares with a task's
    ``memory`` request)."""

    def __init__(self, task: str = DECODE_TASK, every: float = 0.1):
        super().__init__(every)
        self.task, self.peak_uss = task, 0

    def _sample(self) -> int:
        procs = ray_task_processes(self.task)
        for p in procs:
            try:
                self.peak_uss = max(self.peak_uss, p.memory_full_info().uss)
            except psutil.Error:
                pass
        return len(procs)


def timed_seams(events_file: str) -> tuple[type, Callable]:
    """The engine's actor class and decode task, noting their times in ``events_file`` (one
    JSON line each, wall-clock: they run in other processes). A closure rather than module
    globals: Ray ships it to the workers with the file's name in it."""

    def note(**event) -> None:
        with open(events_file, "a") as f:
            f.write(json.dumps({**event, "pid": os.getpid()}) + "\n")

    from fiqa.scoring.decode_task import read_and_decode
    from fiqa.scoring.scorer import Scorer

    class TimedScorer(Scorer):
        def __init__(self, *args, **kwargs):
            start = time.time()
            import torch  # noqa: F401  (what the constructor imports first, timed apart)

            after_torch = time.time()
            import timm  # noqa: F401

            after_timm = time.time()
            super().__init__(*args, **kwargs)
            note(actor_start=start, torch=after_torch, timm=after_timm, actor_ready=time.time())
            self._first = True

        def __call__(self, batch):
            if not self._first:
                return super().__call__(batch)
            self._first = False
            arrived = time.time()
            out = super().__call__(batch)  # returns its scores on the host: synchronised
            note(first_batch=arrived, first_batch_done=time.time())
            return out

    def timed_read_and_decode(batch, job, block_rows=None):
        note(decode_task=time.time())
        yield from read_and_decode(batch, job, block_rows)

    # Ray Data names the operator after the function: the same name as the engine's (DECODE_TASK).
    timed_read_and_decode.__name__ = read_and_decode.__name__

    return TimedScorer, timed_read_and_decode


# One run of the engine ---------------------------------------------------------------------------
class CommitTimes(logging.Handler):
    """When the engine committed each shard (it logs "committed <shard>"), and the stream's
    plan it logged (object-store bound, Ray Data's cap, actors, decode tasks, block rows)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # the driver's CPU time (all its threads) at each
        self.plan: dict = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("committed "):
            self.times.append(time.perf_counter())
            self.cpu_times.append(time.process_time())
        self.plan = getattr(record, "stream_plan", self.plan)


@dataclass
class LabelRun:
    """One `fiqa label` run: the engine's counts, its duration, when each shard committed."""

    stats: dict
    t0: float  # time.perf_counter() when scoring started (after Ray's start)
    wall_t0: float  # the same instant by time.time(), the clock other processes share
    ray_start_s: float  # how long starting the local Ray took, before t0
    seconds: float
    commit_times: list[float]  # time.perf_counter() of each commit
    plan: dict  # the stream's plan, as the engine logged it
    commit_cpu_times: list[float]  # the driver's time.process_time() at each commit

    @property
    def images(self) -> int:
        return self.stats["scored"] + self.stats["rejected"]

    @property
    def first_shard_s(self) -> float:
        return self.commit_times[0] - self.t0 if self.commit_times else self.seconds


def label_run(
    ckpt: str,
    shards: list[str],
    out: Path,
    scoring: ScoringConfig,
    monitors=(),
    cpus: int | None = None,
    scorer: type | None = None,
    decode: Callable | None = None,
    address: str | None = None,
) -> LabelRun:
    """`fiqa label`'s engine on a fresh local Ray of ``cpus`` CPUs (default: every CPU), so
    that runs are measured alike, or on the running cluster at ``address``, into an empty ``out`` (a reused ``--work`` must not find its
    shards committed), removed afterwards. ``monitors``, context managers (peak RSS, GPU
    utilisation, running tasks), span the run. ``scorer`` and ``decode``, where given, replace
    the engine's actor class and decode task (`fiqa.scoring.engine.run_score_job`'s seams)."""
    import ray

    from fiqa.cli.label import label_shards
    from fiqa.cluster.local import ensure_ray, shutdown_ray
    from fiqa.config import RayConfig

    seams = {k: v for k, v in (("scorer", scorer), ("decode", decode)) if v is not None}
    shutil.rmtree(out, ignore_errors=True)
    commits = CommitTimes()
    engine_log = logging.getLogger("fiqa.scoring.engine")
    engine_log.addHandler(commits)
    engine_log.setLevel(logging.DEBUG)  # (it logs each commit at DEBUG)
    propagate, engine_log.propagate = engine_log.propagate, False
    try:
        with contextlib.ExitStack() as stack:
            for m in monitors:
                stack.enter_context(m)
            before_ray = time.perf_counter()
            cfg = RayConfig(address=address, num_cpus=None if address else cpus or os.cpu_count())
            ensure_ray(cfg)
            try:
                t0, wall_t0 = time.perf_counter(), time.time()
                stats = label_shards(ckpt, shards, str(out), scoring, progress=False, **seams)
                seconds = time.perf_counter() - t0
            finally:
                shutdown_ray()
    finally:
        engine_log.removeHandler(commits)
        engine_log.propagate = propagate
        shutil.rmtree(out, ignore_errors=True)
    assert not ray.is_initialized()
    return LabelRun(
        stats, t0, wall_t0, t0 - before_ray, seconds, commits.times, commits.plan, commits.cpu_times
    )


def steady_window(commit_times: list[float]) -> tuple[int, int] | None:
    """The middle half of the commits (indices), None under ``MIN_STEADY_SHARDS``: clear of
    the start-up (decoding fills the stream's buffer while the actor starts) and of the end
    (decoding has finished and the model has the machine to itself)."""
    n = len(commit_times)
    return None if n < MIN_STEADY_SHARDS else (n // 4, (3 * n) // 4)


def steady_rate(commit_times: list[float], per_shard: float) -> float | None:
    """Images/s over `steady_window`, None where there is none."""
    window = steady_window(commit_times)
    if window is None:
        return None
    a, b = window
    return per_shard * (b - a) / max(1e-9, commit_times[b] - commit_times[a])


def no_steady_state(shards: int) -> str:
    """What the scripts print where `steady_window` is None."""
    return f"n/a ({shards} shards; it needs {MIN_STEADY_SHARDS} or more)"
