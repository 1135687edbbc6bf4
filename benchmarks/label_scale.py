"""A million faces on one small machine: time and memory at 100k and at 1M, and a resume.

    python benchmarks/label_scale.py                        # 100,000 then 1,000,000 images
    python benchmarks/label_scale.py --sizes 20000 40000    # a quick check
    python benchmarks/label_scale.py --resume-images 100000 # the resume on the 100k pool

The pool: synthetic faces (48 px JPEGs) copied with distinct keys into shards of 10,000,
labeled by `fiqa label` with the demo student (random weights) on a local Ray of every CPU,
as a user runs it: a subprocess, which is the driver and starts Ray under it. Sampled every
half second: the driver's RSS, the largest single process's RSS and all of them summed. Every
key must come out exactly once across the labels and rejects tables. Then, on the largest
pool, the run is killed (the driver and its Ray, SIGKILL) once half of its shards are
committed, and rerun: the rerun's time to its first new commit, and the shards it scored.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
from harness import cpu_model, make_checkpoint, make_pool, scratch

from fiqa.data.tables import list_parts

SHARD = 10_000
SOURCE_PX = 48


def label_cmd(ckpt: str, shards: list[str], out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fiqa.cli",
        "label",
        ckpt,
        *shards,
        "--output",
        str(out),
        "--batch-size",
        "256",
        "--num-gpus",
        "0",
    ]


class Memory:
    """Peaks over a run of the driver's RSS, the largest one process's and the sum."""

    def __init__(self, driver: psutil.Process):
        self.driver, self.peak_driver, self.peak_one, self.peak_sum = driver, 0, 0, 0

    def sample(self) -> None:
        try:
            procs = [self.driver, *self.driver.children(recursive=True)]
        except psutil.Error:
            return
        rss = {}
        for p in procs:
            try:
                rss[p.pid] = p.memory_info().rss
            except psutil.Error:
                pass
        if self.driver.pid in rss:
            self.peak_driver = max(self.peak_driver, rss[self.driver.pid])
        self.peak_one = max([self.peak_one, *rss.values()])
        self.peak_sum = max(self.peak_sum, sum(rss.values()))


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process under it, and wait until all are gone.

    Ray's own processes may sit outside the driver's process group, and a commit task left
    running would commit a shard after the count of committed ones was taken.
    """
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        tree = []
    os.killpg(proc.pid, signal.SIGKILL)
    for p in tree:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait()
    psutil.wait_procs(tree, timeout=30)


def run_label(cmd: list[str], out: Path, stop_after_parts: int | None = None) -> dict:
    """One `fiqa label` until it ends (or is killed once ``stop_after_parts`` are committed)."""
    before = set(list_parts(str(out / "labels")))
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    mem = Memory(psutil.Process(proc.pid))
    first_new = None
    while proc.poll() is None:
        mem.sample()
        parts = (
            set(list_parts(str(out / "labels"))) if first_new is None or stop_after_parts else None
        )
        if parts is not None and first_new is None and parts - before:
            first_new = time.perf_counter() - t0
        if stop_after_parts and parts is not None and len(parts) >= stop_after_parts:
            kill_tree(proc)
            break
        time.sleep(0.1 if stop_after_parts else 0.5)  # shards may commit several a second
    seconds = time.perf_counter() - t0
    log = proc.stdout.read()
    if not stop_after_parts and proc.returncode != 0:
        raise RuntimeError(f"fiqa label failed ({proc.returncode}):\n{log[-3000:]}")
    return {
        "seconds": seconds,
        "first_new_commit_s": first_new,
        "driver_peak_mib": mem.peak_driver / 2**20,
        "largest_process_peak_mib": mem.peak_one / 2**20,
        "all_processes_peak_mib": mem.peak_sum / 2**20,
    }


def check_exactly_once(out: Path, images: int) -> dict:
    """Every input key once across labels and rejects; the tables' and summaries' sizes."""
    labels = pq.read_table(list_parts(str(out / "labels")), columns=["key"]).column("key")
    rejects = pq.read_table(list_parts(str(out / "rejects")), columns=["key"]).column("key")
    keys = labels.to_pylist() + rejects.to_pylist()
    if len(keys) != images or len(set(keys)) != images:
        raise AssertionError(f"{len(keys)} rows, {len(set(keys))} distinct keys of {images}")
    summary = out / "label_summary.json"
    return {
        "scored": len(labels),
        "rejected": len(rejects),
        "summary_bytes": summary.stat().st_size,
        "tables_mib": sum(os.path.getsize(p) for p in list_parts(str(out / "labels"))) / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--work", help="keep the pool here (default: a temporary folder)")
    ap.add_argument("--shard", type=int, default=SHARD, help="images per shard")
    ap.add_argument("--no-resume", action="store_true", help="skip the kill-and-resume run")
    ap.add_argument(
        "--resume-images",
        type=int,
        help="the pool of the kill-and-resume run (one of --sizes; default the largest)",
    )
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    sizes, shard = sorted(args.sizes), args.shard
    if any(s % shard for s in sizes):
        ap.error(f"sizes must be multiples of --shard ({shard})")
    if args.resume_images is not None and args.resume_images not in sizes:
        ap.error(f"--resume-images {args.resume_images}: one of --sizes {sizes}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs")
    results: dict = {"runs": []}
    with scratch(args.work, "fiqa-scale-") as work:
        t = time.perf_counter()
        shards = make_pool(work, shard, SOURCE_PX, copies=sizes[-1] // shard, shard_size=shard)
        print(
            f"pool: {len(shards)} shards of {shard:,} {SOURCE_PX} px faces in "
            f"{time.perf_counter() - t:.0f} s"
        )
        ckpt = make_checkpoint("mobilenetv3_small_100", work / "student")
        for n in sizes:
            out = work / f"out-{n}"
            r = run_label(label_cmd(ckpt, shards[: n // shard], out), out)
            r |= check_exactly_once(out, n) | {"images": n}
            results["runs"].append(r)
            print(
                f"{n:>9,} images: {r['seconds']:7.1f} s ({n / r['seconds']:,.0f} img/s), "
                f"driver peak {r['driver_peak_mib']:,.0f} MiB, largest process "
                f"{r['largest_process_peak_mib']:,.0f} MiB, all {r['all_processes_peak_mib']:,.0f} "
                f"MiB, summary {r['summary_bytes']} B, labels {r['tables_mib']:,.0f} MiB"
            )
        if len(results["runs"]) > 1:
            a, b = results["runs"][0], results["runs"][-1]
            scale = b["images"] / a["images"]
            print(
                f"{scale:g}x the images: {b['seconds'] / a['seconds']:.2f}x the time, "
                f"{b['driver_peak_mib'] / a['driver_peak_mib']:.2f}x the driver's peak, "
                f"{b['largest_process_peak_mib'] / a['largest_process_peak_mib']:.2f}x the "
                f"largest process's, {b['summary_bytes'] / a['summary_bytes']:.2f}x the summary"
            )
        if not args.no_resume:
            n = args.resume_images or sizes[-1]
            out = work / "out-resume"
            cmd = label_cmd(ckpt, shards[: n // shard], out)
            half = n // shard // 2
            killed = run_label(cmd, out, stop_after_parts=half)
            done = len(list_parts(str(out / "labels")))
            if done >= n // shard:
                raise SystemExit(f"the kill came after the last of {done} commits: more shards")
            rerun = run_label(cmd, out)
            rerun |= check_exactly_once(out, n)
            scored_again = json.loads((out / "label_summary.json").read_text())["shards"]
            results["resume"] = {
                "killed_after_s": killed["seconds"],
                "committed_before": done,
                "shards": n // shard,
                "rescored_shards": scored_again,
                **rerun,
            }
            print(
                f"resume: killed after {killed['seconds']:.0f} s with {done} of {n // shard} "
                f"shards committed; the rerun scored {scored_again} shard(s), its first new "
                f"commit at {rerun['first_new_commit_s']:.1f} s, done in {rerun['seconds']:.0f} s"
            )
            if scored_again != n // shard - done:
                raise AssertionError("the rerun scored shards that were committed")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
