"""The recipe on a real 3-node Ray cluster (`tests/ray_cluster.py`), submitted as users submit
(`fiqa submit` to the head's Jobs API), with run data and ``run_dir`` in a bucket, and
worker nodes lost without grace on the way:

1. during ``pseudo_label_1``, once a shard is committed, the node running the scoring
   actor is SIGKILLed whole (raylet, agents, workers) and a replacement node joins, as a
   Kubernetes node group replaces a lost spot node; labeling finishes;
2. during ``train_teacher_plus``, once its first checkpoint is in the bucket, the node
   running the Train worker is SIGKILLed; Ray Train restarts the worker group on the
   surviving node from that checkpoint (``FailureConfig``), and training finishes.

Then: the job succeeded, work ran on several nodes (Ray's state API), every key of U1
exactly once across labels and rejects, no partial part file, training resumed after
epoch 1, and the run's report written.
"""

from __future__ import annotations

import io
import json
import subprocess
import time

import pyarrow.parquet as pq
import pytest
import yaml
from ray_cluster import LocalCluster

from fiqa.cluster import submit

from conftest import fiqa_cmd, reshard, tiny_config

pytestmark = pytest.mark.slow

U1_SHARDS, U1_SHARD_SIZE = 12, 16  # small shards: the node loss lands between commits
TP_EPOCHS = 3


def wait_for(condition, what: str, job, timeout: float = 900) -> None:
    """Poll ``condition`` while the submitted job runs; fail with its logs if it ends first."""
    deadline = time.time() + timeout
    while not condition():
        if job.poll() is not None:
            raise AssertionError(f"the job ended before {what}:\n{job.text()[-6000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{job.text()[-6000:]}")
        time.sleep(0.2)


class Submission:
    """`fiqa submit --wait` in a subprocess: it follows the job's logs until the job ends."""

    def __init__(self, cfg_path, cluster: LocalCluster, log_path):
        self.log_path = log_path
        with open(log_path, "w") as out:
            self.proc = subprocess.Popen(
                [*fiqa_cmd(), "submit", str(cfg_path), "--address", cluster.address, "--wait"],
                stdout=out, stderr=subprocess.STDOUT, env=cluster.env, text=True,
            )  # fmt: skip

    def poll(self):
        return self.proc.poll()

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def multinode_run(ray_cluster, s3_server, tiny_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("multinode")
    fs = s3_server.fs()
    bucket = s3_server.make_bucket()
    data = f"s3://{bucket}/data"
    for split in ("labeled_train", "labeled_val", "test", "unlabeled_2", "ground_truth"):
        fs.put(str(tiny_data / split), f"{bucket}/data/{split}", recursive=True)
    for p in reshard(tiny_data / "unlabeled_1", work / "u1", U1_SHARD_SIZE):
        fs.put_file(str(p), f"{bucket}/data/unlabeled_1/{p.name}")

    cfg = tiny_config(
        tiny_data,
        f"s3://{bucket}/run",
        train_teacher_plus={"epochs": TP_EPOCHS},
        distill_student={"labeled_only_baseline": False},  # the ablation runs in test_pipeline_e2e
    )
    for k in ("labeled_train", "labeled_val", "test", "unlabeled_1", "unlabeled_2"):
        cfg["data"][k] = f"{data}/{k}"
    cfg["data"]["unlabeled_1_truth"] = f"{data}/ground_truth/unlabeled_1.csv"
    cfg["data"]["unlabeled_2_truth"] = f"{data}/ground_truth/unlabeled_2.csv"
    cfg["scoring"]["batch_size"] = U1_SHARD_SIZE
    cfg["storage"] = s3_server.storage_config()
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    def parts(stage: str) -> list[str]:
        fs.invalidate_cache()
        return [p for p in fs.find(f"{bucket}/run/{stage}/labels") if p.endswith(".parquet")]

    seen: dict = {"fs": fs, "bucket": bucket, "cluster": ray_cluster, "events": []}
    t0 = time.time()
    job = Submission(cfg_path, ray_cluster, work / "submit.log")

    # 1. the scoring actor's node dies once pseudo_label_1 committed a shard
    wait_for(lambda: parts("pseudo_label_1"), "pseudo_label_1 committed a shard", job)
    scorers = ray_cluster.workers("MapWorker(")
    assert scorers, "no scoring actor alive at the kill"
    victim = next(iter(scorers.values()))
    # Seen here, not only in the state API: Ray Data restarts a lost actor under its old id,
    # and the state API then lists it on its new node alone.
    seen["ran_on"] = {"scoring actors": set(scorers.values())}
    seen["pl1_committed_at_kill"] = len(parts("pseudo_label_1"))
    ray_cluster.kill_node(victim)
    seen["events"].append(("pseudo_label_1", victim, time.time() - t0))
    ray_cluster.add_node("c")  # the replacement node

    # 2. the Train worker's node dies once teacher-plus has its first checkpoint
    snapshot = (
        f"{bucket}/run/train_teacher_plus/ray_train/teacher_plus/checkpoint_manager_snapshot.json"
    )
    wait_for(lambda: fs.invalidate_cache() or fs.exists(snapshot), "a teacher_plus checkpoint", job)
    trainers = ray_cluster.workers("RayTrainWorker")
    assert trainers, "no Train worker alive at the kill"
    victim = next(iter(trainers.values()))
    assert victim != "head"
    seen["ran_on"]["train workers"] = set(trainers.values())
    ray_cluster.kill_node(victim)
    seen["events"].append(("train_teacher_plus", victim, time.time() - t0))

    job.proc.wait(timeout=1500)
    seen["seconds"] = time.time() - t0
    seen["submit_log"] = job.text()
    seen["returncode"] = job.proc.returncode
    client = submit.connect(ray_cluster.address)
    seen["job_id"] = seen["submit_log"].split()[0] if seen["submit_log"] else None
    seen["jobs"] = client.list_jobs()
    yield seen


def test_the_job_survives_two_node_losses(multinode_run):
    assert multinode_run["returncode"] == 0, multinode_run["submit_log"][-6000:]
    stages = [e[0] for e in multinode_run["events"]]
    assert stages == ["pseudo_label_1", "train_teacher_plus"]
    fs, bucket = multinode_run["fs"], multinode_run["bucket"]
    report = json.loads(fs.cat(f"{bucket}/run/evaluate/report.json"))
    assert {"teacher", "teacher_plus", "student"} <= set(report)


def test_the_report_and_models_are_in_the_bucket(multinode_run):
    fs, bucket = multinode_run["fs"], multinode_run["bucket"]
    report = json.loads(fs.cat(f"{bucket}/run/evaluate/report.json"))
    assert report["pseudo_label"]["unlabeled_1"]["labeled"] == U1_SHARDS * U1_SHARD_SIZE
    assert "agreement" in report["pseudo_label"]["unlabeled_2"]  # truth CSV read from the bucket
    for png in ("pred_vs_mos.png", "pseudo_label_hist.png", "training_curves.png"):
        assert fs.size(f"{bucket}/run/evaluate/plots/{png}") > 5000
    for sub in ("train_teacher", "train_teacher_plus", "distill_student/student"):
        assert fs.exists(f"{bucket}/run/{sub}/model/model.json")
    # distill_student.labeled_only_baseline: false: no ablation student, trained or scored
    assert "student_labeled_only" not in report
    assert not fs.exists(f"{bucket}/run/distill_student/student_labeled_only")


def test_work_ran_on_several_nodes(multinode_run):
    from ray.util.state import list_actors, list_tasks

    cluster = multinode_run["cluster"]
    names = cluster.node_names()
    tasks = list_tasks(
        address=cluster.address, detail=True, limit=10000, raise_on_missing_output=False
    )
    actors = list_actors(address=cluster.address, detail=True, limit=10000)
    where = {
        "decode tasks": {names.get(t.node_id) for t in tasks if "decode" in t.name.lower()},
        "scoring actors": {names.get(a.node_id) for a in actors if "MapWorker" in a.class_name},
        "train workers": {names.get(a.node_id) for a in actors if "RayTrainWorker" in a.class_name},
        # on the nodes that staged the rows, never on the head (it has no CPUs, as on KubeRay)
        "shard committers": {
            names.get(a.node_id) for a in actors if a.class_name == "ShardCommitter"
        },
    }
    for what, nodes in where.items():
        nodes |= multinode_run["ran_on"].get(what, set())
        nodes.discard(None)
        assert len(nodes) >= 2, f"{what} ran on {nodes} only"
        assert "head" not in nodes, f"{what} ran on the head"


def test_every_key_exactly_once_after_the_node_loss(multinode_run):
    fs, bucket = multinode_run["fs"], multinode_run["bucket"]
    labels = sorted(
        p for p in fs.find(f"{bucket}/run/pseudo_label_1/labels") if p.endswith(".parquet")
    )
    rejects = sorted(
        p for p in fs.find(f"{bucket}/run/pseudo_label_1/rejects") if p.endswith(".parquet")
    )
    assert len(labels) == len(rejects) == U1_SHARDS  # one complete part per shard, no strays
    keys = []
    for lp, rp in zip(labels, rejects, strict=True):
        table = pq.read_table(io.BytesIO(fs.cat(lp)), columns=["key"])  # a partial file fails here
        n_rejects = pq.read_table(io.BytesIO(fs.cat(rp))).num_rows
        assert table.num_rows + n_rejects == U1_SHARD_SIZE, lp
        keys += table.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == U1_SHARDS * U1_SHARD_SIZE
    assert 1 <= multinode_run["pl1_committed_at_kill"] < U1_SHARDS  # the loss came mid-stage


def test_training_resumed_from_its_checkpoint_on_a_surviving_node(multinode_run):
    fs, bucket = multinode_run["fs"], multinode_run["bucket"]
    history = json.loads(fs.cat(f"{bucket}/run/train_teacher_plus/history.json"))
    assert [h["epoch"] for h in history] == list(range(1, TP_EPOCHS + 1))
    assert history[-1]["restarts"] >= 1  # a restart, from a checkpoint after epoch >= 1


def test_the_cluster_labels_as_a_single_node_does(multinode_run, s3_server, tmp_path):
    """PL(U1) of the 3-node run, with its node loss, against `fiqa label` of the same teacher
    on the same shards on a single-node local Ray: the same keys, the same scores."""
    from s3_server import clean_env

    fs, bucket = multinode_run["fs"], multinode_run["bucket"]
    out = f"s3://{bucket}/single-node-u1"
    env = {k: v for k, v in clean_env().items() if k != "RAY_ADDRESS"}
    single = subprocess.run(
        [*fiqa_cmd(), "label", f"s3://{bucket}/run/train_teacher/model",
         f"s3://{bucket}/data/unlabeled_1", "-o", out, "--batch-size", str(U1_SHARD_SIZE),
         "--endpoint-url", s3_server.endpoint, "--set", "storage.addressing_style=path"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]

    def scores(prefix: str) -> dict[str, float]:
        parts = [p for p in fs.find(prefix) if p.endswith(".parquet")]
        tables = [pq.read_table(io.BytesIO(fs.cat(p)), columns=["key", "score"]) for p in parts]
        return {
            k: s
            for t in tables
            for k, s in zip(t["key"].to_pylist(), t["score"].to_pylist(), strict=True)
        }

    cluster = scores(f"{bucket}/run/pseudo_label_1/labels")
    alone = scores(f"{bucket}/single-node-u1/labels")
    assert cluster.keys() == alone.keys() and len(cluster) == U1_SHARDS * U1_SHARD_SIZE
    worst = max(abs(cluster[k] - alone[k]) for k in cluster)
    assert worst < 1e-4, f"scores differ by up to {worst}"


def test_a_local_path_some_node_cannot_see_is_refused(ray_cluster, tiny_data, tmp_path):
    """`fiqa label` joined to the cluster with local paths: each node looks for them first.

    ``/proc/self/cwd/...`` is this driver's working directory only in the driver: every Ray
    worker resolves it to its own, as a node without the driver's disk would miss the path.
    """
    from fiqa.models import create_model, save_checkpoint

    ckpt = tmp_path / "model"
    save_checkpoint(str(ckpt), create_model("mobilenetv3_small_100"), {"arch": "mobilenetv3_small_100", "image_size": 48, "resize": 56})  # fmt: skip
    (tmp_path / "pool").mkdir()
    for p in sorted((tiny_data / "unlabeled_2").glob("*.tar"))[:1]:
        (tmp_path / "pool" / p.name).write_bytes(p.read_bytes())

    def label(pool: str, out: str) -> subprocess.CompletedProcess:
        cmd = [*fiqa_cmd(), "label", str(ckpt), pool, "-o", out, "--batch-size", "32",
               "--address", ray_cluster.gcs_address]  # fmt: skip
        return subprocess.run(
            cmd, cwd=tmp_path, env=ray_cluster.env, capture_output=True, text=True, timeout=600
        )

    refused = label("/proc/self/cwd/pool", str(tmp_path / "refused"))
    assert refused.returncode != 0
    assert "INPUT '/proc/self/cwd/pool/" in refused.stderr, refused.stderr[-3000:]
    assert "is a local path that node" in refused.stderr
    assert not list((tmp_path / "refused").glob("labels/*.parquet"))
    assert not list((tmp_path / "refused").glob(".fiqa-shared-check-*"))  # its marker removed

    seen = label(str(tmp_path / "pool"), str(tmp_path / "out"))  # every node sees these
    assert seen.returncode == 0, seen.stderr[-3000:]
    assert len(list((tmp_path / "out").glob("labels/*.parquet"))) == 1
