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
# Ray Train's controller learns its workers finished at its next poll (every 2 s by default),
# seconds of each tiny training run; every Ray the suite starts inherits this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
pytest_plugins = ["s3_server", "ray_cluster"]  # fixtures: the S3 test server, a multi-node Ray


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


def reshard(src_dir: Path, out_dir: Path, per_shard: int) -> list[Path]:
    """The samples of ``src_dir``'s tars, rewritten as shards of ``per_shard`` samples."""
    samples: list[list[tuple[str, bytes]]] = []
    for tar_path in sorted(src_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key = m.name.split(".", 1)[0]
                if not samples or samples[-1][0][0].split(".", 1)[0] != key:
                    samples.append([])
                samples[-1].append((m.name, tar.extractfile(m).read()))
    out_dir.mkdir(parents=True)
    return [
        Path(write_tar(out_dir / f"u1-{i:04d}.tar", [f for s in chunk for f in s]))
        for i, chunk in enumerate(
            samples[j : j + per_shard] for j in range(0, len(samples), per_shard)
        )
    ]


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


@pytest.fixture
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP
    oversubscription (modules opt in with ``pytestmark``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
