import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["s3_server"]  # the S3 test server's fixtures (tests/s3_server.py)


def jpeg_bytes(size=(64, 64), color=(200, 120, 80), quality=90, mode="RGB", fmt="JPEG", **save):
    img = Image.new(mode, size, color)
    if mode == "RGB":
        arr = np.asarray(img).copy()
        arr[: size[1] // 2] //= 2  # some structure
        img = Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}), **save)
    return buf.getvalue()


def write_tar(path, members):
    """members: list of (name, bytes)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def labeled_members(n, start=0, prefix="s"):
    out = []
    for i in range(start, start + n):
        out.append((f"{prefix}{i:04d}.jpg", jpeg_bytes(color=(i % 255, 100, 50))))
        out.append((f"{prefix}{i:04d}.json", json.dumps({"mos": 1 + (i % 40) / 10}).encode()))
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic dataset, generated once per test session."""
    from fiqa.data.synthetic import make_demo_data

    out = tmp_path_factory.mktemp("tiny-data")
    make_demo_data(
        out,
        seed=1,
        sizes={
            "labeled_train": 256,
            "labeled_val": 64,
            "test": 64,
            "unlabeled_1": 192,
            "unlabeled_2": 192,
        },
        shard_size=64,
        workers=2,
    )
    return out


def tiny_config(data, run_dir, **extra):
    """A config for `tiny_data` that trains for a single short epoch per stage."""
    cfg = {
        "run_dir": str(run_dir),
        "data": {
            s: str(Path(data) / s)
            for s in ("labeled_train", "labeled_val", "test", "unlabeled_1", "unlabeled_2")
        },
        "teacher": {"arch": "resnet10t", "image_size": 48, "resize": 56},
        "student": {"arch": "mobilenetv3_small_100", "image_size": 48, "resize": 56},
        "train_teacher": {"epochs": 2, "batch_size": 32},
        "train_teacher_plus": {"epochs": 1, "batch_size": 32, "init_from": "teacher"},
        "distill_student": {"epochs": 1, "batch_size": 32},
        "scoring": {"batch_size": 32},
    }
    cfg["data"]["unlabeled_1_truth"] = str(Path(data) / "ground_truth" / "unlabeled_1.csv")
    cfg["data"]["unlabeled_2_truth"] = str(Path(data) / "ground_truth" / "unlabeled_2.csv")
    for k, v in extra.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def fiqa_cmd():
    return [sys.executable, "-m", "fiqa.cli"]


def subprocess_env():
    env = dict(os.environ)
    env.setdefault("RAY_DEDUP_LOGS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env
