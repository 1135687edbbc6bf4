"""Pseudo-labeling on a GPU machine: the paper's teacher and student through `fiqa label`'s
engine against each one's model-only bound, side by side in one run, on one pool.

One pool of synthetic faces (``--source-size`` px JPEGs, every key distinct) serves both
models. For each model (Swin-B at 448 px, EdgeNeXt-XXS at 352 px; random weights):

  (a)  model-only: forward passes over decoded uint8 batches already on the GPU,
       normalisation included, in the engine's own actor setup (`Scorer`): the bound, for
       each ``--batch-sizes`` (the rest runs at the fastest), then what may move it at that
       batch: fp16 or bf16, autocast or the weights too ("16-mixed" is the default), fused
       SDPA instead of timm's plain window attention (Swin), twice the batch, torch.compile (static
       shapes; compile time apart). Each variant's scores against the eager fp32 model's on
       the MOS scale; (a) is the fastest within 1e-2 of them.
  (a') actor-only: the engine's `Scorer` called in this process on Arrow batches as Ray Data
       hands them over: decoded pixels, and JPEG bytes decoded on the GPU (nvJPEG).
  decode: CPU decode on one core (times the CPUs the actors leave) and nvJPEG alone.
  (d)  pipeline: `fiqa label`'s engine end to end, shards in, committed Parquet out, with
       the decoding in the actors (nvJPEG, the default on a GPU) and in CPU tasks (as before),
       and the student with two actors a GPU as well: images/s end to end and in steady
       state (the middle half of the commits) against (a), GPU utilisation, decode tasks
       running at once and the most memory one held against its reservation, and the
       start-up: when the actor starts, imports, loads, warms up and gets its first batch.

    python benchmarks/label_gpu.py --json $OUT/label_gpu.json      # both models, ~7 min
    python benchmarks/label_gpu.py --models student --copies 50 --compile-models student

Without a CUDA GPU it refuses to run, since its figures would not be a GPU's; ``--allow-cpu``
runs it on the CPU anyway (fp32), to check the script itself on small models.
"""

from __future__ import annotations

import argparse
import json
import os
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
    cpu_model,
    label_run,
    make_pool,
    no_steady_state,
    scratch,
    steady_rate,
    steady_window,
    timed_seams,
)

from fiqa.data.decode import decode_image
from fiqa.data.reader import read_shard

# name, crop, batch sizes for (a); a CPU smoke run (--allow-cpu) uses the demo's models.
GPU_MODELS = {
    "teacher": ("swin_base", None, [128, 256]),
    "student": ("edgenext_xx_small", None, [512, 1024]),
}
CPU_MODELS = {
    "teacher": ("resnet10t", 64, [16, 32]),
    "student": ("mobilenetv3_small_100", 64, [16, 32]),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rate(step, batch: int, device: torch.device, seconds: float) -> float:
    """Images/s of ``step()`` (one batch of ``batch``) repeated for about ``seconds``, after
    three warm-up calls (cuDNN's and the allocator's first-call costs)."""
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


def encoded(shards: list[str], n: int) -> list[bytes]:
    out = []
    for s in shards:
        for r in read_shard(s):
            out.append(r["image"])
            if len(out) == n:
                return out
    return out


# (a) ---------------------------------------------------------------------------------------------
def forward(scorer, x):
    """The scorer's model on uint8 NHWC ``x`` on its device, without the host round trip."""
    from fiqa.models.inputs import to_model_input

    channels_last = scorer.device.type == "cuda"
    return scorer.forward(to_model_input(x, channels_last).to(scorer.dtype), scorer.autocast)


def model_only(scorer, on_device: torch.Tensor, batch: int, seconds: float) -> float:
    starts = list(range(0, len(on_device) - batch + 1, batch)) or [0]
    i = 0

    def step():
        nonlocal i
        forward(scorer, on_device[starts[i % len(starts)] :][:batch])
        i += 1

    return timed_rate(step, batch, scorer.device, seconds)


def scores_in_batches(scorer, x: torch.Tensor, batch: int) -> np.ndarray:
    """Scores of ``x`` in batches of ``batch`` rows, the last padded: a compiled scorer then
    sees only the shape it was compiled for."""
    out = []
    for i in range(0, len(x), batch):
        piece = x[i : i + batch]
        padded = torch.cat([piece, piece.new_zeros((batch - len(piece), *piece.shape[1:]))])
        out.append(forward(scorer, padded)[: len(piece)].float().cpu().numpy())
    return np.concatenate(out)


def mos_error(scores: np.ndarray, reference: np.ndarray) -> float:
    """The largest difference on the 1-5 MOS scale, the reference's range mapped onto it."""
    span = max(float(np.ptp(reference)), 1e-12)
    return float(np.abs(scores - reference).max() * 4 / span)


def bound_variants(ckpt, pixels, sizes, device, seconds, compile_ok, is_swin, log):
    """(a) and its variants; returns {name: {...}} (each with its ``precision``, ``compile``
    and ``batch``)."""
    from fiqa.scoring.scorer import Scorer

    cuda = device.type == "cuda"
    default = "16-mixed" if cuda else "32-true"
    x = torch.from_numpy(pixels).to(device)
    check = x[: min(256, len(x))]
    reference = scores_in_batches(Scorer(ckpt, precision="32-true", pin_cores=False), check, 64)
    out: dict[str, dict] = {}

    def measure(name, scorer, batch, precision, compiled_in=None):
        rate = model_only(scorer, x, batch, seconds)
        err = mos_error(scores_in_batches(scorer, check, batch), reference)
        out[name] = {
            "batch": batch,
            "precision": precision,
            "compile": compiled_in is not None,
            "images_per_s": rate,
            "mos_error": err,
            "compile_s": compiled_in,
        }
        log(
            f"(a)  model-only, {name:<30} batch {batch:>4}: {rate:8.1f} img/s   "
            f"scores vs eager fp32: {err:.4f} on the MOS scale"
            + (f"   (compiled in {compiled_in:.1f} s)" if compiled_in is not None else "")
        )

    eager = Scorer(ckpt, precision=default, pin_cores=False)
    for b in sizes:
        measure(f"eager {default} @ {b}", eager, b, default)
    batch = max(sizes, key=lambda b: out[f"eager {default} @ {b}"]["images_per_s"])
    if cuda:
        measure(f"eager {default}, 2x batch", eager, 2 * batch, default)
        for precision in ("bf16-mixed", "16-true", "bf16-true"):
            other = Scorer(ckpt, precision=precision, pin_cores=False)
            measure(f"eager {precision}", other, batch, precision)
            del other
    if is_swin:
        # timm's Swin runs its window attention as plain matmuls unless told otherwise
        # (TIMM_FUSED_ATTN=2); this is what SDPA would give (not yet a setting of the engine).
        for m in eager.model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = True
        measure(f"eager {default}, fused attention", eager, batch, default)
    del eager
    if compile_ok:
        # The fastest eager precision whose scores stay within 1e-2: one compile of Swin-B
        # takes minutes, and the run must fit a device's 10-minute call.
        safe = [v for k, v in out.items() if v["mos_error"] <= 1e-2 and "attention" not in k]
        precision = max(safe, key=lambda v: v["images_per_s"])["precision"] if safe else default
        t0 = time.perf_counter()
        # The constructor compiles (its warm-up batch) on a GPU; a CPU on the first call.
        compiled = Scorer(
            ckpt, precision=precision, pin_cores=False, compile=True, batch_size=batch
        )
        forward(compiled, x[:batch])
        sync(device)
        measure(f"compiled {precision}", compiled, batch, precision, time.perf_counter() - t0)
        del compiled
        if cuda:
            torch.cuda.empty_cache()
    return out


# (a') --------------------------------------------------------------------------------------------
def actor_only(ckpt, pixels, images, batch, settings, decode_spec, seconds) -> dict:
    """The engine's `Scorer` on Arrow batches: decoded pixels, and JPEG bytes it decodes."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    from fiqa.scoring.scorer import Scorer

    n = min(batch, len(pixels))
    rates = {}
    for mode in ("pixels", "bytes"):
        scorer = Scorer(
            ckpt,
            pin_cores=False,
            decode=decode_spec if mode == "bytes" else None,
            batch_size=batch,
            **settings,
        )
        tables = []
        for s in range(0, len(pixels) - n + 1, n):
            cols = {"key": [f"k{j}" for j in range(n)], "reason": [""] * n}
            cols["image"] = pa.array(images[s : s + n], pa.binary())
            cols["pixels"] = (
                ArrowTensorArray.from_numpy(pixels[s : s + n])
                if mode == "pixels"
                else pa.array([b""] * n, pa.binary())
            )
            tables.append(pa.table(cols))
        i = 0

        def step(scorer=scorer, tables=tables):
            nonlocal i
            scorer(tables[i % len(tables)])  # returns its scores on the host: synchronised
            i += 1

        rates[mode] = timed_rate(step, n, scorer.device, seconds)
        del scorer
    return rates


# decode ------------------------------------------------------------------------------------------
def cpu_decode_rate(images: list[bytes], resize: int, crop: int, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while n < 16 or time.perf_counter() - t0 < seconds:
        decode_image(images[n % len(images)], resize, crop=crop)
        n += 1
    return n / (time.perf_counter() - t0)


def device_decode_rate(images, resize, crop, batch, device, seconds) -> float:
    from fiqa.scoring.device_decode import decode_batch

    chunks = [images[s : s + batch] for s in range(0, max(1, len(images) - batch + 1), batch)]
    i = 0

    def step():
        nonlocal i
        decode_batch(chunks[i % len(chunks)], resize, crop, device)
        i += 1

    return timed_rate(step, len(chunks[0]), device, seconds)


# (d) ---------------------------------------------------------------------------------------------
class GpuUtilisation:
    """Each visible GPU's utilisation (%), sampled by nvidia-smi every 200 ms, with the time."""

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


def pipeline(ckpt, shards, work: Path, scoring) -> dict | None:
    """`fiqa label`'s engine on a fresh local Ray (every CPU, every GPU); None, with the
    engine's reason printed, for a plan the engine refuses."""
    from fiqa.config import ConfigError

    events = work / "events.jsonl"
    events.unlink(missing_ok=True)
    scorer, decode = timed_seams(str(events))
    util, decoding = GpuUtilisation(), RunningTasks()
    try:
        run = label_run(
            ckpt, shards, work / "out", scoring, [util, decoding], scorer=scorer, decode=decode
        )
    except ConfigError as e:
        print(f"(d)  skipped: {e}", flush=True)
        return None
    n, times = run.images, run.commit_times
    window = steady_window(times)
    steady = (times[window[0]], times[window[1]]) if window else None
    noted = [json.loads(line) for line in events.read_text().splitlines()]
    actor = next((e for e in noted if "actor_start" in e), {})
    first = next((e for e in noted if "first_batch" in e), {})
    decodes = sorted(e["decode_task"] for e in noted if "decode_task" in e)

    def at(wall):  # seconds from the start of the job, for a worker's time.time()
        return round(wall - run.wall_t0, 2) if wall else None

    return {
        "images": n,
        "rejected": run.stats["rejected"],
        "shards": len(shards),
        "seconds": run.seconds,
        "images_per_s": n / run.seconds,
        "steady_images_per_s": steady_rate(times, n / max(1, len(shards))),
        "steady_utilisation": util.mean_between(*steady) if steady else None,
        "steady_decode_tasks": float(np.mean(decoding.between(*steady))) if steady else None,
        "max_decode_tasks": decoding.peak,
        "decode_task_peak_mib": decoding.peak_uss / 2**20,
        "decode_task_reserved_mib": run.plan.get("decode_memory_bytes", 0) // 2**20,
        "buffer_mib": run.plan.get("buffer_bytes", 0) / 2**20,
        "block_rows": run.plan.get("block_rows"),
        "startup": {
            "ray_start": round(run.ray_start_s, 2),
            "first_decode_task": at(decodes[0] if decodes else None),
            "actor_start": at(actor.get("actor_start")),
            "actor_imported_torch": at(actor.get("torch")),
            "actor_imported_timm": at(actor.get("timm")),
            "actor_ready (loaded, warmed up)": at(actor.get("actor_ready")),
            "first_batch_arrives": at(first.get("first_batch")),
            "first_batch_scored": at(first.get("first_batch_done")),
            "first_commit": round(run.first_shard_s, 2),
        },
    }


def describe_machine(device: torch.device) -> str:
    cpu = cpu_model()
    gpu = (
        f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        if device.type == "cuda"
        else "no GPU (--allow-cpu: the CPU stands in, fp32)"
    )
    return f"{gpu}; {os.cpu_count()} CPUs ({cpu}); torch {torch.__version__}"


def run_model(role, args, device, shards, work, log, result: dict, save) -> None:
    """Every figure of one model into ``result`` (``save()`` after each, so a run cut short
    keeps what it measured)."""
    from fiqa.config import ScoringConfig
    from fiqa.models import create_model, save_checkpoint
    from fiqa.models.registry import resolve_spec
    from fiqa.scoring.job import DecodeSpec

    name, size, sizes = (GPU_MODELS if device.type == "cuda" else CPU_MODELS)[role]
    spec = resolve_spec(name, size)
    crop, resize = spec.image_size, spec.resize
    ckpt = str(work / f"model-{role}")
    torch.manual_seed(0)
    meta = {"arch": spec.arch, "image_size": crop, "resize": resize}
    save_checkpoint(ckpt, create_model(spec.name, crop), meta)
    log(f"\n## {role}: {spec.arch} at {crop} px (resize {resize})")
    images = encoded(shards, 2 * max(sizes) + max(sizes))
    pixels = np.stack([decode_image(d, resize, crop=crop) for d in images[: 2 * max(sizes)]])
    result.update(model=spec.arch, crop=crop)
    compile_ok = role in args.compile_models
    variants = bound_variants(
        ckpt, pixels, sizes, device, args.seconds, compile_ok, "swin" in spec.arch, log
    )
    result["bound"] = variants
    # The fastest setting whose scores stay within 1e-2 of fp32's on the MOS scale.
    safe = {k: v for k, v in variants.items() if v["mos_error"] <= 1e-2 and "attention" not in k}
    best_name = max(safe or variants, key=lambda k: (safe or variants)[k]["images_per_s"])
    best = variants[best_name]
    settings = {"precision": best["precision"], "compile": best["compile"]}
    batch = best["batch"]
    a = best["images_per_s"]
    result.update(best=best_name, batch=batch, settings=settings, a=a)
    save()
    log(f"     the bound (a): {best_name}, batch {batch}: {a:.1f} img/s")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    decode_spec = DecodeSpec(resize, crop)
    a1 = actor_only(ckpt, pixels, images, batch, settings, decode_spec, args.seconds)
    result["actor_only"] = a1
    log(
        f"(a') actor-only, batch {batch}: {a1['pixels']:8.1f} img/s from pixels "
        f"(a'/a {a1['pixels'] / a:.2f}), {a1['bytes']:8.1f} img/s from JPEG bytes "
        f"(a'/a {a1['bytes'] / a:.2f})"
    )
    one_core = cpu_decode_rate(images, resize, crop, args.seconds)
    on_device = device_decode_rate(images, resize, crop, batch, device, args.seconds)
    free = (os.cpu_count() or 2) - 1
    result["decode"] = {"cpu_one_core": one_core, "cpu_free_cores": free, "device": on_device}
    log(
        f"decode: {one_core:.1f} img/s on one core (x {free} free CPUs: {free * one_core:.0f}); "
        f"in the actor ({device.type}): {on_device:.1f} img/s"
    )
    save()
    runs = [("actor", 1.0)] + ([("tasks", 1.0)] if role in args.tasks_baseline else [])
    if role == "student" and device.type == "cuda":
        runs.append(("actor", 0.5))
    teacher_cut = args.teacher_shards if role == "teacher" else None
    pool = shards[:teacher_cut] if teacher_cut else shards
    result["pipelines"] = {}
    for where, frac in runs:
        gpus = torch.cuda.device_count() if device.type == "cuda" else 1
        actors = max(1, int(gpus / frac + 1e-9)) if device.type == "cuda" else 1
        scoring = ScoringConfig(
            batch_size=batch,
            concurrency=actors,
            num_gpus=frac if device.type == "cuda" else 0.0,
            num_cpus=1.0,
            torch_threads=1 if device.type == "cuda" else max(1, (os.cpu_count() or 2) - 1),
            decode=where,
            **settings,
        )
        d = pipeline(ckpt, pool, work, scoring)
        if d is None:
            continue
        key = f"decode in {where}, {actors} actor(s) x {frac:g} GPU"
        result["pipelines"][key] = d
        save()
        e2e, steady = d["images_per_s"] / gpus, d["steady_images_per_s"]
        steady = steady / gpus if steady else None
        util = d["steady_utilisation"]
        log(
            f"(d)  pipeline, {key}, batch {batch}: {e2e:8.1f} img/s per GPU   d/a {e2e / a:.2f}   "
            f"({d['images']} images in {d['seconds']:.1f} s, {d['rejected']} rejected, "
            f"first shard at {d['startup']['first_commit']:.1f} s)\n"
            f"     steady state: "
            + (
                f"{steady:8.1f} img/s per GPU   d/a {steady / a:.2f}"
                if steady
                else no_steady_state(len(pool))
            )
            + (f"   GPU busy {', '.join(f'{u:.0f} %' for u in util)}" if util else "")
            + f"\n     decode tasks: {d['steady_decode_tasks'] or 0:.1f} at once in steady state, "
            f"at most {d['max_decode_tasks']}; at most {d['decode_task_peak_mib']:.0f} MiB each "
            f"(USS) against {d['decode_task_reserved_mib']} MiB reserved\n"
            f"     start-up (s from the job's start): "
            + ", ".join(f"{k} {v}" for k, v in d["startup"].items() if v is not None)
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = ["student", "teacher"]  # the student first: its pool is the large one
    p.add_argument("--models", nargs="+", default=roles, choices=roles)
    p.add_argument("--source-size", type=int, default=512, help="side of the pool's JPEGs")
    p.add_argument("--images", type=int, default=4096, help="distinct synthetic images")
    p.add_argument("--copies", type=int, default=25, help="the pool is these many copies")
    p.add_argument("--teacher-shards", type=int, default=32, help="the teacher's (d) pool")
    p.add_argument(
        "--compile-models", nargs="*", default=["teacher"], help="measure torch.compile for"
    )
    p.add_argument(
        "--tasks-baseline",
        nargs="*",
        default=roles,
        help="also run (d) with the decoding in CPU tasks for",
    )
    p.add_argument("--seconds", type=float, default=2.0, help="each (a), (a'), decode timing")
    p.add_argument("--json", default=None, help="write every figure here too")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a smoke run)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    args = p.parse_args()

    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.allow_cpu:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    else:
        sys.exit(
            f"label_gpu.py: no CUDA GPU here (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}: an older NVIDIA driver also hides the GPU), and its "
            "figures would not be a GPU's. "
            "benchmarks/label_throughput.py measures CPU scoring; --allow-cpu runs this "
            "script on the CPU anyway, to check it."
        )
    results: dict = {"machine": describe_machine(device), "models": {}}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))

    def log(line: str) -> None:
        print(line, flush=True)

    with scratch(args.work, "fiqa-gpu-bench-") as work:
        t0 = time.perf_counter()
        shards = make_pool(work, args.images, args.source_size, args.copies)
        n = args.images * args.copies
        results["pool"] = {"shards": len(shards), "images": n, "made_s": time.perf_counter() - t0}
        log(
            f"# {results['machine']}\n# pool: {len(shards)} shards, {n} synthetic "
            f"{args.source_size} px JPEGs (made in {results['pool']['made_s']:.0f} s)"
        )
        save()
        for role in args.models:
            results["models"][role] = {}
            run_model(role, args, device, shards, work, log, results["models"][role], save)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
