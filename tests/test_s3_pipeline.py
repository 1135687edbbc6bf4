"""The recipe up to ``pseudo_label_2`` with its inputs and its run directory in a bucket
(moto's S3 server on 127.0.0.1), interrupted three ways and resumed from the bucket alone:

1. SIGKILL of the driver during ``pseudo_label_1``, after some shards were committed;
   the rerun scores only the other shards;
2. SIGKILL during ``train_teacher_plus``, after its first checkpoint reached the bucket;
   the rerun restarts from that checkpoint (epoch 1 is not trained again);
3. the storage server stopped for several seconds as ``pseudo_label_2`` starts, then
   started again; the stage completes.

Then: every key exactly once, ``fiqa status s3://...`` done up to there, a rerun does
nothing, nothing on local disk, and the secret key in no output, object or log. The
stages after it, in a bucket, run in `test_multinode`.
"""

import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from s3_server import SECRET_KEY, clean_env

from fiqa.pipelines import STAGE_NAMES

from conftest import fiqa_cmd, reshard, tiny_config

pytestmark = pytest.mark.slow

STAGES = STAGE_NAMES
UNTIL = "pseudo_label_2"  # the last stage interrupted here
U1_SHARDS, U1_SHARD_SIZE = 12, 16  # small shards: a kill lands between shard commits
OUTAGE_S = 8.0


class Run:
    """`fiqa run` in its own process group; output to a log file; nothing else on disk."""

    def __init__(self, workdir: Path, cfg_path: Path, env: dict, name: str, *flags: str):
        self.log = workdir / f"{name}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [*fiqa_cmd(), *flags, "run", str(cfg_path), "--until", UNTIL],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir / "cwd",
                start_new_session=True,
            )

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
        self.proc.wait()

    def wait_for(self, condition, what: str, timeout: float = 1500) -> None:
        deadline = time.time() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended before {what}:\n{self.text()[-5000:]}")
            if time.time() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def finish(self, timeout: float = 1800) -> str:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        assert code == 0, self.text()[-8000:]
        return self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def s3_pipeline(s3_server, tiny_data, tmp_path_factory):
    """Runs the recipe in a bucket through the three interruptions; returns what it saw."""
    work = tmp_path_factory.mktemp("s3-pipeline")
    (work / "cwd").mkdir()
    fs = s3_server.fs()
    bucket = s3_server.make_bucket()
    data = f"s3://{bucket}/data"
    for split in ("labeled_train", "labeled_val", "test", "unlabeled_2", "ground_truth"):
        fs.put(str(tiny_data / split), f"{bucket}/data/{split}", recursive=True)
    for p in reshard(tiny_data / "unlabeled_1", work / "u1", U1_SHARD_SIZE):
        fs.put_file(str(p), f"{bucket}/data/unlabeled_1/{p.name}")

    run_dir = f"s3://{bucket}/run"
    cfg = tiny_config(tiny_data, run_dir, train_teacher_plus={"epochs": 3})
    cfg["data"].update({k: f"{data}/{k}" for k in ("labeled_train", "labeled_val", "test")})
    cfg["data"].update({k: f"{data}/{k}" for k in ("unlabeled_1", "unlabeled_2")})
    cfg["data"]["unlabeled_1_truth"] = f"{data}/ground_truth/unlabeled_1.csv"
    cfg["data"]["unlabeled_2_truth"] = f"{data}/ground_truth/unlabeled_2.csv"
    cfg["scoring"]["batch_size"] = U1_SHARD_SIZE
    cfg["storage"] = s3_server.storage_config()
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    # Ray's session logs go to a folder of this test's own, to be searched for the secret.
    ray_tmp = tempfile.mkdtemp(prefix="fiqa-s3-ray-")
    env = clean_env(PYTHONUNBUFFERED="1", RAY_TMPDIR=ray_tmp, RAY_DEDUP_LOGS="1")

    def key(path: str) -> str:
        return f"{bucket}/run/{path}"

    def status() -> tuple[dict, str]:
        proc = subprocess.run(
            [*fiqa_cmd(), "status", run_dir, "--json"]
            + ["--set", f"storage.endpoint_url={s3_server.endpoint}"],
            capture_output=True,
            text=True,
            env=env,
            cwd=work / "cwd",
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {r["stage"]: r["state"] for r in json.loads(proc.stdout)}, proc.stdout + proc.stderr

    def parts(stage: str) -> list[str]:
        fs.invalidate_cache()  # (s3fs caches listings: a stale one misses the latest commits)
        return [p for p in fs.find(key(f"{stage}/labels")) if p.endswith(".parquet")]

    seen: dict = {"bucket": bucket, "run_dir": run_dir, "cfg": cfg_path, "work": work}

    # 1. killed during pseudo_label_1, once at least one shard is committed
    run = Run(work, cfg_path, env, "run1")
    run.wait_for(lambda: parts("pseudo_label_1"), "pseudo_label_1 committed a shard")
    run.kill()
    seen["pl1_manifest_after_kill"] = fs.exists(key("pseudo_label_1/manifest.json"))
    seen["status_after_kill"], out = status()
    # Commit tasks run beside the driver, several at once: listed as the rerun will find them.
    seen["u1_committed_at_kill"] = sorted(p.rsplit("/", 1)[-1] for p in parts("pseudo_label_1"))
    seen["logs"] = [run.text(), out]

    # 2. resumed; killed during train_teacher_plus once its first checkpoint is in the bucket
    snapshot = key("train_teacher_plus/ray_train/teacher_plus/checkpoint_manager_snapshot.json")
    run = Run(work, cfg_path, env, "run2")
    run.wait_for(lambda: fs.exists(snapshot), "the first teacher_plus checkpoint")
    run.kill()
    ckpts = fs.find(key("train_teacher_plus/ray_train/teacher_plus"))
    epochs = {  # checkpoint folder -> the epoch (0-based) it was saved after
        p.rsplit("/", 1)[0]: torch.load(io.BytesIO(fs.cat(p)), weights_only=True)["epoch"]
        for p in ckpts
        if p.endswith("/train_state.pt")
    }
    assert epochs, ckpts
    latest = max(epochs, key=epochs.get)
    seen["tp_epochs_at_kill"] = sorted(epochs.values())
    seen["tp_history_at_kill"] = json.loads(fs.cat(f"{latest}/history.json"))
    seen["pl1_manifest"] = json.loads(fs.cat(key("pseudo_label_1/manifest.json")))
    seen["logs"].append(run.text())

    # 3. resumed; the storage server goes away for a while as pseudo_label_2 starts
    run = Run(work, cfg_path, env, "run3", "-v")  # -v: Ray Train's INFO lines, checked below
    run.wait_for(lambda: fs.exists(key("pseudo_label_2/attempt.json")), "pseudo_label_2")
    s3_server.stop()
    time.sleep(OUTAGE_S)
    s3_server.start()
    seen["run3"] = run.finish()
    seen["logs"].append(seen["run3"])

    # 4. a rerun of the finished run does nothing
    t0 = time.time()
    run = Run(work, cfg_path, env, "run4")
    seen["run4"] = run.finish()
    seen["run4_seconds"] = time.time() - t0
    seen["logs"].append(seen["run4"])
    states, out = status()
    seen["status"] = [states[s] for s in STAGES]
    seen["logs"].append(out)
    seen["ray_tmp"] = ray_tmp
    ran = STAGES[: STAGES.index(UNTIL) + 1]
    seen["manifests"] = {s: json.loads(fs.cat(key(f"{s}/manifest.json"))) for s in ran}
    seen["fs"] = fs
    yield seen
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_kill_during_pseudo_labeling_resumes_at_shard_level(s3_pipeline):
    committed = s3_pipeline["u1_committed_at_kill"]
    assert 1 <= len(committed) <= U1_SHARDS and not s3_pipeline["pl1_manifest_after_kill"]
    assert s3_pipeline["status_after_kill"]["train_teacher"] == "done"
    assert s3_pipeline["status_after_kill"]["pseudo_label_1"] == "partial"
    counts = s3_pipeline["pl1_manifest"]["summary"]
    # the work was counted, not assumed: committed shards were skipped, the rest scored
    assert counts["shards_total"] == U1_SHARDS
    assert counts["shards_skipped"] == len(committed)
    assert counts["shards"] == U1_SHARDS - len(committed)
    fs, bucket = s3_pipeline["fs"], s3_pipeline["bucket"]
    labels = [p for p in fs.find(f"{bucket}/run/pseudo_label_1/labels") if p.endswith(".parquet")]
    rejects = [p for p in fs.find(f"{bucket}/run/pseudo_label_1/rejects") if p.endswith(".parquet")]
    assert len(labels) == len(rejects) == U1_SHARDS  # one part per shard, no strays
    keys = []
    for lp, rp in zip(sorted(labels), sorted(rejects), strict=True):
        n_labels = pq.read_table(io.BytesIO(fs.cat(lp))).num_rows
        n_rejects = pq.read_table(io.BytesIO(fs.cat(rp))).num_rows
        assert n_labels + n_rejects == U1_SHARD_SIZE, lp  # labeled + rejected == read
        keys += pq.read_table(io.BytesIO(fs.cat(lp)), columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == U1_SHARDS * U1_SHARD_SIZE  # every key exactly once


def test_kill_during_training_resumes_from_the_bucket_checkpoint(s3_pipeline):
    assert s3_pipeline["tp_epochs_at_kill"][-1] < 2  # killed before the last of 3 epochs
    before = s3_pipeline["tp_history_at_kill"]
    fs, bucket = s3_pipeline["fs"], s3_pipeline["bucket"]
    after = json.loads(fs.cat(f"{bucket}/run/train_teacher_plus/history.json"))
    assert [h["epoch"] for h in after] == [1, 2, 3]
    # The epochs trained before the kill come back from the checkpoint byte for byte
    # (timings included); a restart from scratch would have measured them again.
    assert after[: len(before)] == before and len(before) >= 1
    training = s3_pipeline["manifests"]["train_teacher_plus"]["summary"]["training"]
    assert training["epochs"] == 3
    # Ray Train found the run's checkpoints in the bucket (not on this machine's disk)
    assert "A run snapshot was found in storage folder" in s3_pipeline["run3"]


def test_storage_outage_during_a_stage(s3_pipeline):
    m = s3_pipeline["manifests"]["pseudo_label_2"]
    assert m["seconds"] >= OUTAGE_S - 1  # the stage was running across the outage
    assert m["summary"]["scored"] == 192 and m["summary"]["rejected"] == 0


def test_finished_run_in_the_bucket(s3_pipeline):
    done = STAGES.index(UNTIL) + 1
    assert s3_pipeline["status"] == ["done"] * done + ["pending"] * (len(STAGES) - done)
    assert "ran 0 stage(s)" in s3_pipeline["run4"]
    fs, bucket = s3_pipeline["fs"], s3_pipeline["bucket"]
    for sub in ("train_teacher", "train_teacher_plus"):
        assert fs.exists(f"{bucket}/run/{sub}/model/model.json")
    assert not fs.exists(f"{bucket}/run/distill_student")  # the run stopped where it was told
    assert list((s3_pipeline["work"] / "cwd").iterdir()) == []  # nothing written locally


def test_credentials_appear_nowhere(s3_pipeline):
    secret = SECRET_KEY.encode()
    fs, bucket = s3_pipeline["fs"], s3_pipeline["bucket"]
    objects = fs.find(f"{bucket}/run")
    assert len(objects) > 50
    for p in objects:
        assert secret not in fs.cat(p), p
    for text in s3_pipeline["logs"]:
        assert SECRET_KEY not in text
    for root, _, files in os.walk(s3_pipeline["ray_tmp"]):
        for f in files:
            path = os.path.join(root, f)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as fh:
                    assert secret not in fh.read(), path
