"""The training engine: batch plan, gradient accumulation, DDP parity, metrics, fault tolerance.

Fast tests exercise the loop's pieces in plain PyTorch (two gloo processes for
DDP). Slow tests go through the real Ray Train path on a 2-CPU local Ray: one
worker and two workers with the same global batch, and a worker killed
mid-epoch.
"""

import contextlib
import dataclasses
import gc
import io
import json
import math
import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from fiqa.cluster.resources import check_training, worker_threads
from fiqa.config import ConfigError, TrainConfig, from_dict
from fiqa.data.decode import decode_image
from fiqa.data.tables import SCORED_SCHEMA, write_part
from fiqa.models import registry
from fiqa.models.checkpoint import load_checkpoint
from fiqa.models.inputs import random_crop_flip_batch
from fiqa.models.registry import check_pretrained
from fiqa.training import TrainJob, batch_plan, effective_lr, fit
from fiqa.training.data import decode_train_batch, table_stats
from fiqa.training.job import fit_marks, run_paths
from fiqa.training.loop import build_model
from fiqa.training.step import GradAccumulator
from fiqa.training.tensorboard import TensorBoardLog

SOURCES = ["labeled", "pseudo_u1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# data: images whose quality score is their brightness, a task tiny CNNs learn in a few epochs


def brightness_image(i: int, seed: int, size: int = 40) -> tuple[bytes, float]:
    rng = np.random.default_rng([seed, i])
    b = float(rng.uniform(0.0, 1.0))
    texture = rng.normal(0.0, 25.0, (size, size, 1)) + rng.normal(0.0, 10.0, (1, 1, 3))
    pixels = np.clip(30 + 190 * b + texture, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=92)
    return buf.getvalue(), round(1.0 + 4.0 * b + float(rng.normal(0.0, 0.05)), 4)


def write_table(directory, n: int, source: str, seed: int, parts: int = 2) -> str:
    per = math.ceil(n / parts)
    for p in range(parts):
        idx = range(p * per, min(n, (p + 1) * per))
        rows = [brightness_image(i, seed) for i in idx]
        table = pa.table(
            {
                "key": [f"{source}-{i}" for i in idx],
                "shard": [f"shard-{p}"] * len(rows),
                "image": [r[0] for r in rows],
                "mos": [r[1] for r in rows],
                "raw_score": [None] * len(rows),
                "score": [r[1] for r in rows],
                "score_spread": [None] * len(rows),
                "model_id": [None] * len(rows),
                "source": [source] * len(rows),
            },
            schema=SCORED_SCHEMA,
        )
        write_part(table, str(directory), f"part-{p}.parquet")
    return str(directory)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-tables")
    return {
        "labeled": write_table(root / "labeled", 160, "labeled", seed=1),
        "pseudo_u1": write_table(root / "pseudo_u1", 96, "pseudo_u1", seed=2),
        "val": write_table(root / "val", 48, "labeled", seed=3),
    }


def job_for(tables, out_dir, **train) -> TrainJob:
    t = {
        "epochs": 2,
        "batch_size": 32,
        "lr": 2e-3,
        "lr_step_epochs": 1,
        "shuffle_buffer": 64,
        "torch_threads": 1,
    }
    return TrainJob(
        name="t",
        arch="resnet10t",
        image_size=32,
        resize=36,
        train_tables=[tables["labeled"], tables["pseudo_u1"]],
        val_table=tables["val"],
        out_dir=str(out_dir),
        train=TrainConfig(**{**t, **train}),
        seed=0,
        config_fingerprint="test",
    )


# ---------------------------------------------------------------------------------------------
# batch plan, learning rate, config validation


def test_batch_plan_keeps_the_global_batch_whatever_the_worker_count():
    assert batch_plan(TrainConfig(batch_size=64, num_workers=1)) == (64, 1)
    assert batch_plan(TrainConfig(batch_size=64, num_workers=4)) == (16, 1)
    assert batch_plan(TrainConfig(batch_size=64, num_workers=1, micro_batch_size=16)) == (16, 4)
    assert batch_plan(TrainConfig(batch_size=64, num_workers=2, micro_batch_size=16)) == (16, 2)
    with pytest.raises(ConfigError, match="divide"):
        batch_plan(TrainConfig(batch_size=64, num_workers=3, micro_batch_size=16))


def _train_cfg(**t):
    data = {k: f"d/{k}" for k in ("labeled_train", "labeled_val", "test", "unlabeled_1")}
    return from_dict({"run_dir": "r", "data": {**data, "unlabeled_2": "d/u"}, "train_teacher": t})


def test_config_rejects_a_global_batch_that_does_not_split():
    assert _train_cfg(batch_size=32, num_workers=2, micro_batch_size=8).train_teacher
    with pytest.raises(ConfigError, match=r"train_teacher\.batch_size.*micro_batch_size=12"):
        _train_cfg(batch_size=32, num_workers=2, micro_batch_size=12)
    with pytest.raises(ConfigError, match=r"train_teacher\.lr_reference_batch"):
        _train_cfg(lr_scaling="linear")
    with pytest.raises(ConfigError, match=r"train_teacher\.lr_scaling"):
        _train_cfg(lr_scaling="cubic", lr_reference_batch=32)
    with pytest.raises(ConfigError, match=r"train_teacher\.precision"):
        _train_cfg(precision="fp8")
    with pytest.raises(ConfigError, match=r"train_teacher\.source_weights"):
        _train_cfg(source_weights={"pseudo_1": 0.5})  # a typo of pseudo_u1
    with pytest.raises(ConfigError, match=r"train_teacher\.source_weights"):
        _train_cfg(source_weights={"labeled": -1.0})


def test_learning_rate_is_fixed_or_scaled_explicitly():
    assert effective_lr(TrainConfig(lr=1e-4, batch_size=128)) == 1e-4
    linear = TrainConfig(lr=1e-4, batch_size=128, lr_scaling="linear", lr_reference_batch=32)
    assert effective_lr(linear) == pytest.approx(4e-4)
    sqrt = TrainConfig(lr=1e-4, batch_size=128, lr_scaling="sqrt", lr_reference_batch=32)
    assert effective_lr(sqrt) == pytest.approx(2e-4)


# ---------------------------------------------------------------------------------------------
# fit.json: a finished fit is not trained again


class WouldTrain(Exception):
    """Raised by the first step `fit` takes towards training (the tests stop it there)."""


def _stop_before_training(*_args, **_kwargs):
    raise WouldTrain


def test_a_finished_fit_returns_its_summary_without_training(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "check_pretrained", _stop_before_training)
    job = job_for({"labeled": "t/l", "pseudo_u1": "t/p", "val": "t/v"}, tmp_path)
    paths = run_paths(job)
    assert paths.fit == f"{tmp_path}/fit.json"
    summary = {
        "model": paths.model,
        "best_epoch": 2,
        "val": {"srcc": 0.91, "plcc": 0.9, "n": 48},
        "epochs": 2,
        "restarts": 0,
        "train_parts": 4,
        "rows_by_source": {"labeled": 160, "pseudo_u1": 96},
    }
    with pytest.raises(WouldTrain):  # nothing finished yet
        fit(job)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text("{}")
    with pytest.raises(WouldTrain):  # a model, but no fit.json: its fit did not finish
        fit(job)
    (tmp_path / "fit.json").write_text(json.dumps({**summary, **fit_marks(job)}))
    assert fit(job) == summary  # the stored summary, the markers left out; Ray not started

    # another config fingerprint, or another job under the same one: trained again
    with pytest.raises(WouldTrain):
        fit(dataclasses.replace(job, config_fingerprint="another"))
    with pytest.raises(WouldTrain):
        fit(dataclasses.replace(job, train=dataclasses.replace(job.train, epochs=3)))
    # a fit.json without markers (written before fit recorded them): trained again
    (tmp_path / "fit.json").write_text(json.dumps(summary))
    with pytest.raises(WouldTrain):
        fit(job)
    # the exported model gone: trained again
    (tmp_path / "fit.json").write_text(json.dumps({**summary, **fit_marks(job)}))
    assert fit(job) == summary
    (tmp_path / "model" / "model.json").unlink()
    with pytest.raises(WouldTrain):
        fit(job)


# ---------------------------------------------------------------------------------------------
# the loop's pieces


def test_decode_gives_source_ids_and_weights():
    img, _ = brightness_image(0, 0, size=48)
    batch = {
        "image": np.array([img, img, img], dtype=object),
        "score": np.array([1.0, 2.0, 3.0]),
        "source": np.array(["labeled", "pseudo_u1", "pseudo_u1"], dtype=object),
    }
    out = decode_train_batch(batch, 40, 32, {"pseudo_u1": 0.25}, {"labeled": 0, "pseudo_u1": 1})
    assert out["pixels"].shape == (3, 32, 32, 3) and out["pixels"].dtype == np.uint8
    assert out["source_id"].tolist() == [0, 1, 1]
    assert out["weight"].tolist() == [1.0, 0.25, 0.25]


def test_decode_leaves_the_crop_to_the_worker_when_training_is_deterministic():
    img, _ = brightness_image(0, 0, size=48)
    batch = {
        "image": np.array([img, img], dtype=object),
        "score": np.array([1.0, 2.0]),
        "source": np.array(["labeled", "labeled"], dtype=object),
    }
    out = decode_train_batch(batch, 40, None, {}, {"labeled": 0})
    assert out["pixels"].shape == (2, 40, 40, 3)
    assert (out["pixels"][0] == decode_image(img, 40)).all()  # whole, neither cropped nor flipped


def test_worker_crops_are_windows_drawn_again_from_the_same_seed():
    pixels = torch.randint(0, 256, (4, 10, 12, 3), dtype=torch.uint8)

    def draw(seed: int, flip: bool = True) -> torch.Tensor:
        return random_crop_flip_batch(pixels, 8, torch.Generator().manual_seed(seed), flip)

    first = draw(3)
    assert first.shape == (4, 8, 8, 3) and torch.equal(first, draw(3))
    assert not torch.equal(first, draw(4))
    for i in range(4):  # each is a window of its own image, as it is or mirrored
        windows = [pixels[i, t : t + 8, s : s + 8] for t in range(3) for s in range(5)]
        assert any(torch.equal(first[i], w) or torch.equal(first[i], w.flip(1)) for w in windows)
    unflipped = draw(5, flip=False)
    for i in range(4):
        assert any(
            torch.equal(unflipped[i], pixels[i, t : t + 8, s : s + 8])
            for t in range(3)
            for s in range(5)
        )
    with pytest.raises(ValueError, match="crop 11 must fit"):
        random_crop_flip_batch(pixels, 11, torch.Generator())


def fixed_rows(n: int = 32, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixels": torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8),
        "target": 1 + 4 * torch.rand(n, generator=g),
        "weight": torch.where(torch.arange(n) % 3 == 0, 0.5, 1.0),
        "source_id": (torch.arange(n) % 3 == 0).long(),
    }


def micro_batches(rows: dict, start: int, stop: int, micro: int) -> list[dict]:
    return [{k: v[i : i + micro] for k, v in rows.items()} for i in range(start, stop, micro)]


def tiny_model() -> torch.nn.Module:
    from fiqa.models.regressor import QualityRegressor

    torch.manual_seed(0)
    return QualityRegressor("resnet10t", image_size=32)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    """Equal up to float32 summation order: relative to the whole tensor's norm."""
    return float((a - b).norm()) <= rel * float(b.norm()) + 1e-8


def accumulate(model, batches: list[dict], accum: int):
    acc = GradAccumulator(model, accum, len(SOURCES), target_mean=3.0, target_std=1.2)
    done = [acc.backward(b) for b in batches]
    grads = {n: p.grad.clone() for n, p in getattr(model, "module", model).named_parameters()}
    return done, grads, acc.epoch_stats(SOURCES)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One of two gloo processes: the global batch of 32 rows split over workers and steps."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows, half = fixed_rows(), 32 // world
    for micro in (16, 8):
        model = DistributedDataParallel(tiny_model())
        mine = micro_batches(rows, rank * half, (rank + 1) * half, micro)
        done, grads, stats = accumulate(model, mine, accum=len(mine))
        if rank == 0:
            torch.save({"done": done, "grads": grads, "stats": stats}, f"{out_dir}/ddp_{micro}.pt")
        del model  # its reducer holds the process group and the last all-reduce's work
    # Both ranks tear gloo down together and with no DDP left alive: a rank that
    # destroyed its group while the other still ran aborted once in CI
    # ("terminate called without an active exception", SIGABRT).
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def test_two_ddp_workers_and_one_accumulating_worker_compute_the_same_gradients(tmp_path):
    """2 workers x k micro-batches == 1 worker x 2k micro-batches, for k = 1 and 2."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2, join=True)
    rows = fixed_rows()
    for micro in (16, 8):
        ddp = torch.load(tmp_path / f"ddp_{micro}.pt", weights_only=False)
        steps = 32 // micro
        done, grads, stats = accumulate(tiny_model(), micro_batches(rows, 0, 32, micro), steps)
        assert done == [False] * (steps - 1) + [True]
        assert ddp["done"] == [False] * (steps // 2 - 1) + [True]  # synced once, at the end
        assert grads.keys() == ddp["grads"].keys()
        for name, g in grads.items():
            assert close(ddp["grads"][name], g), name
        assert (
            ddp["stats"]["rows_by_source"]
            == stats["rows_by_source"]
            == {
                "labeled": 21,
                "pseudo_u1": 11,
            }
        )
        for src, mse in stats["loss_by_source"].items():
            assert ddp["stats"]["loss_by_source"][src] == pytest.approx(mse, rel=1e-5)
        assert ddp["stats"]["train_loss"] == pytest.approx(stats["train_loss"], rel=1e-5)


def test_accumulated_gradient_is_the_mean_of_micro_batch_gradients():
    rows = fixed_rows()
    model = tiny_model()
    _, accumulated, _ = accumulate(model, micro_batches(rows, 0, 32, 8), accum=4)
    per_batch = []
    for b in micro_batches(rows, 0, 32, 8):
        m = tiny_model()
        per_batch.append(accumulate(m, [b], accum=1)[1])
    for name, g in accumulated.items():
        assert close(g, torch.stack([p[name] for p in per_batch]).mean(0)), name


def test_pretrained_backbone_is_loaded_from_a_path_and_never_from_a_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf
    from safetensors.torch import save_file

    donor = tiny_model()
    with torch.no_grad():
        for p in donor.backbone.parameters():
            p.add_(1.0)
    save_file(donor.backbone.state_dict(), tmp_path / "backbone.safetensors")
    base = dict(
        name="t",
        arch="resnet10t",
        image_size=32,
        resize=36,
        train_tables=[],
        val_table="",
        out_dir=str(tmp_path),
        train=TrainConfig(),
    )
    model = build_model(TrainJob(**base, pretrained_weights=str(tmp_path / "backbone.safetensors")))
    for (name, a), b in zip(
        model.backbone.state_dict().items(), donor.backbone.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(FileNotFoundError, match="pretrained_weights"):
        check_pretrained(str(tmp_path / "missing.safetensors"))

    # Offline: the default path builds without a hub; "timm" asks the hub for its weights.
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    assert build_model(TrainJob(**base)) is not None
    with pytest.raises(OSError, match="Hub"):
        build_model(TrainJob(**base, pretrained_weights="timm"))


def test_table_stats_counts_rows_per_source(tables):
    stats = table_stats([tables["labeled"], tables["pseudo_u1"]])
    assert stats.rows_by_source == {"labeled": 160, "pseudo_u1": 96}
    assert 1.0 < stats.target_mean < 5.0 and 0.5 < stats.target_std < 2.0


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every TensorBoard event file under ``tb_dir`` (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(tb_dir.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_log_writes_readable_scalars(tmp_path):
    tb = TensorBoardLog(str(tmp_path / "tb"))
    tb.scalars({"val/srcc": 0.5, "train/mse_labeled": 1.25}, 1)
    tb.scalars({"val/srcc": 0.75}, 2)
    tb.close()
    assert read_scalars(tmp_path / "tb") == {
        "val/srcc": [(1, 0.5), (2, 0.75)],
        "train/mse_labeled": [(1, 1.25)],
    }


def test_tensorboard_log_copies_events_to_object_storage(tmp_path):
    import fsspec

    tb = TensorBoardLog("memory://fiqa-test/run/tensorboard")  # fsspec's in-memory filesystem
    tb.scalars({"val/srcc": 0.5}, 1)
    tb.close()
    fs = fsspec.filesystem("memory")
    (name,) = fs.ls("/fiqa-test/run/tensorboard", detail=False)
    fs.get(name, str(tmp_path / "copy" / Path(name).name))
    assert read_scalars(tmp_path / "copy") == {"val/srcc": [(1, 0.5)]}
    assert not os.path.exists(tb.local)  # the local staging folder is gone


def test_training_curves_plot_per_source_losses(tmp_path):
    from fiqa.report import _plots

    hist = [
        {"epoch": e, "train_loss": 1 / e, "val_srcc": 0.5 + e / 10, "loss_by_source": mse}
        for e, mse in ((1, {"labeled": 1.0, "pseudo_u1": 0.8}), (2, {"labeled": 0.7}))
    ]
    old = [{"epoch": 1, "train_loss": 1.0, "val_srcc": 0.4}]  # a history from before the split
    preds = {"teacher": {"pred": np.linspace(0, 1, 8), "mos": np.linspace(1, 5, 8)}}
    pools = {"unlabeled_1": {"score": np.linspace(1, 5, 8)}}
    report = {"teacher": {"srcc": 0.9, "plcc": 0.8}}
    files = _plots(str(tmp_path), preds, pools, {"teacher": hist, "student": old}, report)
    assert Path(files[-1]).name == "training_curves.png" and Path(files[-1]).stat().st_size > 5000


def test_shipped_configs_describe_their_global_batch():
    from fiqa.config import load_config

    root = Path(__file__).resolve().parent.parent
    paper = load_config(root / "configs" / "paper.yaml")
    for t in (paper.train_teacher, paper.train_teacher_plus, paper.distill_student):
        micro, accum = batch_plan(t)
        assert micro * accum * t.num_workers == t.batch_size
    demo = load_config(root / "configs" / "demo.yaml")
    assert batch_plan(demo.train_teacher) == (demo.train_teacher.batch_size, 1)


# ---------------------------------------------------------------------------------------------
# through Ray Train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_cpu_ray():
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=True,  # Ray Train watches its workers through the State API
        dashboard_host="127.0.0.1",
        dashboard_port=_free_port(),
        configure_logging=False,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: a hang of the training run is a failure."""

    def expire(*_):
        raise TimeoutError(f"training did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.slow
def test_workers_that_would_starve_decoding_are_refused(two_cpu_ray):
    with pytest.raises(ConfigError, match="starve"):
        check_training(TrainConfig(num_workers=2, cpus_per_worker=1.0))
    check_training(TrainConfig(num_workers=2, cpus_per_worker=0.5))


def test_worker_threads_follow_the_reserved_cpus_or_the_local_machine(two_cpu_ray, monkeypatch):
    from fiqa.cluster import local

    # the local 2-CPU Ray: the workers share both (the decode tasks share them too)
    assert worker_threads(TrainConfig(num_workers=1, cpus_per_worker=1.0)) == 2
    assert worker_threads(TrainConfig(num_workers=2, cpus_per_worker=0.5)) == 1
    assert worker_threads(TrainConfig(torch_threads=3)) == 3
    monkeypatch.setattr(local, "_may_grow", True)  # a cluster: Ray's convention
    assert worker_threads(TrainConfig(num_workers=4, cpus_per_worker=6.0)) == 6


@pytest.fixture(scope="module")
def parity_runs(tables, tmp_path_factory, two_cpu_ray):
    """One job (seed, global batch 32 = 1 x 16 x 2 steps = 2 x 16 x 1 step), 1 and 2 workers.

    Three epochs, not two: after two, one run in about eight was still far from converged
    (best val SRCC 0.87 or 0.88 against 0.96-0.99 for the others, over 8 pairs of seeds and
    the CI's pair), which is a slow start, not a disagreement; after three, 10 pairs of seeds
    gave 0.97-0.99 for both and |1 worker - 2 workers| at most 0.02.
    """
    root = tmp_path_factory.mktemp("parity")
    runs = {}
    for workers in (1, 2):
        job = job_for(
            tables,
            root / f"w{workers}",
            num_workers=workers,
            cpus_per_worker=1.0 / workers,  # leaves a CPU for the decode tasks
            micro_batch_size=16,
            source_weights={"pseudo_u1": 0.5},
            epochs=3,
        )
        with deadline(420):
            result = fit(job)
        runs[workers] = {"job": job, "out": root / f"w{workers}", "result": result}
    return runs


@pytest.mark.slow
def test_one_and_two_workers_with_the_same_global_batch_agree(parity_runs):
    for workers, run in parity_runs.items():
        out, r = run["out"], run["result"]
        history = json.loads((out / "history.json").read_text())
        assert [h["epoch"] for h in history] == [1, 2, 3]
        for h in history:
            assert h["rows_by_source"] == {"labeled": 160, "pseudo_u1": 96}  # every row, once
            assert h["steps"] == 256 // 32
            assert set(h["loss_by_source"]) == {"labeled", "pseudo_u1"}
            assert h["images_per_s"] > 0 and 0 <= h["data_wait_frac"] <= 1
        assert [h["lr"] for h in history] == pytest.approx([2e-3, 1e-3, 5e-4])
        assert r["val"]["n"] == 48  # each worker scored its slice; all were gathered
        assert r["val"]["srcc"] > 0.85, (workers, history)
        meta = json.loads((out / "model" / "model.json").read_text())
        assert meta["epoch"] == r["best_epoch"] and meta["config_fingerprint"] == "test"
        scalars = read_scalars(out / "tensorboard")
        assert [s for s, _ in scalars["val/srcc"]] == [1, 2, 3]
        assert {"train/mse_labeled", "train/mse_pseudo_u1", "train/lr"} <= set(scalars)
    # Exact agreement is what the gradient test above checks. End to end, the row order across
    # workers and the random crops differ, so two runs differ as two seeds would (see above).
    srcc = {w: run["result"]["val"]["srcc"] for w, run in parity_runs.items()}
    curves = {
        w: [h["val_srcc"] for h in json.loads((run["out"] / "history.json").read_text())]
        for w, run in parity_runs.items()
    }
    assert abs(srcc[1] - srcc[2]) < 0.06, (srcc, curves)


@pytest.mark.slow
def test_a_finished_fit_commits_its_summary_and_is_not_trained_again(parity_runs, monkeypatch):
    run = parity_runs[2]
    marker = json.loads((run["out"] / "fit.json").read_text())
    assert marker == {**run["result"], **fit_marks(run["job"])}
    assert marker["config_fingerprint"] == "test"
    monkeypatch.setattr(registry, "check_pretrained", _stop_before_training)
    assert fit(run["job"]) == run["result"]


@pytest.mark.slow
def test_checkpoints_of_another_config_are_refused(parity_runs):
    job = dataclasses.replace(parity_runs[1]["job"], config_fingerprint="another")
    with pytest.raises(RuntimeError, match="another config"):
        fit(job)


@pytest.mark.slow
def test_a_rerun_continues_from_the_last_checkpoint(parity_runs):
    """What a stage rerun after a crashed driver does: Ray Train restores the run's checkpoints."""
    job = parity_runs[1]["job"]
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, epochs=4))
    with deadline(300):
        result = fit(job)
    history = json.loads((parity_runs[1]["out"] / "history.json").read_text())
    assert [(h["epoch"], h["restarts"]) for h in history] == [(1, 0), (2, 0), (3, 0), (4, 1)]
    lrs = [2e-3, 1e-3, 5e-4, 2.5e-4]
    assert [h["lr"] for h in history] == pytest.approx(lrs)  # StepLR restored
    assert result["epochs"] == 4 and result["val"]["n"] == 48


@pytest.mark.slow
def test_min_epoch_rows_reads_a_small_table_over_again_and_cuts_it(tables, tmp_path, two_cpu_ray):
    """`train.min_epoch_rows` (through `TrainJob.epoch_rows`, the labeled-only ablation's equal
    steps too), under a cosine warm-up: 300 rows an epoch from a 160-row table, 9 whole
    batches of 32."""
    job = dataclasses.replace(
        job_for(tables, tmp_path, epochs=1, schedule="cosine", warmup_epochs=0.5),
        train_tables=[tables["labeled"]],
    )
    job.train.min_epoch_rows = 300
    with deadline(300):
        result = fit(job)
    (h,) = json.loads((tmp_path / "history.json").read_text())
    assert h["rows_by_source"] == {"labeled": 9 * 32} and h["steps"] == 300 // 32
    assert result["epoch_rows"] == 300 and result["rows_by_source"] == {"labeled": 160}
    # the first of 9 steps ends a ninth into the epoch: 2/9 of the half-epoch ramp
    assert h["lr"] == pytest.approx(2e-3 * 2 / 9)


@pytest.mark.slow
def test_a_deterministic_run_trains_the_same_model_again(tables, tmp_path, two_cpu_ray):
    """`train.deterministic`: two runs of one config (seed, tables, workers) end with the same
    weights and the same curves, random crops, flips, shuffles and the split over two workers
    included (one worker reads the same ordered stream unsplit: `make demo` runs that twice)."""
    workers = 2
    runs = []
    for attempt in ("a", "b"):
        job = job_for(
            tables,
            tmp_path / attempt,
            deterministic=True,
            num_workers=workers,
            cpus_per_worker=1.0 / workers,  # leaves a CPU for the decode tasks
            source_weights={"pseudo_u1": 0.5},
        )
        with deadline(300):
            fit(job)
        history = json.loads((tmp_path / attempt / "history.json").read_text())
        weights = load_checkpoint(str(tmp_path / attempt / "model")).model.state_dict()
        runs.append((history, weights))
    (history_a, weights_a), (history_b, weights_b) = runs
    curve = ("train_loss", "loss_by_source", "rows_by_source", "val_srcc", "val_rmse", "steps")
    assert [{k: h[k] for k in curve} for h in history_a] == [
        {k: h[k] for k in curve} for h in history_b
    ]
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def _train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train workers of this test's Ray, from Ray's State API."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray.get_runtime_context().gcs_address,  # other Rays may run on this machine
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return [a.pid for a in actors if a.pid]


@pytest.mark.slow
def test_a_worker_killed_mid_epoch_resumes_from_the_last_checkpoint(tables, tmp_path, two_cpu_ray):
    job = job_for(tables, tmp_path, num_workers=2, cpus_per_worker=0.5, micro_batch_size=8)
    ckpts = tmp_path / "ray_train" / job.name
    killed: list[tuple[int, int]] = []  # (pid, epochs checkpointed when it was killed)

    def registered_epoch() -> int:
        """The newest epoch whose checkpoint Ray Train has registered (it resumes from those)."""
        try:
            snap = json.loads((ckpts / "checkpoint_manager_snapshot.json").read_text())
            return int(snap["latest_checkpoint_result"]["metrics"]["epoch"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return 0

    def kill_one_worker_in_epoch_2():
        end = time.time() + 400
        while time.time() < end:
            epoch = registered_epoch()
            if epoch >= 1:  # epoch 2 is under way: kill a worker now
                pids = _train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append((pids[-1], epoch))
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker_in_epoch_2, daemon=True)
    killer.start()
    with deadline(540):
        result = fit(job)
    killer.join()
    assert killed, "no training worker was found to kill"
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]  # every epoch once, none lost or repeated
    assert result["epochs"] == 2 and result["restarts"] == 1
    resumed = [h["epoch"] for h in history if h["restarts"] == 1]
    checkpointed = killed[0][1]
    # Restarted from the last checkpoint (epoch > 0) and redid the epoch that was cut short.
    assert resumed and resumed[0] == checkpointed + 1 and checkpointed < 2
    # Scheduler, optimizer and best score came back with the checkpoint.
    assert [h["lr"] for h in history] == pytest.approx([2e-3, 1e-3])
    best = [h["best_score"] for h in history]
    assert best == sorted(best) and best[-1] == max(h["score"] for h in history)
    latest = max(
        (d for d in ckpts.glob("checkpoint_*") if (d / "train_state.pt").exists()),
        key=lambda d: json.loads((d / "model.json").read_text())["epoch"],
    )
    state = torch.load(latest / "train_state.pt", weights_only=True)
    total_steps = sum(h["steps"] for h in history)
    assert total_steps == 2 * (256 // 32)
    assert state["step"] == total_steps and state["config_fingerprint"] == "test"
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {float(total_steps)}  # AdamW's own count: its state was restored
