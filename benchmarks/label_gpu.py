"""Pseudo-labeling on GPUs: the paper's teacher through `fiqa label`'s engine against each GPU's
model-only bound, side by side in one run.

For the same checkpoint (Swin-B at 448 px by default, random weights), batch size and precision
as the engine's scoring actor (bf16 autocast, channels_last; ``--compile``: torch.compile in
every method), on a pool of synthetic faces as large as the crop (``--source-size``):

  (a)  model-only: forward passes over decoded uint8 batches already in GPU memory,
       normalisation included: the bound. Measured for every ``--batch-sizes``; the pipeline
       runs at the fastest (``--batch-size`` fixes it): the batch size is measured, not guessed.
  (a') actor-only: the engine's own scoring actor (`fiqa.scoring.scorer.Scorer`) called in this
       process on Arrow batches in host memory, as Ray Data hands them over: (a) plus the
       host-to-GPU copy and the per-call work, no decoding.
  decode: the engine's decode (`decode_image`: resize + crop) on one core, and times the CPUs
       the actors leave to decode tasks: whether the CPUs can keep the GPUs busy.
  (d)  pipeline: `fiqa label`'s engine end to end, shards in, committed Parquet out (decode
       tasks on every CPU the actors leave, actors on the GPUs, the driver's writer), once for
       each ``--gpus-per-actor`` (1: one actor per GPU; 0.5: two per GPU, one's copy and
       bookkeeping overlapping the other's compute) and each ``--buffer-mb`` (the stream's
       object-store budget: the engine's default, sized for the decode tasks the CPUs run,
       then 8 GB, a check that more buffer gains nothing).

It prints images/s per GPU of each, d/a and d/a', end to end and in steady state (the middle
half of the shards' commits), each GPU's mean utilisation over that middle half
(nvidia-smi, when present) and how many decode tasks ran at once (Ray workers' process
titles): whether the CPUs kept the GPUs fed; and the most memory a decode task held.

    python benchmarks/label_gpu.py                              # Swin-B 448 px on every GPU
    python benchmarks/label_gpu.py --gpus-per-actor 1 0.5 0.25 --compile
    python benchmarks/label_gpu.py --model edgenext_xx_small    # the paper's student, 352 px

Without a CUDA GPU it refuses to run, since its figures would not be a GPU's; ``--allow-cpu``
runs it on the CPU anyway (fp32, no autocast), to check the script itself on a small model.
The pool's copies carry distinct keys (the shards are rewritten, not linked), so every image
is scored and written, as in a real job.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from harness import (
    RunningTasks,
    label_run,
    make_pool,
    no_steady_state,
    scratch,
    steady_rate,
    steady_window,
)

from fiqa.data.decode import decode_image
from fiqa.data.reader import read_shard


def decoded(shards: list[str], n: int, resize: int, crop: int) -> np.ndarray:
    """The first ``n`` images of the pool decoded as the engine decodes them (uint8 NHWC)."""
    out = []
    for s in shards:
        for r in read_shard(s):
            if r["reason"] is None:
                out.append(decode_image(r["image"], resize, crop=crop))
                if len(out) == n:
                    return np.stack(out)
    return np.stack(out)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rate(step, batch: int, device: torch.device, seconds: float) -> float:
    """Images/s of ``step()`` (one batch of ``batch``) repeated for about ``seconds``, after
    three warm-up calls (cuDNN's and the allocator's first-call costs, compilation)."""
    for _ in range(3):
        step()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while True:
        step()
        n += 1
        if n >= 5 and time.perf_counter() - t0 >= seconds:
            break
    sync(device)
    return n * batch / (time.perf_counter() - t0)


# (a) ---------------------------------------------------------------------------------------------
def model_only(model, pixels: np.ndarray, batch: int, device, seconds: float) -> float:
    from fiqa.models.inputs import to_model_input

    cuda = device.type == "cuda"
    on_device = torch.from_numpy(pixels).to(device)
    starts = list(range(0, len(on_device) - batch + 1, batch)) or [0]
    i = 0

    def step():
        nonlocal i
        x = on_device[starts[i % len(starts)] :][:batch]
        i += 1
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            model(to_model_input(x, channels_last=cuda))

    return timed_rate(step, batch, device, seconds)


# (a') --------------------------------------------------------------------------------------------
def actor_only(ckpt: str, pixels: np.ndarray, batch: int, compile: bool, seconds: float) -> float:
    """The engine's `Scorer`, in this process, on Arrow batches as Ray Data hands them over."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    from fiqa.scoring.scorer import Scorer

    scorer = Scorer(ckpt, threads=torch.get_num_threads(), compile=compile, pin_cores=False)
    n = min(batch, len(pixels))
    tables = [
        pa.table(
            {
                "key": [f"k{j}" for j in range(n)],
                "reason": [""] * n,
                "pixels": ArrowTensorArray.from_numpy(pixels[s : s + n]),
            }
        )
        for s in range(0, len(pixels) - n + 1, n)
    ]
    i = 0

    def step():
        nonlocal i
        scorer(tables[i % len(tables)])  # returns its scores on the host: synchronised
        i += 1

    return timed_rate(step, n, scorer.device, seconds)


# decode ------------------------------------------------------------------------------------------
def decode_rate(shards: list[str], resize: int, crop: int, seconds: float) -> float:
    """Images/s of the engine's decode on one core (this process, one thread)."""
    images = [r["image"] for r in read_shard(shards[0]) if r["reason"] is None]
    n, t0 = 0, time.perf_counter()
    while n < 16 or time.perf_counter() - t0 < seconds:
        decode_image(images[n % len(images)], resize, crop=crop)
        n += 1
    return n / (time.perf_counter() - t0)


# (d) ---------------------------------------------------------------------------------------------
class GpuUtilisation:
    """Each visible GPU's utilisation (%), sampled by nvidia-smi every 200 ms, with the time.

    nvidia-smi lists every GPU of the machine: ``-i`` keeps those CUDA_VISIBLE_DEVICES names,
    the ones torch counts (and Ray schedules on), one line each per sample."""

    def __init__(self):
        self.samples: list[tuple[float, list[float]]] = []
        self._proc = None

    def __enter__(self) -> GpuUtilisation:
        if shutil.which("nvidia-smi") and torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
                + ["-lms", "200"]
                + (["-i", visible] if visible else []),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        gpus = torch.cuda.device_count()
        row: list[float] = []
        for line in self._proc.stdout:
            try:
                row.append(float(line.strip()))
            except ValueError:
                continue
            if len(row) == gpus:
                self.samples.append((time.perf_counter(), row))
                row = []

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._thread.join(timeout=5)

    def mean_between(self, t0: float, t1: float) -> list[float] | None:
        rows = [r for t, r in self.samples if t0 <= t <= t1]
        return np.mean(rows, axis=0).tolist() if rows else None


def pipeline(ckpt, shards, out: Path, crop, batch, gpus_per_actor, actors, compile, buffer_mb):
    """`fiqa label`'s engine on a fresh local Ray (every CPU, every GPU), into an empty ``out``;
    ``buffer_mb`` 0: the engine's own stream buffer (`fiqa.scoring.stream.stream_buffer_bytes`).
    None, with the engine's reason printed, for a plan the engine refuses."""
    from fiqa.config import ConfigError, ScoringConfig

    scoring = ScoringConfig(
        batch_size=batch,
        concurrency=actors,
        num_gpus=gpus_per_actor,
        num_cpus=1.0,
        torch_threads=1 if gpus_per_actor else max(1, (os.cpu_count() or 2) - 1),
        decode_cpus=1.0,
        compile=compile,
        buffer_mb=buffer_mb or None,
    )
    util, decoding = GpuUtilisation(), RunningTasks()
    try:
        run = label_run(ckpt, shards, out, scoring, [util, decoding])
    except ConfigError as e:  # too many actors for the CPUs, or fewer GPUs than torch sees
        hint = (
            f" (torch sees {torch.cuda.device_count()} GPU(s); Ray counts them with NVML, "
            f"libnvidia-ml)"
            if "GPU(s), and this Ray" in str(e)
            else ""
        )
        print(f"(d)  skipped, {actors} actor(s) x {gpus_per_actor:g} GPU: {e}{hint}", flush=True)
        return None
    n, times = run.images, run.commit_times
    window = steady_window(times)
    steady = (times[window[0]], times[window[1]]) if window else None
    return {
        "images": n,
        "buffer_mib": run.plan["buffer_bytes"] / 2**20,
        "cap_mib": run.plan["cap_bytes"] / 2**20,
        "block_rows": run.plan["block_rows"],
        "rejected": run.stats["rejected"],
        "seconds": run.seconds,
        "images_per_s": n / run.seconds,
        "first_shard_s": run.first_shard_s,
        "steady_images_per_s": steady_rate(times, n / max(1, len(shards))),
        "steady_utilisation": util.mean_between(*steady) if steady else None,
        "steady_decode_tasks": np.mean(decoding.between(*steady)) if steady else None,
        "max_decode_tasks": decoding.peak,
        "decode_task_peak_mib": decoding.peak_uss / 2**20,
        "decode_task_reserved_mib": scoring.decode_memory_mb,
    }


def describe_machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = (
        f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        if device.type == "cuda"
        else "no GPU (--allow-cpu: the CPU stands in, fp32)"
    )
    return f"{gpu}; {os.cpu_count()} CPUs ({cpu}); torch {torch.__version__}"


def main() -> None:
    from fiqa.models import create_model, load_checkpoint, save_checkpoint
    from fiqa.models.registry import resolve_spec

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="swin_base", help="registry or timm name (swin_base)")
    p.add_argument("--image-size", type=int, default=None, help="crop (default: the model's)")
    p.add_argument("--source-size", type=int, default=512, help="side of the pool's JPEGs")
    p.add_argument("--images", type=int, default=4096, help="distinct synthetic images")
    p.add_argument("--copies", type=int, default=6, help="the pool is these many copies")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--batch-size", type=int, default=None, help="(d)'s (default: (a)'s fastest)")
    p.add_argument("--gpus-per-actor", type=float, nargs="+", default=[1.0])
    p.add_argument(
        "--buffer-mb",
        type=int,
        nargs="+",
        default=[0, 8192],
        help="scoring.buffer_mb of each (d) (0: the engine's default)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile in (a), (a') and (d)")
    p.add_argument("--seconds", type=float, default=3.0, help="each (a), (a'), decode timing")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a smoke run)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    args = p.parse_args()

    if torch.cuda.is_available():
        device, gpus = torch.device("cuda"), torch.cuda.device_count()
    elif args.allow_cpu:
        device, gpus = torch.device("cpu"), 1
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # (d)'s actor's threads
    else:
        sys.exit(
            f"label_gpu.py: no CUDA GPU here (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}: an older NVIDIA driver also hides the GPU), and its "
            "figures would not be a GPU's. "
            "benchmarks/label_throughput.py measures CPU scoring; --allow-cpu runs this "
            "script on the CPU anyway, to check it."
        )
    if any(f <= 0 or f > 1 for f in args.gpus_per_actor):
        sys.exit("label_gpu.py: --gpus-per-actor takes fractions of a GPU in (0, 1]")
    spec = resolve_spec(args.model, args.image_size)
    crop, resize = spec.image_size, spec.resize
    with scratch(args.work, "fiqa-gpu-bench-") as work:
        t0 = time.perf_counter()
        shards = make_pool(work, args.images, args.source_size, args.copies)
        print(
            f"# {describe_machine(device)}\n# {spec.arch} at {crop} px (resize {resize}), "
            f"{'bf16 autocast, channels_last' if device.type == 'cuda' else 'fp32'}"
            f"{', torch.compile' if args.compile else ''}; pool: {len(shards)} shards, "
            f"{args.images * args.copies} synthetic {args.source_size} px JPEGs "
            f"(made in {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        ckpt = str(work / "model")
        save_checkpoint(
            ckpt,
            create_model(spec.name, crop),
            {"arch": spec.arch, "image_size": crop, "resize": resize},
        )
        model = load_checkpoint(ckpt, map_location=device).model.eval()
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        if args.compile:
            model = torch.compile(model, dynamic=True)
        sizes = sorted(set(args.batch_sizes) | ({args.batch_size} if args.batch_size else set()))
        pixels = decoded(shards, sizes[-1], resize, crop)
        bound = {}
        for b in sizes:
            bound[b] = model_only(model, pixels, b, device, args.seconds)
            print(f"(a)  model-only, batch {b:>4}: {bound[b]:8.1f} img/s per GPU", flush=True)
        batch = args.batch_size or max(bound, key=bound.get)
        a = bound[batch]  # (a) and (a') run on one GPU (cuda:0); (d) on all, divided by their count
        del model
        a1 = actor_only(ckpt, pixels, batch, args.compile, args.seconds)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        one_core = decode_rate(shards, resize, crop, args.seconds)
        print(
            f"(a') actor-only, batch {batch:>4}: {a1:8.1f} img/s per GPU   a'/a {a1 / a:.2f}   "
            f"(the host-to-GPU copy and the per-call work)\n"
            f"decode: {one_core:.1f} img/s on one core",
            flush=True,
        )
        runs = [(f, m) for f in args.gpus_per_actor for m in args.buffer_mb]
        for frac, buffer_mb in runs:
            per_gpu = int(1 / frac + 1e-9) if device.type == "cuda" else 1
            actors = max(1, gpus * per_gpu) if device.type == "cuda" else 1
            decoders = (os.cpu_count() or 2) - actors
            d = pipeline(
                ckpt,
                shards,
                work / "out",
                crop,
                batch,
                frac if device.type == "cuda" else 0.0,
                actors,
                args.compile,
                buffer_mb,
            )
            if d is None:
                continue
            e2e, steady = d["images_per_s"] / gpus, d["steady_images_per_s"]
            steady = steady / gpus if steady else None
            util = d["steady_utilisation"]
            print(
                f"(d)  pipeline, {actors} actor(s) x {frac:g} GPU, batch {batch}, stream buffer "
                f"{d['buffer_mib']:.0f} MiB{' (default)' if not buffer_mb else ''}"
                + (
                    f" capped at {d['cap_mib']:.0f} MiB by Ray Data"
                    if d["buffer_mib"] > d["cap_mib"]
                    else ""
                )
                + f" in blocks of {d['block_rows']}: "
                f"{e2e:8.1f} img/s per GPU   d/a {e2e / a:.2f}  d/a' {e2e / a1:.2f}   "
                f"({d['images']} images in {d['seconds']:.1f} s, first shard at "
                f"{d['first_shard_s']:.1f} s, {d['rejected']} rejected)\n"
                f"     steady state, the middle half of the shards: "
                + (
                    f"{steady:8.1f} img/s per GPU   d/a {steady / a:.2f}  d/a' {steady / a1:.2f}"
                    if steady
                    else no_steady_state(len(shards))
                )
                + (
                    f"   GPU utilisation {', '.join(f'{u:.0f} %' for u in util)}"
                    if util
                    else ("   GPU utilisation n/a" if device.type == "cuda" else "")
                )
                + f"\n     decode bound, were all {decoders} free CPU(s) decoding: "
                f"{decoders * one_core / gpus:.1f} img/s per GPU; decode tasks running at "
                f"once: "
                + (f"{d['steady_decode_tasks']:.1f} in steady state, " if steady else "")
                + f"at most {d['max_decode_tasks']} (of {decoders} CPUs); a decode task's "
                f"memory at most {d['decode_task_peak_mib']:.0f} MiB (USS; it reserves "
                f"{d['decode_task_reserved_mib']} MiB)",
                flush=True,
            )


if __name__ == "__main__":
    main()
