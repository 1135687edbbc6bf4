"""Cost of the teacher and the student, side by side in one run.

For each model: parameters, GFLOPs (multiply-accumulates) per image, CPU
latency at batch 1 (ms per image) and throughput at batch 64 (images/s), then
the student/teacher ratios, the paper's headline. Weights are random
(pretrained=False): cost does not depend on them.

    python benchmarks/model_cost.py                       # the demo's models
    python benchmarks/model_cost.py --config configs/paper.yaml
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from fiqa.config import load_config
from fiqa.models import create_model, model_cost


def _time(model: torch.nn.Module, batch: int, size: int, repeats: int) -> float:
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return (time.perf_counter() - t0) / repeats


def measure(arch: str, size: int, repeats: int) -> dict:
    model = create_model(arch, size).eval()
    cost = model_cost(model, size)
    return {
        "arch": arch,
        "px": size,
        **cost,
        "ms_per_image_b1": 1000 * _time(model, 1, size, repeats),
        "images_per_s_b64": 64 / _time(model, 64, size, max(1, repeats // 5)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    rows = {
        "teacher": measure(cfg.teacher.arch, cfg.teacher.image_size, args.repeats),
        "student": measure(cfg.student.arch, cfg.student.image_size, args.repeats),
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
    print(
        f"student/teacher: params {s['params_m'] / t['params_m']:.3f}, GFLOPs {s['gflops'] / t['gflops']:.3f}, "
        f"latency b1 {s['ms_per_image_b1'] / t['ms_per_image_b1']:.3f}, "
        f"throughput b64 {s['images_per_s_b64'] / t['images_per_s_b64']:.2f}x"
    )


if __name__ == "__main__":
    main()
