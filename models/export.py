"""Export a checkpoint for deployment: ONNX or TorchScript, one self-describing file.

The exported graph is `fiqa.models.graph.ScoringModule`: it takes what a decoder produces and
returns what a user wants, so a deployer needs no Python of ours:

- input ``pixels``: uint8, NHWC ``[batch, S, S, 3]``, RGB, where S is the
  model's ``image_size``. Prepare it as `fiqa predict` and the scoring engine
  do: decode, EXIF-rotate, convert to RGB, resize the shorter side to
  ``resize`` px (bilinear), keep the central square, center-crop S px.
  Normalisation (ImageNet mean and std) happens inside the graph.
- outputs ``raw_score`` (float32 ``[batch]``, the network's output) and
  ``score`` (float32 ``[batch]``, the 4-parameter logistic of the checkpoint
  applied, i.e. on the MOS scale; equal to ``raw_score`` when the checkpoint
  has no calibration). The logistic runs in float64 inside the graph: fitted
  logistics can have large, cancelling coefficients.

The batch axis is dynamic. The contract (sizes, normalisation, calibration,
architecture, the source checkpoint's weights hash) is embedded in the file
(ONNX ``metadata_props["fiqa"]``, TorchScript extra file ``fiqa.json``) and
written beside it as ``PATH.json``, with the parity measured after export.

ONNX uses the torch.export-based exporter (``dynamo=True``, the default
since torch 2.9; it needs ``onnxscript``) and falls back to the deprecated
TorchScript-based one if that fails. TorchScript is deprecated upstream
(torch warns on ``torch.jit.trace``) but still loads in Python and libtorch;
ONNX is the recommended deployment format.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from fiqa.calibration import Logistic4
from fiqa.models.graph import ScoringModule, scoring_module
from fiqa.models.inputs import IMAGENET_MEAN, IMAGENET_STD, to_model_input
from fiqa.models.meta import (
    EXPORT_FORMATS,
    METADATA_KEY,
    ONNX_EXPORTERS,
    TORCHSCRIPT_META,
    MissingExtraError,
    ModelMeta,
    require_onnx,
)
from fiqa.models.predictor import open_predictor

__all__ = [
    "EXPORT_FORMATS",
    "MissingExtraError",
    "ScoringModule",
    "export_checkpoint",
    "export_metadata",
    "export_onnx",
    "export_torchscript",
    "parity",
    "require_onnx",
    "scoring_module",
]

log = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 1
PARITY_TOLERANCE = 1e-4
DYNAMO_MIN_OPSET = 18  # the lowest opset torch's dynamo exporter implements directly


def weights_sha256(checkpoint: str) -> str:
    """SHA-256 of a checkpoint's ``model.safetensors``: which weights an export came from."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(checkpoint)
    h = hashlib.sha256()
    with fs.open(root.rstrip("/") + "/model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_metadata(checkpoint: str, info: ModelMeta, fmt: str) -> dict[str, Any]:
    """The deployment contract of an export of ``checkpoint`` (see the module docstring)."""
    import timm

    meta, size = info.raw, info.image_size
    return {
        "format": "fiqa-export",
        "format_version": EXPORT_FORMAT_VERSION,
        "export_format": fmt,
        "arch": info.arch,
        "name": meta.get("name"),
        "image_size": size,
        "resize": info.resize,
        "mean": list(meta.get("mean", IMAGENET_MEAN)),
        "std": list(meta.get("std", IMAGENET_STD)),
        "calibration": meta.get("calibration"),
        "input": {
            "name": "pixels",
            "dtype": "uint8",
            "layout": "NHWC",
            "shape": ["batch", size, size, 3],
            "color": "RGB",
            "preprocess": (
                "decode, EXIF-rotate, RGB; resize the shorter side to `resize` px (bilinear) and "
                "keep the central square; center-crop `image_size` px. Normalisation (mean, std "
                "on 0-1 pixels) is inside the model."
            ),
        },
        "outputs": {
            "raw_score": "float32 [batch]: the network's output",
            "score": "float32 [batch]: calibrated to the MOS scale (raw_score if no calibration)",
        },
        "source": {
            "checkpoint": checkpoint,
            "weights_sha256": weights_sha256(checkpoint),
            "config_fingerprint": meta.get("config_fingerprint"),
            "epoch": meta.get("epoch"),
            "val": meta.get("val"),
        },
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The ONNX exporter's optimiser logs every pass at INFO; keep the CLI's output readable."""
    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _example(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g)


def export_onnx(
    module: ScoringModule,
    out: str,
    example: torch.Tensor,
    metadata: dict[str, Any],
    opset: int | None = None,
    exporter: str = "auto",
) -> dict[str, Any]:
    """Write ``module`` to ``out`` as one ONNX file with a dynamic batch axis and ``metadata``.

    Returns what was used: ``{"exporter": ..., "opset": ...}``.
    """
    require_onnx("onnx", "onnxscript")
    import onnx

    if exporter not in ONNX_EXPORTERS:
        raise ValueError(f"ONNX exporter {exporter!r}: expected one of {ONNX_EXPORTERS}")
    names = {"input_names": ["pixels"], "output_names": ["raw_score", "score"]}
    used = None
    if exporter == "auto" and opset is not None and opset < DYNAMO_MIN_OPSET:
        exporter = "legacy"  # the dynamo exporter writes opset 18+ and cannot always convert down
    if exporter in ("auto", "dynamo"):
        try:
            batch = torch.export.Dim("batch", min=1, max=65536)
            with warnings.catch_warnings(), _quiet_exporter():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    module,
                    (example,),
                    dynamo=True,
                    dynamic_shapes=({0: batch},),
                    opset_version=opset,
                    verbose=False,
                    **names,
                )
                # One self-contained file (the exporter's default puts weights in PATH.data).
                program.save(out, external_data=False)
            used = "torch.onnx dynamo"
        except Exception as e:  # torch.export cannot trace some models; the legacy tracer may
            if exporter == "dynamo":
                raise
            log.warning("torch.export-based ONNX export failed (%s); trying the legacy exporter", e)
    if used is None:
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")  # deprecation and tracer warnings; parity is checked
            torch.onnx.export(
                module,
                (example,),
                out,
                dynamo=False,
                opset_version=opset or 18,
                dynamic_axes={n: {0: "batch"} for n in ("pixels", "raw_score", "score")},
                **names,
            )
        used = "torch.onnx legacy (TorchScript-based)"
    proto = onnx.load(out)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset_used != opset:
        os.remove(out)
        raise ValueError(
            f"the {used} exporter wrote opset {opset_used}, not the requested {opset}; "
            f"try --exporter legacy, or an opset >= {DYNAMO_MIN_OPSET}"
        )
    metadata = {**metadata, "exporter": used, "opset": opset_used}
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, sort_keys=True)
    proto.doc_string = "fiqa face image quality model; contract in metadata_props['fiqa']"
    onnx.save(proto, out)
    return {"exporter": used, "opset": opset_used}


def export_torchscript(
    module: ScoringModule, out: str, example: torch.Tensor, metadata: dict[str, Any]
) -> dict[str, Any]:
    """Trace ``module`` to a TorchScript file ``out`` with ``metadata`` as extra file ``fiqa.json``."""
    metadata = {**metadata, "exporter": "torch.jit.trace"}
    with warnings.catch_warnings():
        # torch.jit is deprecated upstream (FutureWarning); tracer warnings about shapes are
        # covered by the parity check, which runs a batch size other than the traced one.
        warnings.simplefilter("ignore")
        with torch.no_grad():
            traced = torch.jit.trace(module, (example,), check_trace=False)
        torch.jit.save(
            traced, out, _extra_files={TORCHSCRIPT_META: json.dumps(metadata, sort_keys=True)}
        )
    return {"exporter": "torch.jit.trace"}


def parity(
    model: nn.Module,
    calibration: Logistic4 | None,
    export_path: str,
    batch: int,
    size: int,
    seed: int = 1,
) -> dict[str, Any]:
    """Max abs differences between an export and its PyTorch model on a random batch.

    The reference is computed the way the pipeline computes it (``to_model_input``,
    the network, `Logistic4` in numpy), not with the export wrapper.
    """
    x = _example(batch, size, seed)
    with torch.inference_mode():
        ref_raw = model(to_model_input(x)).double().numpy()
    ref_score = calibration(ref_raw) if calibration is not None else ref_raw
    # The file this process has just written: its code is ours.
    raw, score = open_predictor(export_path, device="cpu", trust_model_code=True)(x.numpy())
    return {
        "batch": batch,
        "max_abs_diff_raw": float(np.max(np.abs(raw - ref_raw))),
        "max_abs_diff_score": float(np.max(np.abs(score - ref_score))),
    }


def export_checkpoint(
    checkpoint: str,
    fmt: str,
    out: str,
    batch: int = 2,
    opset: int | None = None,
    exporter: str = "auto",
    check: bool = True,
    tolerance: float = PARITY_TOLERANCE,
) -> dict[str, Any]:
    """Export ``checkpoint`` to ``out`` (``fmt``: onnx or torchscript) and write ``out + '.json'``.

    ``batch`` is the example batch the graph is traced with (the batch axis stays
    dynamic). With ``check``, the export is run on a batch of another size and
    compared with the PyTorch model; above ``tolerance`` the export is deleted
    and a ValueError raised. Returns the metadata written beside the export.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format {fmt!r}: expected one of {EXPORT_FORMATS}")
    if batch < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch}")
    if fmt == "onnx":
        # Fail before the model is built; the check needs onnxruntime as well.
        require_onnx("onnx", "onnxscript", *(["onnxruntime"] if check else []))
    module, info = scoring_module(checkpoint)
    metadata = export_metadata(checkpoint, info, fmt)
    # torch.export specialises a batch of 1 to a constant; trace with at least 2.
    example = _example(max(2, batch), metadata["image_size"])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if os.path.exists(out + ".json"):
        os.remove(out + ".json")  # a stale contract must not outlive a failed export
    if fmt == "onnx":
        used = export_onnx(module, out, example, metadata, opset, exporter)
    else:
        used = export_torchscript(module, out, example, metadata)
    metadata.update(used)
    if check:
        result = parity(
            module.model, info.calibration, out, max(2, batch) + 1, metadata["image_size"]
        )
        metadata["parity"] = {**result, "tolerance": tolerance}
        worst = max(result["max_abs_diff_raw"], result["max_abs_diff_score"])
        if not worst <= tolerance:
            os.remove(out)
            raise ValueError(
                f"export of {checkpoint} does not match the PyTorch model: max abs difference "
                f"{worst:.3g} > {tolerance:g} (raw {result['max_abs_diff_raw']:.3g}, score "
                f"{result['max_abs_diff_score']:.3g}); the export was removed"
            )
    with open(out + ".json", "w") as f:
        f.write(json.dumps(metadata, indent=2, sort_keys=True))
    return metadata
