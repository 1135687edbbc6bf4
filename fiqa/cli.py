"""The `fiqa` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from fiqa import storage
from fiqa.config import ConfigError, load_config
from fiqa.storage import StorageError


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def cmd_make_demo_data(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from fiqa.data.synthetic import DEFAULT_SIZES, make_demo_data

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
            args.out,
            seed=args.seed,
            sizes=sizes,
            shard_size=args.shard_size,
            image_size=args.image_size,
            workers=args.workers,
            progress=bar.update,
        )
    print(
        f"wrote {sum(summary['sizes'].values())} samples to {args.out}: "
        + ", ".join(f"{k}={v}" for k, v in summary["sizes"].items())
    )
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from fiqa.data.from_folder import shard_folder

    res = shard_folder(
        args.images,
        args.labels,
        args.out,
        shard_size=args.shard_size,
        label_field=args.label_field,
        prefix=args.prefix,
    )
    print(f"wrote {res['written']} samples in {len(res['shards'])} shard(s) to {args.out}")
    if res["missing"]:
        print(
            f"warning: {len(res['missing'])} CSV row(s) name no image, e.g. {res['missing'][:3]}",
            file=sys.stderr,
        )
    return 0


def _run(args: argparse.Namespace, only: str | None) -> int:
    from fiqa.cluster.local import ensure_ray
    from fiqa.pipelines import STAGES
    from fiqa.runner import run_stages

    cfg = load_config(args.config, args.set)
    outcome = run_stages(
        cfg,
        STAGES,
        only=only,
        force=getattr(args, "force", False),
        on_start=lambda: ensure_ray(cfg.ray),
    )
    ran = [k for k, v in outcome.items() if v == "ran"]
    print(
        f"run {cfg.run_dir}: ran {len(ran)} stage(s)"
        + (f" ({', '.join(ran)})" if ran else "")
        + f", {len(outcome) - len(ran)} up to date"
    )
    report = f"{cfg.run_dir.rstrip('/')}/evaluate/report.md"
    if storage.exists(report):
        print(f"report: {report}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return _run(args, None)


def cmd_stage(args: argparse.Namespace) -> int:
    return _run(args, args.name)


def cmd_status(args: argparse.Namespace) -> int:
    from fiqa.pipelines import STAGES
    from fiqa.runner import load_run_config, stage_states

    cfg = load_run_config(args.run_dir, args.set)
    rows = stage_states(cfg, STAGES)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"{'stage':<22} {'state':<8} {'seconds':>8}")
    for r in rows:
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
        print(f"{r['stage']:<22} {r['state']:<8} {secs:>8}")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from fiqa.calibration import Logistic4
    from fiqa.cluster.local import ensure_ray
    from fiqa.config import RayConfig, ScoringConfig, StorageConfig, check_scoring_config
    from fiqa.labeling import label_shards

    conc = [int(c) for c in args.concurrency.split(",")] if args.concurrency else [1]
    label = ScoringConfig(
        batch_size=args.batch_size,
        concurrency=conc[0] if len(conc) == 1 else conc,
        num_gpus=args.num_gpus,
        num_cpus=args.num_cpus,
        decode_cpus=args.decode_cpus,
        compile=args.compile,
        pin_cores={"auto": None, "yes": True, "no": False}[args.pin_cores],
        buffer_mb=args.buffer_mb,
    )
    check_scoring_config(label, "label")
    storage.configure(StorageConfig(endpoint_url=args.endpoint_url))
    calibration = None
    if args.calibration:
        raw = storage.read_json(args.calibration)  # local or s3://
        calibration = Logistic4.from_dict(raw.get("calibration", raw))
    stats = label_shards(
        args.model,
        args.input,
        args.output,
        label,
        calibration=calibration,
        source=args.source,
        max_pixels=args.max_pixels,
        min_side=args.min_side,
        on_start=lambda: ensure_ray(RayConfig(address=args.address, num_cpus=args.num_cpus_total)),
    )
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(stats["reasons"].items())) or "none"
    print(
        f"labeled {stats['scored']} and rejected {stats['rejected']} samples from "
        f"{stats['shards']} shard(s) ({stats['shards_skipped']} already done) into {args.output}\n"
        f"reject reasons: {reasons}"
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from fiqa.models import REGISTRY, create_model, model_cost

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


def build_parser() -> argparse.ArgumentParser:
    from fiqa.pipelines import STAGE_NAMES

    p = argparse.ArgumentParser(prog="fiqa", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-demo-data", help="generate the synthetic FIQA dataset")
    s.add_argument("out")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--size", action="append", metavar="SPLIT=N", help="samples in a split (repeatable)"
    )
    s.add_argument("--scale", type=float, default=1.0, help="multiply every split's size")
    s.add_argument("--shard-size", type=int, default=500)
    s.add_argument("--image-size", type=int, default=112)
    s.add_argument("--workers", type=int, default=None)
    s.set_defaults(func=cmd_make_demo_data)

    s = sub.add_parser("shard", help="turn a folder of images + name,score CSV into labeled shards")
    s.add_argument("--images", required=True)
    s.add_argument("--labels", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--shard-size", type=int, default=1000)
    s.add_argument("--label-field", default="mos")
    s.add_argument("--prefix", default="labeled")
    s.set_defaults(func=cmd_shard)

    for name, func, helptext in (("run", cmd_run, "run all stages (skipping finished ones)"),):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("config")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        s.set_defaults(func=func)

    s = sub.add_parser("stage", help="run one stage (its upstream stages must be done)")
    s.add_argument("name", choices=STAGE_NAMES)
    s.add_argument("config")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--force", action="store_true", help="run even if it is up to date")
    s.set_defaults(func=cmd_stage)

    s = sub.add_parser(
        "label",
        help="score shards with a trained checkpoint into Parquet (resumes where it stopped)",
        description="Label any shard spec with any checkpoint, writing OUTPUT/labels/*.parquet "
        "and OUTPUT/rejects/*.parquet (the pseudo-labeling stages' engine). Rerunning the same "
        "command scores only the shards without committed output.",
    )
    s.add_argument("--model", required=True, help="checkpoint directory (model.json + weights)")
    s.add_argument(
        "--input", required=True, nargs="+", help="shard spec(s): path, dir, glob, {a..b}, s3://"
    )
    s.add_argument("--output", required=True, help="output directory or s3:// prefix")
    s.add_argument(
        "--calibration",
        help="JSON with b1..b4 (or a model.json) mapping raw scores to the MOS scale; "
        "default: the calibration stored in the checkpoint",
    )
    s.add_argument("--source", default="pseudo", help="value of the table's source column")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--concurrency", metavar="N|MIN,MAX", help="scoring actors (default 1)")
    s.add_argument("--num-gpus", type=float, default=None, help="per actor (default: 1 if any)")
    s.add_argument("--num-cpus", type=float, default=1.0, help="per actor")
    s.add_argument("--decode-cpus", type=float, default=1.0, help="per decode task")
    s.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    s.add_argument(
        "--pin-cores",
        choices=["auto", "yes", "no"],
        default="auto",
        help="CPU actors on cores of their own, decoding on the rest (auto: where a node's "
        "cores are all its processes may use)",
    )
    s.add_argument(
        "--buffer-mb",
        type=int,
        help="object store for decoded batches awaiting the actors (default: what the actors, 4 blocks or 1,024 images each, or the decode tasks, 16/3 blocks each, need, whichever is more)",
    )
    s.add_argument("--max-pixels", type=int, default=40_000_000)
    s.add_argument("--min-side", type=int, default=16)
    s.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else local)")
    s.add_argument(
        "--endpoint-url", help="S3-compatible store (default: AWS_ENDPOINT_URL_S3, else AWS)"
    )
    s.add_argument("--num-cpus-total", type=int, help="CPUs of the local Ray (default: all)")
    s.set_defaults(func=cmd_label)

    s = sub.add_parser("models", help="list the model registry (any timm name works too)")
    s.add_argument(
        "--cost", action="store_true", help="also build each model and count params, GFLOPs"
    )
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("status", help="print the stages of a run and their state")
    s.add_argument("run_dir", help="a run directory or s3:// prefix")
    s.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. storage.endpoint_url"
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    from fiqa.predict import add_commands as add_predict_commands  # export, predict

    add_predict_commands(sub)

    from fiqa.cluster.submit import add_commands as add_submit_commands  # submit, jobs, stop

    add_submit_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, StorageError) as e:
        print(f"fiqa: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
