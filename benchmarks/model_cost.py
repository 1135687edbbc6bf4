"""Cost of the teacher and the student, side by side in one run.

For each model: parameters, GFLOPs (multiply-accumulates) per image, CPU
latency at batch 1 (ms per image) and throughput at batch 64 (images/s), then
the student/teacher ratios, the paper's headline. Weights are random
(pretrained=False): cost does not depend on them. With ``--onnx``, each model
is also exported as `fiqa export` does (uint8 pixels in, normalisation and
calibration in the graph) and timed with ONNX Runtime on the same threads.

    python benchmarks/model_cost.py                       # the demo's models
    python benchmarks/model_cost.py --config configs/paper.yaml
    python benchmarks/model_cost.py --onnx                # + ONNX Runtime latency
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

from fiqa.config import load_config
from fiqa.models import create_model, export_checkpoint, model_cost, save_checkpoint


def _time(model: torch.nn.Module, batch: int, size: int, repeats: int) -> float:
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return (time.perf_counter() - t0) / repeats


def _time_onnx(model: torch.nn.Module, arch: str, size: int, repeats: int, threads: int) -> dict:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(f"{d}/ck", model, {"arch": arch, "image_size": size})
        export_checkpoint(f"{d}/ck", "onnx", f"{d}/m.onnx", check=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        session = ort.InferenceSession(f"{d}/m.onnx", opts, providers=["CPUExecutionProvider"])

    def run(batch: int, n: int) -> float:
        x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        for _ in range(2):
            session.run(None, {"pixels": x})
        t0 = time.perf_counter()
        for _ in range(n):
            session.run(None, {"pixels": x})
        return (time.perf_counter() - t0) / n

    return {
        "ort_ms_per_image_b1": 1000 * run(1, repeats),
        "ort_images_per_s_b64": 64 / run(64, max(1, repeats // 5)),
    }


def measure(arch: str, size: int, repeats: int, onnx: bool = False, threads: int = 1) -> dict:
    model = create_model(arch, size).eval()
    cost = model_cost(model, size)
    row = {
        "arch": arch,
        "px": size,
        **cost,
        "ms_per_image_b1": 1000 * _time(model, 1, size, repeats),
        "images_per_s_b64": 64 / _time(model, 64, size, max(1, repeats // 5)),
    }
    if onnx:
        row.update(_time_onnx(model, arch, size, repeats, threads))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--onnx", action="store_true", help="also time the ONNX export (ONNX Runtime)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    rows = {
        role: measure(spec.arch, spec.image_size, args.repeats, args.onnx, args.threads)
        for role, spec in (("teacher", cfg.teacher), ("student", cfg.student))
    }
    print(
        f"# {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    )
    print(
        f"{'model':<8} {'arch':<24} {'px':>4} {'params M':>9} {'GFLOPs':>8} {'ms/img b1':>10} {'img/s b64':>10}"
    )
    for name, r in rows.items():
        print(
            f"{name:<8} {r['arch']:<24} {r['px']:>4} {r['params_m']:>9.2f} {r['gflops']:>8.3f} "
            f"{r['ms_per_image_b1']:>10.2f} {r['images_per_s_b64']:>10.1f}"
        )
    t, s = rows["teacher"], rows["student"]
    if args.onnx:
        print(
            f"{'model':<8} {'arch, ONNX Runtime':<24} {'':>4} {'':>9} {'':>8} {'ms/img b1':>10} {'img/s b64':>10}"
        )
        for name, r in rows.items():
            print(
                f"{name:<8} {r['arch']:<24} {r['px']:>4} {'':>9} {'':>8} "
                f"{r['ort_ms_per_image_b1']:>10.2f} {r['ort_images_per_s_b64']:>10.1f}"
            )
    print(
        f"student/teacher: params {s['params_m'] / t['params_m']:.3f}, GFLOPs {s['gflops'] / t['gflops']:.3f}, "
        f"latency b1 {s['ms_per_image_b1'] / t['ms_per_image_b1']:.3f}, "
        f"throughput b64 {s['images_per_s_b64'] / t['images_per_s_b64']:.2f}x"
    )
    if args.onnx:
        print(
            f"student/teacher with ONNX Runtime: latency b1 "
            f"{s['ort_ms_per_image_b1'] / t['ort_ms_per_image_b1']:.3f}, throughput b64 "
            f"{s['ort_images_per_s_b64'] / t['ort_images_per_s_b64']:.2f}x; student ONNX Runtime "
            f"vs PyTorch: latency b1 {s['ort_ms_per_image_b1'] / s['ms_per_image_b1']:.3f}, "
            f"throughput b64 {s['ort_images_per_s_b64'] / s['images_per_s_b64']:.2f}x"
        )


if __name__ == "__main__":
    main()
