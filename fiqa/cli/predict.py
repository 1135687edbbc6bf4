"""`fiqa predict` (score files, folders and shards in-process) and `fiqa export` (ONNX, TorchScript)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter
from typing import Any

import numpy as np

from fiqa.cli.options import add_output, option
from fiqa.models.meta import EXPORT_FORMATS, ONNX_EXPORTERS, checkpoint_dir, read_meta
from fiqa.models.predictor import TRUST_FLAG, open_predictor
from fiqa.predict import check_output_path, format_table, predict, resolve_inputs, write_predictions

TABLE_MAX_ROWS = 20  # more rows than this get a summary instead of a table


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if "torch" not in sys.modules:
        # Spinning OpenMP workers starve the decode threads sharing their cores; read at torch load.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.output:
        check_output_path(args.output)
    inputs = resolve_inputs(args.inputs)
    predictor = open_predictor(args.model, args.device, trust_model_code=args.trust_model_code)
    n_files = sum(1 for kind, _ in inputs if kind == "file")
    total = n_files if n_files == len(inputs) else None  # a shard's size is known once read
    rows: list[dict] = []
    stats: dict = {}
    t0 = time.perf_counter()
    with tqdm(total=total, unit="img", desc="scoring", disable=None, leave=False) as bar:
        for row in predict(predictor, inputs, args.batch_size, args.workers, stats=stats):
            rows.append(row)
            bar.update(1)
    seconds = time.perf_counter() - t0
    rejected = Counter(r["reason"].split(":")[0] for r in rows if r["reason"])
    scored = len(rows) - sum(rejected.values())

    if len(rows) <= TABLE_MAX_ROWS:
        print(format_table(rows))
    if args.output:
        write_predictions(rows, args.output)
    summary = (
        f"scored {scored} of {len(rows)} image(s) in {seconds:.1f} s "
        f"({scored / seconds if seconds > 0 else math.inf:.0f} img/s; model "
        f"{stats.get('model_s', 0.0):.1f} s) with {predictor.backend} on {predictor.device}"
    )
    if rejected:
        summary += "; rejected: " + ", ".join(f"{k} {v}" for k, v in rejected.most_common())
    print(summary)
    if not predictor.calibrated:
        print("note: the model has no calibration; score = raw_score", file=sys.stderr)
    if args.output:
        print(f"wrote {len(rows)} row(s) to {args.output}")
    elif len(rows) > TABLE_MAX_ROWS:
        valid = [r["score"] for r in rows if r["score"] is not None]
        if valid:
            print(
                f"score: mean {np.mean(valid):.4f}, min {np.min(valid):.4f}, "
                f"max {np.max(valid):.4f}"
            )
        print(f"hint: add -o FILE.csv (or .parquet, .json, .jsonl) to keep all {len(rows)} rows")
    return 0 if scored else 1


def cmd_export(args: argparse.Namespace) -> int:
    model = checkpoint_dir(args.model)
    read_meta(model)  # a missing or unreadable checkpoint fails here, before torch loads
    from fiqa.models.export import export_checkpoint  # imports torch

    meta = export_checkpoint(
        model,
        args.format,
        args.output,
        batch=args.batch_size,
        opset=args.opset,
        exporter=args.exporter,
        check=not args.no_check,
    )
    size = meta["image_size"]
    print(
        f"wrote {args.output} ({args.format}, {meta['exporter']}"
        + (f", opset {meta['opset']}" if meta.get("opset") else "")
        + f") and {args.output}.json: "
        f"{meta['arch']}, input pixels uint8 [batch, {size}, {size}, 3] RGB "
        f"(resize {meta['resize']}, center crop {size}), outputs raw_score, score"
        + ("" if meta["calibration"] else " (= raw_score: no calibration)")
    )
    if "parity" in meta:
        p = meta["parity"]
        print(
            f"parity with PyTorch on a batch of {p['batch']}: max abs diff raw "
            f"{p['max_abs_diff_raw']:.2e}, score {p['max_abs_diff_score']:.2e}"
        )
    return 0


MODEL_HELP = "a checkpoint directory (model.json + model.safetensors), or either file"


def add_export(sub: Any) -> None:
    s = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX or TorchScript (uint8 NHWC pixels in, scores out)",
    )
    s.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    s.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="the export's format")
    add_output(s, "the file to write; OUTPUT.json goes beside it", required=True)
    option(
        s,
        "--batch-size",
        deprecated=["--batch"],
        type=int,
        default=2,
        metavar="N",
        help="example batch to trace with (the axis is dynamic; default 2)",
    )
    s.add_argument(
        "--opset", type=int, default=None, metavar="N", help="ONNX opset (default: the exporter's)"
    )
    s.add_argument(
        "--exporter",
        choices=ONNX_EXPORTERS,
        default="auto",
        help="ONNX exporter: torch.export-based (dynamo), the legacy tracer, or dynamo then legacy",
    )
    s.add_argument("--no-check", action="store_true", help="skip the parity check against PyTorch")
    s.set_defaults(func=cmd_export)


def add_predict(sub: Any) -> None:
    s = sub.add_parser("predict", help="score image files, folders and shards with a model")
    s.add_argument("model", metavar="MODEL", help=MODEL_HELP + ", an .onnx or a TorchScript export")
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="image, folder or shard spec")
    add_output(s, "write every row to FILE (.csv, .parquet, .json or .jsonl)", metavar="FILE")
    s.add_argument(
        "--batch-size", type=int, default=64, metavar="N", help="images per model call (default 64)"
    )
    s.add_argument(
        "--device", default="auto", help="auto (GPU when there is one), cpu, cuda or cuda:N"
    )
    s.add_argument(
        "--workers", type=int, default=None, metavar="N", help="decode threads (default: up to 4)"
    )
    s.add_argument(
        TRUST_FLAG,
        action="store_true",
        help="load a TorchScript MODEL (loading one can run code it carries; checkpoints and "
        "ONNX need no flag)",
    )
    s.set_defaults(func=cmd_predict)
