"""Commands that run the recipe and prepare its data: run, stage, status, make-demo-data, shard, models."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from fiqa import storage
from fiqa.cli.options import add_output, add_set, hidden_alias
from fiqa.cluster.local import ensure_ray
from fiqa.config import ConfigError, load_config
from fiqa.pipelines import STAGE_NAMES, STAGES
from fiqa.runner import iso_time, load_run_config, run_stages, stage_states


def cmd_make_demo_data(args: argparse.Namespace) -> int:
    from fiqa.data.shards import local_output_dir

    if args.output_dir:
        print("fiqa make-demo-data: OUTPUT as an argument is deprecated; use -o", file=sys.stderr)
    out = local_output_dir(args.output_dir or args.output or "data/demo", "-o")
    from tqdm.auto import tqdm

    from fiqa.data.synthetic import DEFAULT_SIZES, make_demo_data  # imports torch

    sizes = dict(DEFAULT_SIZES)
    for item in args.size or []:
        split, _, n = item.partition("=")
        if split not in sizes or not n.isdigit():
            raise ConfigError(f"--size {item!r}: expected SPLIT=N with SPLIT one of {list(sizes)}")
        sizes[split] = int(n)
    if args.scale != 1.0:
        sizes = {k: max(1, int(v * args.scale)) for k, v in sizes.items()}
    with tqdm(total=sum(sizes.values()), unit="img", desc="generating") as bar:
        summary = make_demo_data(
            out,
            seed=args.seed,
            sizes=sizes,
            shard_size=args.shard_size,
            image_size=args.image_size,
            workers=args.workers,
            progress=bar.update,
        )
    print(
        f"wrote {sum(summary['sizes'].values())} samples to {out}: "
        + ", ".join(f"{k}={v}" for k, v in summary["sizes"].items())
    )
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from fiqa.data.shards import local_output_dir

    out = local_output_dir(args.output, "-o")  # like the inputs, before torch is imported
    if not os.path.isdir(args.images):
        raise FileNotFoundError(f"--images {args.images!r} is not a directory")
    if not os.path.isfile(args.labels):
        raise FileNotFoundError(f"--labels {args.labels!r}: no such file")
    from fiqa.data.from_folder import shard_folder  # imports torch

    res = shard_folder(
        args.images,
        args.labels,
        out,
        shard_size=args.shard_size,
        label_field=args.label_field,
        prefix=args.prefix,
    )
    print(f"wrote {res['written']} samples in {len(res['shards'])} shard(s) to {args.output}")
    if res["missing"]:
        print(
            f"warning: {len(res['missing'])} CSV row(s) name no image, e.g. {res['missing'][:3]}",
            file=sys.stderr,
        )
    return 0


def _run(args: argparse.Namespace, only: str | None) -> int:
    from fiqa.models.registry import check_archs  # (torch and timm: a run needs them anyway)

    cfg = load_config(args.config, args.set)
    check_archs(cfg)
    outcome = run_stages(
        cfg,
        STAGES,
        only=only,
        force=getattr(args, "force", False),
        on_start=lambda: ensure_ray(cfg.ray, shared=shared_paths(cfg)),
        until=getattr(args, "until", None),
    )
    ran = [k for k, v in outcome.items() if v == "ran"]
    print(
        f"run {cfg.run_dir}: ran {len(ran)} stage(s)"
        + (f" ({', '.join(ran)})" if ran else "")
        + f", {len(outcome) - len(ran)} up to date"
    )
    print_results(cfg.run_dir)
    return 0


def shared_paths(cfg: Any) -> dict[str, str]:
    """The run's local paths that every node of a cluster must see: ``run_dir``, a shard of
    each local data split, local pretrained weights (`fiqa.cluster.local.check_shared`)."""
    from fiqa.data.shards import expand_shard_spec

    paths = {"run_dir": cfg.run_dir}
    for split in ("labeled_train", "labeled_val", "test", "unlabeled_1", "unlabeled_2"):
        spec = getattr(cfg.data, split)
        first = spec if isinstance(spec, str) else (spec[0] if spec else "")
        if first and not storage.is_remote(first):
            paths[f"data.{split}"] = expand_shard_spec(spec, what=f"data.{split}")[0]
    for model in ("teacher", "student"):
        weights = getattr(cfg, model).pretrained_weights
        if weights:
            paths[f"{model}.pretrained_weights"] = weights
    return paths


def report_paths(run_dir: str) -> tuple[str, str]:
    base = f"{run_dir.rstrip('/')}/evaluate"
    return f"{base}/report.json", f"{base}/report.md"


def print_results(run_dir: str) -> None:
    """The last screen of a run: the report's headline table and findings, and its path."""
    from fiqa.report import headline_text

    json_path, md_path = report_paths(run_dir)
    try:
        report = storage.read_json(json_path)
    except FileNotFoundError:
        return
    print("\n" + headline_text(report) + "\n")
    print(f"report: {md_path}")


def cmd_run(args: argparse.Namespace) -> int:
    return _run(args, None)


def cmd_stage(args: argparse.Namespace) -> int:
    return _run(args, args.name)


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.run_dir, args.set)
    rows = stage_states(cfg, STAGES)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"{'stage':<20} {'state':<8} {'seconds':>8}  {'finished (UTC)':<20}  headline")
    for r in rows:
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
        when = r["finished_at"] or "-"
        if isinstance(when, int | float):  # a manifest written before ISO times
            when = iso_time(when)
        line = f"{r['stage']:<20} {r['state']:<8} {secs:>8}  {when:<20}  {r['headline'] or ''}"
        print(line.rstrip())
    json_path, md_path = report_paths(args.run_dir)
    if storage.exists(md_path):
        print(f"report: {md_path}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from fiqa.models import REGISTRY, create_model, model_cost  # imports timm

    print(f"{'name':<24} {'role':<8} {'px':>4} {'params M':>9} {'GFLOPs':>8}  note")
    for name, spec in REGISTRY.items():
        if args.cost:
            cost = model_cost(create_model(name), spec.image_size)
            params, gflops = f"{cost['params_m']:.2f}", f"{cost['gflops']:.3f}"
        else:
            params = gflops = "-"
        print(
            f"{name:<24} {spec.role:<8} {spec.image_size:>4} {params:>9} {gflops:>8}  {spec.note}"
        )
    return 0


def add_make_demo_data(sub: Any) -> None:
    s = sub.add_parser("make-demo-data", help="generate the synthetic FIQA dataset")
    add_output(
        s, "directory to write the dataset to (default: data/demo, as configs/demo.yaml reads)"
    )
    hidden_alias(s, "output_dir", "-o/--output", nargs="?", metavar="OUTPUT")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument(
        "--size", action="append", metavar="SPLIT=N", help="samples in a split (repeatable)"
    )
    s.add_argument("--scale", type=float, default=1.0, help="multiply every split's size")
    s.add_argument(
        "--shard-size", type=int, default=500, metavar="N", help="samples per shard (default 500)"
    )
    s.add_argument(
        "--image-size", type=int, default=112, metavar="PX", help="image side (default 112)"
    )
    s.add_argument(
        "--workers", type=int, default=None, metavar="N", help="processes (default: all CPUs)"
    )
    s.set_defaults(func=cmd_make_demo_data)


def add_shard(sub: Any) -> None:
    s = sub.add_parser("shard", help="turn a folder of images + name,score CSV into labeled shards")
    s.add_argument("--images", required=True, metavar="DIR", help="folder of images")
    s.add_argument(
        "--labels", required=True, metavar="CSV", help="CSV of image name (relative) and score"
    )
    add_output(s, "directory to write the shards to", required=True)
    s.add_argument(
        "--shard-size", type=int, default=1000, metavar="N", help="samples per shard (default 1000)"
    )
    s.add_argument(
        "--label-field",
        default="mos",
        metavar="NAME",
        help="the label's name in each sample, as data.label_field reads it (default mos)",
    )
    s.add_argument("--prefix", default="labeled", help="shard file name prefix (default labeled)")
    s.set_defaults(func=cmd_shard)


def add_run(sub: Any) -> None:
    s = sub.add_parser("run", help="run all stages (skipping finished ones)")
    s.add_argument("config", metavar="CONFIG", help="the run's YAML config")
    add_set(s, "train_teacher.epochs=3")
    s.add_argument(
        "--until",
        choices=STAGE_NAMES,
        metavar="STAGE",
        help="stop after this stage (a later `fiqa run` goes on from there): "
        + ", ".join(STAGE_NAMES),
    )
    s.set_defaults(func=cmd_run)


def add_stage(sub: Any) -> None:
    s = sub.add_parser("stage", help="run one stage (its upstream stages must be done)")
    s.add_argument("name", choices=STAGE_NAMES, metavar="STAGE", help=", ".join(STAGE_NAMES))
    s.add_argument("config", metavar="CONFIG", help="the run's YAML config")
    add_set(s, "train_teacher.epochs=3")
    s.add_argument("--force", action="store_true", help="run even if it is up to date")
    s.set_defaults(func=cmd_stage)


def add_models(sub: Any) -> None:
    s = sub.add_parser("models", help="list the model registry (any timm name works too)")
    s.add_argument(
        "--cost", action="store_true", help="also build each model and count params, GFLOPs"
    )
    s.set_defaults(func=cmd_models)


def add_status(sub: Any) -> None:
    s = sub.add_parser("status", help="print the stages of a run and their state")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or s3:// prefix")
    add_set(s, "storage.endpoint_url=http://minio:9000")
    s.add_argument("--json", action="store_true", help="print the states as JSON")
    s.set_defaults(func=cmd_status)
