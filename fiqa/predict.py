"""Score images with a trained model, in-process: `fiqa predict` (and the `fiqa export` command).

For a laptop or an edge box, no Ray: inputs are read and decoded on a small
thread pool (PIL releases the GIL) while the model scores the previous batch.

- The model is a checkpoint directory (``model.json`` + ``model.safetensors``,
  local or s3://), an ONNX export (run with ONNX Runtime) or a TorchScript
  export (see `fiqa.models.export`). All three go through the same contract:
  uint8 NHWC pixels in, ``raw_score`` and calibrated ``score`` out.
- Inputs are image files, folders (searched recursively for images and
  ``.tar`` shards), and shard specs (a tar path, glob, brace pattern or
  ``s3://`` URL, as in the run config).
- Images are prepared exactly as the scoring engine prepares them
  (`fiqa.data.decode.decode_image`: ``resize`` px, center crop of
  ``image_size``), so a checkpoint scores
  an image here as it did when it pseudo-labeled it (in float32; the engine
  uses bfloat16 on GPU).
- An input that cannot be used (not an image, truncated, too small, a bad
  shard) gets a row with a ``reason`` instead of scores; it never stops the run.

This module imports neither torch nor onnxruntime at import time: the CLI
stays quick, and an ONNX model never loads torch.
"""

from __future__ import annotations

import argparse
import csv
import glob as globlib
import io
import json
import math
import os
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import braceexpand
import numpy as np

from fiqa import storage
from fiqa.data.decode import RejectedSample, decode_image
from fiqa.data.reader import read_shard
from fiqa.data.shards import expand_shard_spec
from fiqa.storage import is_remote

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
OUTPUT_FORMATS = (".csv", ".parquet", ".json", ".jsonl")
DEVICES = ("auto", "cpu", "cuda")
TABLE_MAX_ROWS = 20
# As in fiqa.models.export (not imported here: it imports torch, and the CLI builds its parser).
EXPORT_FORMATS = ("onnx", "torchscript")
ONNX_EXPORTERS = ("auto", "dynamo", "legacy")
# Label problems in a shard's json do not stop an image from being scored.
_LABEL_REASONS = ("bad_json", "bad_label", "no_label")


# --------------------------------------------------------------------------- the model


@dataclass
class Predictor:
    """A loaded model: ``predictor(pixels)`` -> ``(raw_score, score)`` as float64 arrays.

    ``pixels`` is uint8 ``[N, image_size, image_size, 3]`` (RGB), prepared as
    described in `fiqa.models.export`.
    """

    meta: dict[str, Any]
    backend: str  # "torch" (checkpoint), "torchscript" or "onnxruntime"
    device: str
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] = field(repr=False)

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def resize(self) -> int:
        return int(self.meta.get("resize", self.meta["image_size"]))

    @property
    def calibrated(self) -> bool:
        return bool(self.meta.get("calibration"))

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = self.image_size
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise ValueError(
                f"expected uint8 pixels of shape [N, {s}, {s}, 3], got {pixels.dtype} {pixels.shape}"
            )
        raw, score = self.run(np.ascontiguousarray(pixels))
        return np.asarray(raw, dtype=np.float64), np.asarray(score, dtype=np.float64)


def model_kind(path: str) -> str:
    """``checkpoint``, ``onnx`` or ``torchscript``: what ``path`` holds."""
    if not is_remote(path) and not os.path.exists(path):
        raise FileNotFoundError(
            f"model {path!r} does not exist (expected a checkpoint directory, an .onnx or a "
            "TorchScript .pt export)"
        )
    if path.endswith(".onnx"):
        return "onnx"
    if is_remote(path):
        fs, key = storage.filesystem(path)
        if storage.retry(lambda: fs.isdir(key), path, "stat"):
            return "checkpoint"
        head = storage.retry(lambda: fs.cat_file(key, start=0, end=4), path, "read")
        return "torchscript" if head.startswith(b"PK") else "onnx"
    if os.path.isdir(path):
        return "checkpoint"
    # TorchScript files are zip archives; anything else is given to ONNX Runtime to judge.
    return "torchscript" if zipfile.is_zipfile(path) else "onnx"


def _sidecar(path: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(path + ".json"))
    except (FileNotFoundError, ValueError):
        return None


def _torch_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: PyTorch sees no CUDA GPU on this machine")
    return device


def open_predictor(path: str, device: str = "auto") -> Predictor:
    """Load a checkpoint directory, an ONNX or a TorchScript export for scoring."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"--device {device!r}: expected one of {DEVICES} (or cuda:N)")
    kind = model_kind(path)
    if kind == "onnx":
        return _open_onnx(path, device)
    if kind == "torchscript":
        return _open_torchscript(path, device)
    return _open_checkpoint(path, device)


def _open_checkpoint(path: str, device: str) -> Predictor:
    import torch

    from fiqa.models.export import scoring_module

    dev = _torch_device(device)
    module, meta = scoring_module(path, map_location=dev)

    def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            raw, score = module(torch.from_numpy(pixels).to(dev))
        return raw.double().cpu().numpy(), score.double().cpu().numpy()

    return Predictor(meta, "torch", dev, run)


def _open_torchscript(path: str, device: str) -> Predictor:
    import warnings

    import torch

    from fiqa.models.export import TORCHSCRIPT_META

    dev = _torch_device(device)
    extra = {TORCHSCRIPT_META: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
        try:
            module = torch.jit.load(
                io.BytesIO(storage.read_bytes(path)), map_location=dev, _extra_files=extra
            )
        except RuntimeError as e:
            raise ValueError(f"{path}: not a TorchScript file ({str(e).splitlines()[0]})") from None
    meta = json.loads(extra[TORCHSCRIPT_META]) if extra[TORCHSCRIPT_META] else _sidecar(path)
    if not meta:
        raise ValueError(f"{path}: a TorchScript file without fiqa metadata (not a `fiqa export`)")
    module.eval()

    def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            raw, score = module(torch.from_numpy(pixels).to(dev))
        return raw.double().cpu().numpy(), score.double().cpu().numpy()

    return Predictor(meta, "torchscript", dev, run)


def _open_onnx(path: str, device: str) -> Predictor:
    from fiqa.models.export import METADATA_KEY, require_onnx

    require_onnx("onnxruntime")
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" not in available:
        raise ValueError(
            f"--device {device}: this onnxruntime has no CUDAExecutionProvider "
            "(install onnxruntime-gpu, or use --device cpu)"
        )
    use_cuda = device != "cpu" and "CUDAExecutionProvider" in available
    providers = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT warns about unused initialisers otherwise
    # Decode threads share the cores: spinning pool threads starve them (2-5x slower on 2 cores).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = storage.read_bytes(path) if is_remote(path) else path
    try:
        session = ort.InferenceSession(source, sess_options=opts, providers=providers)
    except Exception as e:  # ORT raises its own error types on files that are not ONNX
        raise ValueError(f"{path}: not an ONNX model ONNX Runtime can load ({e})") from None
    embedded = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    meta = json.loads(embedded) if embedded else _sidecar(path)
    if not meta:
        raise ValueError(f"{path}: an ONNX model without fiqa metadata (not a `fiqa export`)")
    input_name = session.get_inputs()[0].name

    def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raw, score = session.run(["raw_score", "score"], {input_name: pixels})
        return raw, score

    return Predictor(meta, "onnxruntime", "cuda" if use_cuda else "cpu", run)


# --------------------------------------------------------------------------- the inputs


def _walk(root: str) -> list[tuple[str, str]]:
    found = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for f in sorted(files):
            low = f.lower()
            if low.endswith(IMAGE_EXTENSIONS):
                found.append(("file", os.path.join(dirpath, f)))
            elif low.endswith(".tar"):
                found.append(("shard", os.path.join(dirpath, f)))
    return found


def _classify_local(path: str, named: bool) -> list[tuple[str, str]]:
    if os.path.isdir(path):
        return _walk(path)
    if path.lower().endswith(".tar"):
        return [("shard", path)]
    # A file named on the command line is always tried; from a pattern, only images.
    return [("file", path)] if named or path.lower().endswith(IMAGE_EXTENSIONS) else []


def resolve_inputs(items: Iterable[str]) -> list[tuple[str, str]]:
    """Command-line inputs -> ``[("file" | "shard", location), ...]`` in order, without repeats.

    A folder contributes its images and ``.tar`` shards (recursively); a local
    glob or brace pattern the files it matches; an ``s3://`` URL is a shard spec
    (or one image when it ends with an image extension).
    """
    out: list[tuple[str, str]] = []
    for item in items:
        if is_remote(item):
            if item.lower().endswith(IMAGE_EXTENSIONS):
                if not storage.exists(item):
                    raise FileNotFoundError(f"input {item!r} does not exist")
                out.append(("file", item))
            else:
                out.extend(("shard", url) for url in expand_shard_spec(item))
            continue
        if os.path.exists(item):
            found = _classify_local(item, named=True)
        else:
            matches = [
                m
                for pattern in braceexpand.braceexpand(os.path.expanduser(item))
                for m in (
                    sorted(globlib.glob(pattern, recursive=True))
                    if any(c in pattern for c in "*?[")
                    else ([pattern] if os.path.exists(pattern) else [])
                )
            ]
            if not matches:
                raise FileNotFoundError(f"input {item!r} names no file, folder or shard")
            found = [x for m in matches for x in _classify_local(m, named=False)]
        if not found:
            raise FileNotFoundError(f"input {item!r} holds no image (or .tar shard)")
        out.extend(found)
    return list(dict.fromkeys(out))


def iter_records(inputs: list[tuple[str, str]]) -> Iterator[dict]:
    """One record per image: ``path``, ``key`` (sample key in a shard, else ""), ``image``, ``reason``.

    A file's bytes are read later, on the decode threads (``image`` is None).
    """
    for kind, loc in inputs:
        if kind == "file":
            yield {"path": loc, "key": "", "image": None, "reason": None}
            continue
        n = 0
        for rec in read_shard(loc):
            n += 1
            reason = rec["reason"]
            if reason in _LABEL_REASONS and rec["image"]:
                reason = None
            yield {"path": loc, "key": rec["key"], "image": rec["image"], "reason": reason}
        if n == 0:
            yield {"path": loc, "key": "", "image": b"", "reason": "empty_shard"}


def prepare(
    rec: dict, resize: int, crop: int, max_pixels: int = 40_000_000, min_side: int = 16
) -> tuple[np.ndarray | None, str | None]:
    """A record's pixels (uint8, crop x crop x 3) as the scoring engine makes them, or a reason."""
    if rec["reason"]:
        return None, rec["reason"]
    data = rec["image"]
    if data is None:
        try:
            data = storage.read_bytes(rec["path"])
        except OSError as e:  # named by the OS or store error, not by storage's wrapper
            cause = e.__cause__ if isinstance(e, storage.StorageError) and e.__cause__ else e
            return None, f"unreadable_file: {type(cause).__name__}"
    try:
        return decode_image(data, resize, max_pixels, min_side, crop=crop), None
    except RejectedSample as e:
        return None, e.reason


def _batched(it: Iterable[dict], n: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def predict(
    predictor: Predictor,
    inputs: list[tuple[str, str]],
    batch_size: int = 64,
    workers: int | None = None,
    max_pixels: int = 40_000_000,
    min_side: int = 16,
    stats: dict | None = None,
) -> Iterator[dict]:
    """Score ``inputs`` (from `resolve_inputs`); yields one row per image, in input order.

    A row has ``path``, ``key``, ``raw_score``, ``score`` (None when rejected)
    and ``reason`` (None when scored). Decoding of the next batch overlaps with
    the model's work on the current one. ``stats``, when given, receives the
    seconds spent in the model (``model_s``).
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    workers = workers or min(4, os.cpu_count() or 1)
    size, resize = predictor.image_size, predictor.resize
    stats = stats if stats is not None else {}
    stats.setdefault("model_s", 0.0)

    with ThreadPoolExecutor(workers, thread_name_prefix="fiqa-decode") as pool:

        def submit(chunk: list[dict] | None) -> list[tuple[dict, Future]] | None:
            if chunk is None:
                return None
            return [(r, pool.submit(prepare, r, resize, size, max_pixels, min_side)) for r in chunk]

        chunks = _batched(iter_records(inputs), batch_size)
        pending = submit(next(chunks, None))
        while pending is not None:
            upcoming = submit(next(chunks, None))  # decode the next batch meanwhile
            prepared = [(r, *f.result()) for r, f in pending]
            ok = [i for i, (_, pix, _) in enumerate(prepared) if pix is not None]
            raw = score = np.zeros(0)
            if ok:
                t0 = time.perf_counter()
                raw, score = predictor(np.stack([prepared[i][1] for i in ok]))
                stats["model_s"] += time.perf_counter() - t0
            pos = {i: j for j, i in enumerate(ok)}
            for i, (rec, _, reason) in enumerate(prepared):
                j = pos.get(i)
                yield {
                    "path": rec["path"],
                    "key": rec["key"],
                    "raw_score": None if j is None else float(raw[j]),
                    "score": None if j is None else float(score[j]),
                    "reason": reason,
                }
            pending = upcoming


# --------------------------------------------------------------------------- the outputs


def check_output_path(out: str) -> None:
    if not out.lower().endswith(OUTPUT_FORMATS):
        raise ValueError(f"--out {out!r}: expected a file ending in one of {OUTPUT_FORMATS}")


def write_predictions(rows: list[dict], out: str) -> None:
    """Write rows to ``out``: .csv, .parquet, .json (an array) or .jsonl (one object a line)."""
    check_output_path(out)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    cols = ("path", "key", "raw_score", "score", "reason")
    low = out.lower()
    tmp = out + ".tmp"
    if low.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "path": pa.array([r["path"] for r in rows], pa.string()),
                "key": pa.array([r["key"] for r in rows], pa.string()),
                "raw_score": pa.array([r["raw_score"] for r in rows], pa.float64()),
                "score": pa.array([r["score"] for r in rows], pa.float64()),
                "reason": pa.array([r["reason"] for r in rows], pa.string()),
            }
        )
        pq.write_table(table, tmp)
    elif low.endswith(".csv"):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in rows:
                w.writerow(["" if r[c] is None else r[c] for c in cols])
    else:
        with open(tmp, "w") as f:
            if low.endswith(".jsonl"):
                for r in rows:
                    f.write(json.dumps({c: r[c] for c in cols}) + "\n")
            else:
                json.dump([{c: r[c] for c in cols} for r in rows], f, indent=1)
    os.replace(tmp, out)  # a reader never sees half a file


def _name(row: dict) -> str:
    return f"{row['path']}:{row['key']}" if row["key"] else row["path"]


def format_table(rows: list[dict]) -> str:
    width = min(60, max([len(_name(r)) for r in rows] + [5]))
    lines = [f"{'image':<{width}} {'score':>9} {'raw_score':>10}  reason"]
    for r in rows:
        name = _name(r)
        name = name if len(name) <= width else "..." + name[-(width - 3) :]
        if r["reason"]:
            lines.append(f"{name:<{width}} {'-':>9} {'-':>10}  {r['reason']}")
        else:
            lines.append(f"{name:<{width}} {r['score']:>9.4f} {r['raw_score']:>10.4f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the commands


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if "torch" not in sys.modules:
        # The model's OpenMP threads share the cores with the decode threads; spinning
        # OpenMP workers then stall every parallel region (measured on a busy 2-core box:
        # 61 img/s spinning, 1451 img/s passive). Read when torch loads, hence set here.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.out:
        check_output_path(args.out)
    inputs = resolve_inputs(args.inputs)
    predictor = open_predictor(args.model, args.device)
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
    if args.out:
        write_predictions(rows, args.out)
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
    if args.out:
        print(f"wrote {len(rows)} row(s) to {args.out}")
    elif len(rows) > TABLE_MAX_ROWS:
        valid = [r["score"] for r in rows if r["score"] is not None]
        if valid:
            print(
                f"score: mean {np.mean(valid):.4f}, min {np.min(valid):.4f}, "
                f"max {np.max(valid):.4f}"
            )
        print(f"hint: add --out FILE.csv (or .parquet, .json, .jsonl) to keep all {len(rows)} rows")
    return 0 if scored else 1


def cmd_export(args: argparse.Namespace) -> int:
    from fiqa.models.export import export_checkpoint

    meta = export_checkpoint(
        args.checkpoint,
        args.format,
        args.out,
        batch=args.batch,
        opset=args.opset,
        exporter=args.exporter,
        check=not args.no_check,
    )
    size = meta["image_size"]
    print(
        f"wrote {args.out} ({args.format}, {meta['exporter']}"
        + (f", opset {meta['opset']}" if meta.get("opset") else "")
        + f") and {args.out}.json: "
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


def add_commands(sub: Any) -> None:
    """Register ``fiqa export`` and ``fiqa predict`` on the CLI's subparsers."""
    s = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX or TorchScript (uint8 NHWC pixels in, scores out)",
    )
    s.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a checkpoint directory (model.json + model.safetensors)",
    )
    s.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    s.add_argument(
        "--out", required=True, metavar="PATH", help="the file to write; PATH.json goes beside it"
    )
    s.add_argument(
        "--batch",
        type=int,
        default=2,
        metavar="N",
        help="example batch to trace with (the axis is dynamic)",
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

    s = sub.add_parser("predict", help="score image files, folders and shards with a model")
    s.add_argument(
        "model", metavar="MODEL", help="a checkpoint directory, an .onnx or a TorchScript export"
    )
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="image, folder or shard spec")
    s.add_argument(
        "--out", metavar="FILE", help="write every row to FILE.csv, .parquet, .json or .jsonl"
    )
    s.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per model call")
    s.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda")
    s.add_argument(
        "--workers", type=int, default=None, metavar="N", help="decode threads (default: up to 4)"
    )
    s.set_defaults(func=cmd_predict)
