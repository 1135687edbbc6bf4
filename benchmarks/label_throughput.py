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
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from harness import (
    MODELS,
    REAL_FACES,
    RESIZE,
    SIZE,
    PeakRSS,
    label_run,
    make_checkpoint,
    no_steady_state,
    pool_shards,
    replicate,
    scratch,
    steady_rate,
)
from torch.utils.data import DataLoader, IterableDataset


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
def pipeline(
    ckpt: str, shards: list[str], out: Path, batch: int, threads: int, memory: bool = False
) -> dict:
    """(d) with ``threads`` torch threads in one actor and the other CPUs decoding.

    With ``memory``, the peak RSS is sampled meanwhile; the throughput runs go without it,
    since walking /proc for every Ray process four times a second takes CPU from the run.
    """
    from fiqa.config import ScoringConfig

    cpus = os.cpu_count() or 2
    scoring = ScoringConfig(
        batch_size=batch,
        concurrency=1,
        num_cpus=threads,
        torch_threads=threads,
        decode_cpus=max(1, cpus - threads),
    )
    mem = PeakRSS() if memory else None
    run = label_run(ckpt, shards, out, scoring, [mem] if mem else [])
    n, seconds, first = run.images, run.seconds, run.first_shard_s
    per_shard = n / max(1, len(shards))
    # Without the actor's start and model load, but with the final drain, which flatters it.
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


def main() -> None:
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
    with scratch(args.work, "fiqa-bench-") as work:
        compare(args, work)


def compare(args: argparse.Namespace, work: Path) -> None:
    """(a) to (d) for each of ``args.models``, then (d)'s peak memory on two pools."""
    from fiqa.models import load_checkpoint
    from fiqa.models.allocator import retain_freed_memory

    cpus = os.cpu_count() or 2
    torch.set_num_threads(args.threads)
    # (a), (b) and (c) run in this process: the same heap settings as the scoring actor's.
    heap = "retains freed memory" if retain_freed_memory() else "default"
    base = pool_shards(work, args.synthetic)
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
        # (a) before and after every round of (c) and (d), since the machine's speed drifts:
        # each round's bound is the mean of the two; over several rounds, the median ratio.
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
                    else no_steady_state(len(pool))
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


if __name__ == "__main__":
    main()
