"""Training throughput: a plain PyTorch loop against Ray Train with 1 and N workers, in one run.

All runs train the same model on the same Parquet table with the same global
batch, loss (MSE + PLCC), AdamW and decode + random crop + flip:

- plain: one process; a torch DataLoader whose worker processes decode
  (``--loader-workers``, default: the CPUs Ray would leave to its decode
  tasks), the loop in the main process;
- Ray Train: `fiqa.training.fit` with ``num_workers`` = 1, 2, ... (decode in
  Ray Data CPU tasks, the loop in Ray Train workers, DDP over gloo or nccl).

Images/s are steady state: training-loop time of the epochs after the first
(the first warms up caches, allocators and worker pools), excluding Ray's fixed
startup (cluster, worker group, dataset planning), validation and
checkpointing, which the column "fixed cost" reports separately. Ray's time per
epoch does include its per-epoch cost of restarting the streaming read. "Best
epoch" is the fastest of those epochs: on a machine shared with other work it
is the less disturbed figure. Every run uses the same torch threads
(``--threads``; default: the engine's default for one worker on a local Ray,
all its CPUs: 2 on a 2-core machine, sharing the cores with decoding).

    python benchmarks/train_throughput.py                       # small, CPU, minutes
    python benchmarks/train_throughput.py --rows 4096 --epochs 4 --image-size 64
    python benchmarks/train_throughput.py --gpu --arch swin_base_patch4_window7_224 \\
        --image-size 448 --resize 512 --batch-size 32           # bf16, channels_last
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import tempfile
import time

import numpy as np
import pyarrow as pa

from fiqa.config import TrainConfig
from fiqa.data.synthetic import make_sample
from fiqa.data.tables import SCORED_SCHEMA, list_parts, write_part
from fiqa.training import TrainJob, batch_plan, effective_lr, fit
from fiqa.training.data import decode_train_batch, table_stats


def write_table(directory: str, split: str, n: int, draw: int, parts: int) -> str:
    """``n`` synthetic faces (drawn at ``draw`` px) as a labels table of ``parts`` part files."""
    per = -(-n // parts)
    for p in range(parts):
        samples = [make_sample(0, split, i, draw) for i in range(p * per, min(n, (p + 1) * per))]
        table = pa.table(
            {
                "key": [s.key for s in samples],
                "shard": [f"bench-{p}"] * len(samples),
                "image": [s.jpeg for s in samples],
                "mos": [s.mos for s in samples],
                "raw_score": [None] * len(samples),
                "score": [s.mos for s in samples],
                "score_spread": [None] * len(samples),
                "model_id": [None] * len(samples),
                "source": ["labeled"] * len(samples),
            },
            schema=SCORED_SCHEMA,
        )
        write_part(table, directory, f"part-{p:04d}.parquet")
    return directory


def plain_loop(args: argparse.Namespace, table: str, threads: int) -> list[dict]:
    """The reference: single-process PyTorch, DataLoader workers decode. Per-epoch timings."""
    import pyarrow.parquet as pq
    import torch
    from torch.utils.data import DataLoader

    from fiqa.models.allocator import retain_freed_memory
    from fiqa.models.registry import create_model
    from fiqa.training.step import GradAccumulator

    rows = pq.read_table(list_parts(table), columns=["image", "score", "source"]).to_pydict()
    images = np.array(rows["image"], dtype=object)
    scores = np.array(rows["score"], dtype=np.float32)
    sources = np.array(rows["source"], dtype=object)
    stats = table_stats([table])

    def collate(idx: list[int]) -> dict:
        batch = {"image": images[idx], "score": scores[idx], "source": sources[idx]}
        out = decode_train_batch(batch, args.resize, args.image_size, {}, {"labeled": 0})
        return {k: torch.from_numpy(v) for k, v in out.items()}

    t = TrainConfig(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size)
    micro, accum = batch_plan(t)
    device = torch.device("cuda" if args.gpu else "cpu")
    torch.set_num_threads(threads)
    retain_freed_memory()  # as the Ray Train workers do
    torch.manual_seed(0)
    model = create_model(args.arch, args.image_size).to(device)
    if args.gpu:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=effective_lr(t), weight_decay=t.weight_decay)
    loader = DataLoader(
        range(len(images)),
        batch_size=micro,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        num_workers=args.loader_workers,
        persistent_workers=args.loader_workers > 0,
        pin_memory=args.gpu,
    )
    epochs = []
    for epoch in range(args.epochs):
        model.train()
        acc = GradAccumulator(
            model,
            accum,
            1,
            stats.target_mean,
            stats.target_std,
            autocast_bf16=args.gpu,
            channels_last=args.gpu,
        )
        t0 = time.perf_counter()
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if acc.backward(batch):
                opt.step()
                opt.zero_grad(set_to_none=True)
        if args.gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        n = acc.micro_batches * micro
        epochs.append({"epoch": epoch + 1, "rows": n, "seconds": seconds})
        print(f"  plain epoch {epoch + 1}: {n / seconds:.1f} img/s", flush=True)
    return epochs


def ray_train(args: argparse.Namespace, tables: dict, workers: int, out: str) -> dict:
    cpus = os.cpu_count() or 1
    # Leave at least one CPU to the decode tasks that feed the workers.
    cpus_per_worker = 1.0 if args.gpu else min(1.0, max(cpus - 1, 0.5) / workers)
    job = TrainJob(
        name=f"bench_{workers}w",
        arch=args.arch,
        image_size=args.image_size,
        resize=args.resize,
        train_tables=[tables["train"]],
        val_table=tables["val"],
        out_dir=out,
        train=TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            micro_batch_size=args.micro_batch_size,
            num_workers=workers,
            use_gpu=args.gpu,
            cpus_per_worker=cpus_per_worker,
            torch_threads=args.threads or None,
        ),
        config_fingerprint="benchmark",
    )
    t0 = time.perf_counter()
    fit(job)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    epochs = [
        {
            "epoch": h["epoch"],
            "rows": sum(h["rows_by_source"].values()),
            "seconds": h["train_seconds"],
        }
        for h in history
    ]
    for h in history:
        print(
            f"  ray {workers}w epoch {h['epoch']}: {h['images_per_s']:.1f} img/s "
            f"(waiting for data {100 * h['data_wait_frac']:.0f}% of the loop)",
            flush=True,
        )
    return {"epochs": epochs, "wall": wall, "cpus_per_worker": cpus_per_worker}


def steady(epochs: list[dict]) -> float:
    """Images/s over the epochs after the first."""
    rest = epochs[1:] or epochs
    return sum(e["rows"] for e in rest) / sum(e["seconds"] for e in rest)


def best(epochs: list[dict]) -> float:
    """Images/s of the fastest epoch after the first: less sensitive to other load on the machine."""
    return max(e["rows"] / e["seconds"] for e in (epochs[1:] or epochs))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet10t")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--resize", type=int, default=72)
    p.add_argument("--rows", type=int, default=2048, help="training rows")
    p.add_argument("--draw", type=int, default=80, help="px of the synthetic images on disk")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--workers", default="1,2", help="Ray Train worker counts to run")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the engine's default)")
    p.add_argument("--loader-workers", type=int, default=None)
    p.add_argument("--gpu", action="store_true", help="CUDA, bf16 autocast, channels_last")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    cpus = os.cpu_count() or 1
    if args.loader_workers is None:
        args.loader_workers = max(1, cpus - 1) if not args.gpu else min(8, cpus)
    counts = [int(w) for w in args.workers.split(",") if w]
    if args.micro_batch_size is None:
        args.micro_batch_size = args.batch_size // max(counts)  # same micro-batch in every run
    load_before = os.getloadavg()

    import ray
    import torch

    with tempfile.TemporaryDirectory(prefix="fiqa-train-bench-") as tmp:
        tables = {
            "train": write_table(f"{tmp}/train", "labeled_train", args.rows, args.draw, 8),
            "val": write_table(f"{tmp}/val", "labeled_val", 64, args.draw, 1),
        }
        # the engine's default for one worker on a local Ray: all its CPUs
        threads = args.threads or (1 if args.gpu else cpus)
        print(f"plain PyTorch loop ({args.loader_workers} loader workers, {threads} threads)")
        results = {"plain": {"epochs": plain_loop(args, tables["train"], threads)}}
        ray.init(
            num_cpus=cpus,
            num_gpus=torch.cuda.device_count() if args.gpu else 0,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=_free_port(),
            configure_logging=False,
            log_to_driver=False,
        )
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = False
        ctx.enable_progress_bars = False
        try:
            for w in counts:
                print(f"Ray Train, {w} worker(s)")
                results[f"ray_{w}"] = ray_train(args, tables, w, f"{tmp}/ray_{w}")
        finally:
            ray.shutdown()

    plain = steady(results["plain"]["epochs"])
    print()
    print(
        f"{args.arch} at {args.image_size} px, {args.rows} rows, global batch {args.batch_size}, "
        f"micro-batch {args.micro_batch_size}, {args.epochs} epochs, "
        f"{'CUDA bf16' if args.gpu else 'CPU fp32'}; {platform.processor() or platform.machine()}, "
        f"{cpus} CPUs, torch {torch.__version__}, ray {ray.__version__}"
    )
    print(f"load average before: {load_before[0]:.2f}, after: {os.getloadavg()[0]:.2f}")
    print()
    print(
        "| run | steady img/s | per worker | vs plain | best epoch img/s | vs plain "
        "| fixed cost (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    plain_best = best(results["plain"]["epochs"])
    print(
        f"| plain PyTorch (1 process) | {plain:.1f} | {plain:.1f} | 1.00 | {plain_best:.1f} "
        f"| 1.00 | |"
    )
    summary = {"plain": plain, "plain_best": plain_best}
    for w in counts:
        r = results[f"ray_{w}"]
        ips, top = steady(r["epochs"]), best(r["epochs"])
        fixed = r["wall"] - sum(e["seconds"] for e in r["epochs"])
        summary[f"ray_{w}"], summary[f"ray_{w}_best"] = ips, top
        print(
            f"| Ray Train, {w} worker(s) | {ips:.1f} | {ips / w:.1f} | {ips / plain:.2f} "
            f"| {top:.1f} | {top / plain_best:.2f} | {fixed:.1f} |"
        )
    print()
    if 1 in counts:
        ratio = summary["ray_1"] / plain
        verdict = "meets" if ratio >= 0.9 else "MISSES"
        print(
            f"Ray Train 1 worker / plain = {ratio:.2f} ({verdict} the 0.9 target); "
            f"best epochs: {summary['ray_1_best'] / plain_best:.2f}"
        )
    for w in counts:
        if w > 1 and 1 in counts:
            print(
                f"Ray Train {w} workers / 1 worker = {summary[f'ray_{w}'] / summary['ray_1']:.2f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "steady_images_per_s": summary, "runs": results}, f)


if __name__ == "__main__":
    main()
