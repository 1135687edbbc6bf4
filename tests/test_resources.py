"""The resource planner (scoring and training) against a real local Ray."""

import pytest
import ray

from fiqa.cluster.resources import (
    check_training,
    decode_task_slots,
    plan_scoring,
    wait_for_free_cpu,
)
from fiqa.config import ConfigError, ScoringConfig


@pytest.fixture(scope="module")
def two_cpu_ray():
    # One logical GPU (Ray schedules by declared resources; no device is touched here).
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False)
    yield
    ray.shutdown()


def test_waiting_for_a_free_cpu_ends_when_one_is_released(two_cpu_ray):
    """What an eager Ray Data execution waits for after a job that held every CPU."""

    @ray.remote(num_cpus=2)
    class Holder:
        def ready(self):
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    assert not wait_for_free_cpu(timeout_s=0.3)  # both CPUs held: it gives up, saying so
    ray.kill(holder)
    assert wait_for_free_cpu(timeout_s=30)  # released: the view shows it within the wait


def test_a_pool_that_would_starve_decoding_is_refused(two_cpu_ray):
    with pytest.raises(ConfigError, match="starve"):
        plan_scoring(ScoringConfig(concurrency=2, num_cpus=1, decode_cpus=1), with_model=True)


def test_gpus_per_actor_follow_the_cluster(two_cpu_ray, monkeypatch):
    assert plan_scoring(ScoringConfig(), with_model=True).num_gpus == 1.0
    # The same cluster as a CPU-only one would report itself: actors score on the CPU.
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 1e9})
    assert plan_scoring(ScoringConfig(), with_model=True).num_gpus == 0.0


def test_gpus_a_fixed_cluster_lacks_are_refused(two_cpu_ray):
    """A local Ray cannot add a GPU: the actors would wait for ever, so say so up front."""
    with pytest.raises(ConfigError, match=r"2 actor\(s\) x 1 GPU exceeds the cluster's 1 GPU"):
        plan_scoring(ScoringConfig(num_gpus=1, num_cpus=0.25, concurrency=2), with_model=True)


def test_a_pool_that_fits_at_its_minimum_runs_with_the_gpus_there_are(two_cpu_ray, caplog):
    with caplog.at_level("WARNING", logger="fiqa.cluster.resources"):
        cfg = plan_scoring(
            ScoringConfig(num_gpus=0.5, num_cpus=0.25, concurrency=[1, 4]), with_model=True
        )
    assert cfg.concurrency == [1, 4] and "the pool runs 2 actor(s)" in caplog.text


def test_gpus_the_cluster_lacks_now_only_warn_where_it_may_grow(two_cpu_ray, monkeypatch, caplog):
    """KubeRay: an autoscaler may add GPU nodes."""
    from fiqa.cluster import local

    monkeypatch.setattr(local, "_may_grow", True)
    with caplog.at_level("WARNING", logger="fiqa.cluster.resources"):
        cfg = plan_scoring(
            ScoringConfig(num_gpus=1.0, num_cpus=0.25, concurrency=[1, 4]), with_model=True
        )
    assert cfg.num_gpus == 1.0 and "up to 4 actor(s) x 1 GPU" in caplog.text


def test_an_autoscaling_pool_is_planned_by_its_maximum(two_cpu_ray):
    with pytest.raises(ConfigError, match="2 actor"):
        plan_scoring(ScoringConfig(concurrency=[1, 2], num_cpus=1), with_model=True)


def test_the_stream_buffer_is_sized_for_the_decode_tasks_the_cpus_run(two_cpu_ray):
    assert decode_task_slots(ScoringConfig(num_cpus=1), with_model=True) == 1
    assert decode_task_slots(ScoringConfig(num_cpus=1, decode_cpus=0.5), with_model=True) == 2
    assert decode_task_slots(ScoringConfig(num_cpus=1), with_model=False) == 2  # no actors
    assert decode_task_slots(ScoringConfig(num_cpus=2), with_model=True) == 1  # at least one


def test_without_a_model_only_decoding_needs_cpus(two_cpu_ray):
    cfg = plan_scoring(ScoringConfig(concurrency=4, num_cpus=1, decode_cpus=2), with_model=False)
    assert cfg.decode_cpus == 2


def test_on_a_cluster_that_may_grow_a_large_plan_only_warns(two_cpu_ray, monkeypatch, caplog):
    """KubeRay: the GPU group starts at 0 replicas, so the plan exceeds the cluster at first."""
    from fiqa.cluster import local
    from fiqa.config import TrainConfig

    monkeypatch.setattr(local, "_may_grow", True)
    with caplog.at_level("WARNING"):
        cfg = plan_scoring(ScoringConfig(concurrency=[1, 4], num_cpus=2), with_model=True)
        check_training(TrainConfig(num_workers=4, cpus_per_worker=6))
    assert cfg.concurrency == [1, 4]
    assert "as an autoscaler adds nodes" in caplog.text
    assert "workers start as an autoscaler adds nodes" in caplog.text


def test_a_joined_cluster_may_grow_unless_the_config_says_otherwise():
    from fiqa.cluster.local import may_grow
    from fiqa.config import RayConfig

    assert may_grow(RayConfig(), address="ray://head:10001")  # a RayJob, fiqa submit
    assert not may_grow(RayConfig(autoscaling=False), address="ray://head:10001")
    assert not may_grow(RayConfig(), address=None)  # the local Ray fiqa starts
    assert may_grow(RayConfig(autoscaling=True), address=None)


@pytest.mark.slow
def test_decoded_blocks_reach_the_actor_as_the_engine_yields_them(
    two_cpu_ray, tmp_path, monkeypatch
):
    """The driver's plan sizes the decoded blocks (within 64 MB here, set on the driver
    only: at 224 px three batches of 128, where the workers' own 32 MB would make one), and
    Ray Data keeps them as they are yielded: a shard of 512 travels as blocks of 384 and 128."""
    from fiqa.cli.label import label_shards
    from fiqa.models import create_model, save_checkpoint
    from fiqa.scoring import stream
    from fiqa.scoring.commit import ShardLedger
    from fiqa.scoring.decode_task import read_and_decode

    from conftest import jpeg_bytes, write_tar

    shard = write_tar(tmp_path / "pool.tar", [(f"f{i:03d}.jpg", jpeg_bytes()) for i in range(512)])
    model = str(tmp_path / "model")
    meta = {"arch": "mobilenetv3_small_100", "image_size": 224, "resize": 224}
    save_checkpoint(model, create_model("mobilenetv3_small_100", 224), meta)
    monkeypatch.setattr(stream, "BLOCK_BYTES", 64 * 2**20)  # the workers keep the default
    decoded = tmp_path / "decoded.txt"

    def recording_decode(batch, job, block_rows=None):
        for block in read_and_decode(batch, job, block_rows):
            with open(decoded, "a") as f:
                f.write(f"{len(block['row'])}\n")
            yield block

    recording_decode.__name__ = read_and_decode.__name__
    sizes = []
    add = ShardLedger.add

    def recording_add(self, lines):
        sizes.extend(int(n) for n in lines["rows"])  # rows of each actor call's fragment
        return add(self, lines)

    monkeypatch.setattr(ShardLedger, "add", recording_add)  # the driver's side
    label = ScoringConfig(batch_size=128, num_gpus=0.0, num_cpus=1, concurrency=1)
    out = str(tmp_path / "out")
    stats = label_shards(model, [shard], out, label, progress=False, decode=recording_decode)
    assert stats["scored"] == 512
    assert decoded.read_text().split() == ["384", "128"]
    assert sizes == [128] * 4  # one actor call a batch


@pytest.mark.slow
def test_a_decode_task_reads_several_shards_and_commits_each_once(two_cpu_ray, tmp_path, caplog):
    """Twelve shards on one decode slot: tasks of three shards in turn (the plan says so); a
    junk shard among them is reported and its task goes on; every key comes out once."""
    import logging

    import pyarrow.parquet as pq

    from fiqa.cli.label import label_shards
    from fiqa.data.tables import list_parts
    from fiqa.models import create_model, save_checkpoint

    from conftest import labeled_members, write_tar

    shards = [
        write_tar(tmp_path / f"s{i:02d}.tar", labeled_members(20, prefix=f"s{i}-"))
        for i in range(11)
    ]
    junk = tmp_path / "s11.tar"
    junk.write_bytes(b"not a tar" * 100)
    shards.insert(4, str(junk))
    model = str(tmp_path / "model")
    meta = {"arch": "mobilenetv3_small_100", "image_size": 64, "resize": 64}
    save_checkpoint(model, create_model("mobilenetv3_small_100", 64), meta)
    label = ScoringConfig(batch_size=8, num_gpus=0.0, num_cpus=1, concurrency=1)
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG, logger="fiqa.scoring.engine"):
        stats = label_shards(model, shards, str(out), label, progress=False)
    (plan,) = [r.stream_plan for r in caplog.records if hasattr(r, "stream_plan")]
    assert plan["decode_tasks"] == 1 and plan["shards_per_task"] == 3
    assert (stats["shards"], stats["scored"]) == (12, 220)
    keys = pq.read_table(list_parts(f"{out}/labels")).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 220
    rejects = pq.read_table(list_parts(f"{out}/rejects")).to_pylist()
    assert [r["reason"].split(":")[0] for r in rejects] == ["unreadable_shard"]
