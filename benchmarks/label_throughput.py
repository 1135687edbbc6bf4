"""Pseudo-labeling throughput: this pipeline against the model's own speed, side by side in one run.

For the demo teacher and student (random weights, the same model, torch
threads and batch size in every method), on the same pool of WebDataset shards:

  (a) model-only: forward passes over tensors already decoded in memory, the bound
      (measured before and after each round of (c) and (d), since the machine's speed
      drifts: the mean of the two);
  (b) naive: the paper's own loop, per image PIL open -> transform -> batch-of-one forward;
  (c) DataLoader: a plain PyTorch DataLoader whose workers read the shards and decode;
  (d) pipeline: `fiqa label`'s engine end to end, shards in, committed Parquet out
      (Ray Data decode tasks + a scoring actor + the driver's writer).

It prints images/s of each and the ratios d/a, d/b, d/c; (d) also in steady
state, over the middle half of its shards' commits (so without the actor's start-up and
model load, which a pool of millions amortises, and without the final drain); then the peak memory
(RSS summed over this process and every Ray process it started, object store
pages included) of the pipeline on the pool and on a pool 10 times larger.

    python benchmarks/label_throughput.py             # ../shared/data/real-faces if present
    python benchmarks/label_throughput.py --synthetic 10240   # 20 synthetic shards of 512
    python benchmarks/label_throughput.py --models student --repeat 5   # (c), (d) on 5x the pool
    python benchmarks/label_throughput.py --models student --rounds 3   # median of 3 rounds

Every method runs the model with the same C heap settings: the scoring actor's
(`fiqa.models.allocator`), applied to this process too.

Threads: the model gets ``--threads`` (default: all cores but one); the one
left decodes (Ray's decode task, the DataLoader's worker). Ray's logical CPUs
are planned the same way: one scoring actor with ``--threads`` CPUs, decode
tasks with the rest.
On a machine of one's own, (d)'s scoring actor also claims ``--threads`` cores and its
decode tasks keep off them (`fiqa.cluster.cores`, `scoring.pin_cores`); (c) is a
plain DataLoader and is left to the kernel's scheduler.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, IterableDataset

REAL_FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-faces"
MODELS = {"teacher": "resnet10t", "student": "mobilenetv3_small_100"}
SIZE, RESIZE = 112, 128


def make_checkpoint(arch: str, out: Path) -> str:
    from fiqa.models import create_model, save_checkpoint

    save_checkpoint(
        str(out), create_model(arch), {"arch": arch, "image_size": SIZE, "resize": RESIZE}
    )
    return str(out)


def pool_shards(args: argparse.Namespace, work: Path) -> list[str]:
    if args.synthetic or not REAL_FACES.is_dir():
        from fiqa.data.synthetic import make_demo_data

        n = args.synthetic or 10_240  # the real pool's shape: 20 shards of 512
        sizes = {
            "labeled_train": 0,
            "labeled_val": 0,
            "test": 0,
            "unlabeled_1": n,
            "unlabeled_2": 0,
        }
        make_demo_data(work / "synthetic", seed=0, sizes=sizes, shard_size=512, image_size=112)
        return sorted(str(p) for p in (work / "synthetic" / "unlabeled_1").glob("*.tar"))
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


def read_images(shards: list[str]) -> list[bytes]:
    from fiqa.data.reader import read_shard

    return [r["image"] for s in shards for r in read_shard(s) if r["reason"] is None]


def decode(data: bytes) -> np.ndarray:
    from fiqa.data.decode import decode_image

    return decode_image(data, RESIZE, crop=SIZE)


# (a) ---------------------------------------------------------------------------------------------
def model_only(model, images: list[bytes], batch: int) -> float:
    from fiqa.models.inputs import to_model_input

    pixels = torch.from_numpy(np.stack([decode(b) for b in images]))
    with torch.inference_mode():
        model(to_model_input(pixels[:batch]))  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(pixels), batch):
            model(to_model_input(pixels[i : i + batch]))
    return len(pixels) / (time.perf_counter() - t0)


# (b) ---------------------------------------------------------------------------------------------
def naive(model, images: list[bytes], work: Path) -> float:
    from PIL import Image
    from torchvision import transforms

    folder = work / "naive-files"
    folder.mkdir(exist_ok=True)
    paths = []
    for i, b in enumerate(images):
        p = folder / f"{i:06d}.jpg"
        p.write_bytes(b)
        paths.append(p)
    tf = transforms.Compose(
        [
            transforms.Resize(RESIZE),
            transforms.CenterCrop(SIZE),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    with torch.inference_mode():
        t0 = time.perf_counter()
        for p in paths:
            x = tf(Image.open(p).convert("RGB")).unsqueeze(0)
            model(x)
    return len(paths) / (time.perf_counter() - t0)


# (c) ---------------------------------------------------------------------------------------------
class ShardImages(IterableDataset):
    """Shards read and decoded in the DataLoader's workers, split across them by shard."""

    def __init__(self, shards: list[str]):
        self.shards = shards

    def __iter__(self):
        from fiqa.data.reader import read_shard

        info = torch.utils.data.get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for s in mine:
            for r in read_shard(s):
                if r["reason"] is None:
                    yield torch.from_numpy(decode(r["image"]))


def dataloader(model, shards: list[str], batch: int, workers: int) -> float:
    from fiqa.models.inputs import to_model_input

    loader = DataLoader(
        ShardImages(shards), batch_size=batch, num_workers=workers, persistent_workers=False
    )
    n = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in loader:
            model(to_model_input(x))
            n += len(x)
    return n / (time.perf_counter() - t0)


# (d) ---------------------------------------------------------------------------------------------
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


DECODE_TASK = "MapBatches(read_and_decode)"  # the engine's decode operator, as Ray names it


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


@dataclass
class LabelRun:
    """One `fiqa label` run: the engine's counts, its duration, when each shard committed."""

    stats: dict
    t0: float  # time.perf_counter() when labeling started (after Ray's start)
    seconds: float
    commit_times: list[float]
    plan: dict  # the stream's plan, as the engine logged it (fiqa.labeling.run_score_job)

    @property
    def images(self) -> int:
        return self.stats["scored"] + self.stats["rejected"]

    @property
    def first_shard_s(self) -> float:
        return self.commit_times[0] - self.t0 if self.commit_times else self.seconds


def label_run(
    ckpt: str, shards: list[str], out: Path, label, monitors=(), cpus: int | None = None
) -> LabelRun:
    """`fiqa label`'s engine on a fresh local Ray of ``cpus`` CPUs (default: every CPU), so
    that runs are measured alike, into an empty ``out`` (a reused ``--work`` must not find its
    shards committed), removed afterwards. ``monitors``, context managers (peak RSS, GPU
    utilisation, running tasks), span the run."""
    import ray

    from fiqa.cluster.local import ensure_ray, shutdown_ray
    from fiqa.config import RayConfig
    from fiqa.labeling import label_shards

    shutil.rmtree(out, ignore_errors=True)
    commits = CommitTimes()
    engine_log = logging.getLogger("fiqa.labeling")
    engine_log.addHandler(commits)
    engine_log.setLevel(logging.INFO)
    try:
        with contextlib.ExitStack() as stack:
            for m in monitors:
                stack.enter_context(m)
            ensure_ray(RayConfig(num_cpus=cpus or os.cpu_count() or 2))
            try:
                t0 = time.perf_counter()
                stats = label_shards(ckpt, shards, str(out), label, progress=False)
                seconds = time.perf_counter() - t0
            finally:
                shutdown_ray()
    finally:
        engine_log.removeHandler(commits)
        shutil.rmtree(out, ignore_errors=True)
    assert not ray.is_initialized()
    return LabelRun(stats, t0, seconds, commits.times, commits.plan)


def pipeline(
    ckpt: str, shards: list[str], out: Path, batch: int, threads: int, memory: bool = False
) -> dict:
    """(d) with ``threads`` torch threads in one actor and the other CPUs decoding.

    With ``memory``, the peak RSS is sampled meanwhile; the throughput runs go without it,
    since walking /proc for every Ray process four times a second takes CPU from the run.
    """
    from fiqa.config import ScoringConfig

    cpus = os.cpu_count() or 2
    label = ScoringConfig(
        batch_size=batch,
        concurrency=1,
        num_cpus=threads,
        torch_threads=threads,
        decode_cpus=max(1, cpus - threads),
    )
    mem = PeakRSS() if memory else None
    run = label_run(ckpt, shards, out, label, [mem] if mem else [])
    n, seconds, first = run.images, run.seconds, run.first_shard_s
    per_shard = n / max(1, len(shards))
    # After the first shard (as runs 1 to 13 of RESULTS.md measured the steady state): the
    # actor's start and model load excluded, but not the final drain, which flatters it.
    after_first = (n - per_shard) / max(1e-9, seconds - first) if len(shards) > 1 else None
    return {
        "images": n,
        "seconds": seconds,
        "images_per_s": n / seconds,
        "first_shard_s": first,
        "after_first_images_per_s": after_first,
        "steady_images_per_s": steady_rate(run.commit_times, per_shard),
        "peak_gb": mem.peak / 1e9 if memory else None,
    }


MIN_STEADY_SHARDS = 16


def steady_rate(commit_times: list[float], per_shard: float) -> float | None:
    """Images/s over the middle half of the shards' commits; None under 16 shards, where
    the stream's buffer (about 6 shards of 512 faces) leaves no steady middle.

    Clear of the start-up, when decoding fills the stream's buffer while the actor starts,
    and of the end, when decoding has finished and the model has the machine to itself: over
    the last quarter of a 20-shard pool the student ran 1.4 to 1.8 times its middle-half rate.
    """
    window = steady_window(commit_times)
    if window is None:
        return None
    a, b = window
    return per_shard * (b - a) / max(1e-9, commit_times[b] - commit_times[a])


def steady_window(commit_times: list[float]) -> tuple[int, int] | None:
    """The middle half of the commits (indices), None under ``MIN_STEADY_SHARDS``."""
    n = len(commit_times)
    return None if n < MIN_STEADY_SHARDS else (n // 4, (3 * n) // 4)


class CommitTimes(logging.Handler):
    """When the engine committed each shard (it logs "committed <shard>"), and the stream's
    plan it logged (object-store bound, Ray Data's cap, actors, decode tasks, block rows)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.times: list[float] = []
        self.plan: dict = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("committed "):
            self.times.append(time.perf_counter())
        self.plan = getattr(record, "stream_plan", self.plan)


def main() -> None:
    from fiqa.models import load_checkpoint
    from fiqa.models.allocator import retain_freed_memory

    cpus = os.cpu_count() or 2
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=max(1, cpus - 1), help="torch threads")
    p.add_argument("--naive-images", type=int, default=1024, help="(b) is slow: a sample")
    p.add_argument("--synthetic", type=int, default=0, help="use N synthetic images")
    p.add_argument("--memory-scale", type=int, default=10)
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="(c) and (d) read the pool N times over (distinct shards): a larger pool, over "
        "which (d)'s fixed start-up is amortised as it is on a web-scale pool",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure (c) and (d) N times, each between two (a), and print the median ratios",
    )
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    # The scoring actor keeps freed activation memory for the next batch (fiqa.models.allocator);
    # (a), (b) and (c) run in this process, so they get the same heap settings.
    heap = "retains freed memory" if retain_freed_memory() else "default"
    work = Path(args.work or tempfile.mkdtemp(prefix="fiqa-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    base = pool_shards(args, work)
    small = base[: max(1, len(base) // args.memory_scale)]
    big = replicate(small, args.memory_scale, work)  # the small pool x10, distinct shards
    pool = replicate(base, args.repeat, work, "repeat") if args.repeat > 1 else base
    images = read_images(base)
    source = (
        "real-faces (112 px JPEG)" if REAL_FACES.is_dir() and not args.synthetic else "synthetic"
    )
    print(
        f"# {platform.machine()} {cpus} cores, torch {torch.__version__} threads={args.threads}, "
        f"batch={args.batch_size}, input {SIZE} px (resize {RESIZE}), malloc {heap}, pool: {source}, "
        f"{len(base)} shards, {len(images)} images"
        + (f", (c) and (d) read it {args.repeat} times over" if args.repeat > 1 else "")
    )
    for role in args.models:
        arch = MODELS[role]
        ckpt = make_checkpoint(arch, work / f"model-{role}")
        model = load_checkpoint(ckpt).model.eval()
        # (a) before and after every round of (c) and (d): the machine's speed drifts (by up to
        # 20 % within minutes on a shared 2-vCPU VM), so each round's bound is the mean of the
        # (a) on either side of it; with several rounds the median ratio is the figure.
        naive_rate = naive(model, images[: args.naive_images], work)
        a = [model_only(model, images, args.batch_size)]
        rounds = []
        for _ in range(args.rounds):
            c = dataloader(model, pool, args.batch_size, workers=max(1, cpus - args.threads))
            d = pipeline(ckpt, pool, work / f"out-{role}-full", args.batch_size, args.threads)
            a.append(model_only(model, images, args.batch_size))
            rounds.append({"a": (a[-2] + a[-1]) / 2, "c": c, **d})
        for i, r in enumerate(rounds):
            print(
                f"{role:<8} {arch:<22} (a) model-only {r['a']:7.1f}  (b) naive {naive_rate:6.1f}  "
                f"(c) DataLoader {r['c']:6.1f}  (d) pipeline {r['images_per_s']:6.1f} img/s   "
                f"d/a {r['images_per_s'] / r['a']:.2f}  d/b {r['images_per_s'] / naive_rate:.1f}  "
                f"d/c {r['images_per_s'] / r['c']:.2f}"
                + (f"   [round {i + 1}/{len(rounds)}]" if len(rounds) > 1 else ""),
                flush=True,
            )
            print(
                f"{'':<8} (a) {a[i]:.1f} before, {a[i + 1]:.1f} after "
                f"({100 * (a[i + 1] / a[i] - 1):+.0f} %): the bound above is their mean",
                flush=True,
            )
            steady = r["steady_images_per_s"]
            after = r["after_first_images_per_s"]
            print(
                f"{'':<8} (d) steady state, the middle half of the shards: "
                + (
                    f"{steady:6.1f} img/s   d/a {steady / r['a']:.2f}  d/c {steady / r['c']:.2f}"
                    if steady
                    else f"n/a ({len(pool)} shards; it needs {MIN_STEADY_SHARDS} or more)"
                )
                + f"   (first shard at {r['first_shard_s']:.1f} s"
                + (f"; everything after it: {after:.1f} img/s)" if after else ")"),
                flush=True,
            )
        if len(rounds) > 1:
            med = {
                f"{'steady ' if k.startswith('steady') else ''}d/{b}": statistics.median(
                    r[k] / r[b] for r in rounds
                )
                for k in ("images_per_s", "steady_images_per_s")
                for b in ("a", "c")
                if all(r[k] for r in rounds)
            }
            print(
                f"{role:<8} median of {len(rounds)} rounds: "
                + "  ".join(f"{k} {v:.2f}" for k, v in med.items()),
                flush=True,
            )
        m1 = pipeline(ckpt, small, work / f"out-{role}-1x", args.batch_size, args.threads, True)
        m10 = pipeline(ckpt, big, work / f"out-{role}-10x", args.batch_size, args.threads, True)
        print(
            f"{'':<8} peak memory: {m1['images']} images {m1['peak_gb']:.2f} GB, "
            f"{m10['images']} images {m10['peak_gb']:.2f} GB "
            f"(+{100 * (m10['peak_gb'] / m1['peak_gb'] - 1):.1f}%)",
            flush=True,
        )
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
