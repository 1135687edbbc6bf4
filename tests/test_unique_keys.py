"""Rows staged where they are scored, committed per shard, and keys kept exactly once across
shards without a key set on the driver (`fiqa.scoring.fragments`, `commit`, `unique_keys`)."""

import hashlib
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest

from fiqa import storage
from fiqa.data.tables import list_parts, part_name
from fiqa.scoring import ScoreJob, unique_keys
from fiqa.scoring.commit import ShardLedger, commit_shard, committed_shards
from fiqa.scoring.decode_task import read_and_decode
from fiqa.scoring.fragments import staging_dir, write_fragments
from fiqa.scoring.unique_keys import reject_duplicate_keys

from conftest import jpeg_bytes, write_tar


@pytest.fixture
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def job_for(tmp_path, shards) -> ScoreJob:
    return ScoreJob(shards=shards, out_dir=str(tmp_path / "out"), source="pseudo_u1")


def stage_and_commit(job: ScoreJob, split: int = 2) -> ShardLedger:
    """The engine's path without a cluster: each decoded block staged in ``split`` fragments,
    shards committed as their rows are all staged."""
    ledger = ShardLedger()
    for url in job.shards:
        for block in read_and_decode({"shard": np.array([url], dtype=object)}, job):
            n = len(block["key"])
            cuts = [round(n * i / split) for i in range(split + 1)]
            for a, b in zip(cuts, cuts[1:], strict=False):
                part = {k: v[a:b] for k, v in block.items()}  # as an actor's batch cuts a block
                for done_url, total, _ in ledger.add(write_fragments(part, job)):
                    commit_shard(job, done_url, total)
    assert not ledger.open_shards
    return ledger


def tables(job):
    labels = pq.read_table(list_parts(f"{job.out_dir}/labels")).to_pylist()
    rejects = pq.read_table(list_parts(f"{job.out_dir}/rejects")).to_pylist()
    return labels, rejects


def shard(tmp_path, name, keys):
    return write_tar(tmp_path / f"{name}.tar", [(f"{k}.jpg", jpeg_bytes()) for k in keys])


def test_a_shard_commits_from_its_fragments_and_its_staging_goes(tmp_path):
    a = shard(tmp_path, "a", [f"k{i}" for i in range(7)])
    job = job_for(tmp_path, [a])
    stage_and_commit(job, split=3)
    labels, rejects = tables(job)
    assert [r["key"] for r in labels] == [f"k{i}" for i in range(7)]  # in the shard's order
    assert rejects == [] and committed_shards(job.out_dir) == {part_name(a)}
    assert storage.listdir(staging_dir(job)) == []


def test_rows_staged_twice_are_committed_once_and_missing_rows_refuse(tmp_path):
    a = shard(tmp_path, "a", ["x", "y", "z"])
    job = job_for(tmp_path, [a])
    (block,) = read_and_decode({"shard": np.array([a], dtype=object)}, job)
    write_fragments(block, job)
    retry = {k: v[:2] for k, v in block.items()}  # a retried batch: rows 0-1 again
    write_fragments(retry, job)
    commit_shard(job, a, 3)
    labels, _ = tables(job)
    assert [r["key"] for r in labels] == ["x", "y", "z"]

    b = shard(tmp_path, "b", ["p", "q"])
    (block,) = read_and_decode({"shard": np.array([b], dtype=object)}, job)
    write_fragments({k: v[:1] for k, v in block.items()}, job)
    with pytest.raises(RuntimeError, match="1 distinct rows staged of 2"):
        commit_shard(job, b, 2)


def test_keys_in_several_shards_stay_in_the_first_by_url(tmp_path):
    # Committed in any order; the copy in the first shard by URL is kept.
    c = shard(tmp_path, "c", ["k1", "k5", "k6"])
    a = shard(tmp_path, "a", ["k1", "k2", "k3"])
    b = shard(tmp_path, "b", ["k2", "k4", "k1"])
    job = job_for(tmp_path, [c, b, a])
    stage_and_commit(job)
    assert reject_duplicate_keys(job) == 3
    labels, rejects = tables(job)
    assert sorted((r["key"], r["shard"]) for r in labels) == [
        ("k1", a),
        ("k2", a),
        ("k3", a),
        ("k4", b),
        ("k5", c),
        ("k6", c),
    ]
    assert sorted((r["key"], r["shard"], r["reason"]) for r in rejects) == [
        ("k1", b, "duplicate_key"),
        ("k1", c, "duplicate_key"),
        ("k2", b, "duplicate_key"),
    ]


def colliding_keys() -> tuple[str, str]:
    """Two distinct keys with the same CRC-32, the hash that routes keys to reducers."""
    seen: dict[int, str] = {}
    for i in range(1_000_000):  # (keys differing in 32 bits or fewer never share a CRC)
        k = "face-" + hashlib.md5(str(i).encode()).hexdigest()[:12]
        h = zlib.crc32(k.encode())
        if h in seen:
            return seen[h], k
        seen[h] = k
    raise AssertionError("no CRC-32 collision in a million keys")


def test_distinct_keys_that_share_a_hash_are_both_kept(tmp_path, monkeypatch):
    k1, k2 = colliding_keys()
    assert k1 != k2 and zlib.crc32(k1.encode()) == zlib.crc32(k2.encode())
    a = shard(tmp_path, "a", [k1, "same", "x1"])
    b = shard(tmp_path, "b", [k2, "same", "x2"])
    job = job_for(tmp_path, [a, b])
    stage_and_commit(job)
    monkeypatch.setattr(unique_keys, "KEYS_PER_PARTITION", 2)  # several reducers
    monkeypatch.setattr(unique_keys, "PARTS_PER_MAPPER", 1)  # and mappers
    assert reject_duplicate_keys(job) == 1
    labels, rejects = tables(job)
    assert sorted(r["key"] for r in labels) == sorted([k1, k2, "same", "x1", "x2"])
    assert [(r["key"], r["shard"]) for r in rejects] == [("same", b)]


def test_an_interrupted_move_is_completed_and_a_clean_table_not_read_again(tmp_path, monkeypatch):
    a = shard(tmp_path, "a", ["k1", "k2"])
    b = shard(tmp_path, "b", ["k1", "k3"])
    job = job_for(tmp_path, [a, b])
    stage_and_commit(job)
    real_write = unique_keys.write_part
    calls = []

    def dies_after_the_rejects(table, directory, name, *args):
        calls.append(directory)
        if directory.endswith("labels"):
            raise OSError("killed")
        return real_write(table, directory, name, *args)

    monkeypatch.setattr(unique_keys, "write_part", dies_after_the_rejects)
    with pytest.raises(OSError):
        reject_duplicate_keys(job)
    monkeypatch.setattr(unique_keys, "write_part", real_write)
    assert reject_duplicate_keys(job) == 1  # the rerun finishes the move ...
    labels, rejects = tables(job)
    assert sorted(r["key"] for r in labels) == ["k1", "k2", "k3"]
    assert [(r["key"], r["reason"]) for r in rejects] == [("k1", "duplicate_key")]  # ... once

    def must_not_run(*a, **k):
        raise AssertionError("a table already checked was read again")

    monkeypatch.setattr(unique_keys, "route_keys", must_not_run)
    assert reject_duplicate_keys(job) == 0


def test_the_pass_runs_as_ray_tasks(tmp_path, monkeypatch, ray_local):
    shards = [shard(tmp_path, f"s{i}", [f"k{j}" for j in range(i, i + 4)]) for i in range(4)]
    job = job_for(tmp_path, shards)
    stage_and_commit(job)
    monkeypatch.setattr(unique_keys, "KEYS_PER_PARTITION", 5)
    monkeypatch.setattr(unique_keys, "PARTS_PER_MAPPER", 2)
    # keys k0..k6; 16 rows, so 9 copies move
    assert reject_duplicate_keys(job) == 16 - 7
    labels, rejects = tables(job)
    assert sorted(r["key"] for r in labels) == [f"k{j}" for j in range(7)]
    assert len(rejects) == 9
