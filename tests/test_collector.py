"""The per-shard logic of the scoring engine, without a cluster."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from fiqa import labeling
from fiqa.config import LabelConfig
from fiqa.data.tables import list_parts, part_name
from fiqa.labeling import (
    ScoreJob,
    ShardCollector,
    committed_shards,
    read_and_decode,
    rows_per_block,
    stream_buffer_bytes,
)
from fiqa.metrics import Logistic4

from conftest import labeled_members, write_tar

ROWS = 8  # rows per decoded block in these tests: one scoring batch of 8


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of one 8-row batch, so that a shard of a dozen samples spans several."""
    monkeypatch.setattr(labeling, "BLOCK_BYTES", 1)
    return LabelConfig(batch_size=ROWS)


def batches_for(shard, job):
    return list(read_and_decode({"shard": np.array([shard], dtype=object)}, job))


def test_blocks_hold_whole_batches_within_their_byte_budget():
    face = 112 * 112 * 3 + labeling.MEAN_IMAGE_BYTES
    assert rows_per_block(112, 64) == 576  # 9 batches of 64: 31 MB, the 10th would pass 32 MB
    assert 576 * face <= labeling.BLOCK_BYTES < 640 * face
    assert rows_per_block(448, 64) == 64  # one batch is 40 MB already: a block is one batch
    assert rows_per_block(448, 16) == 48
    assert rows_per_block(None, 64) == 2048  # no pixels (ingest): the encoded images only
    assert rows_per_block(112, 1) == 621


def test_read_and_decode_marks_the_last_batch_with_the_shard_total(tmp_path, small_blocks):
    n = ROWS + 3
    shard = write_tar(tmp_path / "a.tar", labeled_members(n))
    job = ScoreJob(
        shards=[shard],
        out_dir=str(tmp_path / "out"),
        source="x",
        model_path="m",
        crop=32,
        resize=40,
        label=small_blocks,
    )
    batches = batches_for(shard, job)
    assert [len(b["key"]) for b in batches] == [ROWS, 3]
    assert batches[0]["shard_total"][0] == -1 and batches[-1]["shard_total"][0] == n
    assert batches[0]["pixels"].shape == (ROWS, 32, 32, 3)


def test_last_batch_is_never_empty(tmp_path, small_blocks):
    shard = write_tar(tmp_path / "a.tar", labeled_members(ROWS))
    job = ScoreJob(shards=[shard], out_dir=str(tmp_path / "o"), source="x", label=small_blocks)
    (batch,) = batches_for(shard, job)
    assert batch["shard_total"][0] == ROWS and "pixels" not in batch  # no model: no pixels


def test_collector_commits_each_shard_once_complete(tmp_path, small_blocks):
    a = write_tar(tmp_path / "a.tar", labeled_members(ROWS + 5) + [("bad.jpg", b"junk")])
    b = write_tar(tmp_path / "b.tar", labeled_members(4, prefix="b"))
    out = str(tmp_path / "out")
    job = ScoreJob(
        shards=[a, b],
        out_dir=out,
        source="pseudo_u1",
        model_id="m1",
        calibration=Logistic4(5, 1, 0, 1),
        require_label=False,
        model_path="unused",
        label=small_blocks,
    )
    col = ShardCollector(job)
    stream = batches_for(a, job) + batches_for(b, job)
    stream = [stream[0], stream[2], stream[1]]  # shards interleave in any order
    done = []
    for batch in stream:
        batch["raw_score"] = np.where(batch["reason"] == "", 0.5, np.nan)
        batch["label"][:] = np.nan  # as for an unlabeled pool
        done += col.add(batch)
    assert done == [b, a]
    assert committed_shards(out) == {part_name(a), part_name(b)}
    t = pq.read_table(list_parts(out + "/labels"))
    assert t.num_rows == ROWS + 5 + 4
    np.testing.assert_allclose(
        t.column("score").to_numpy(), Logistic4(5, 1, 0, 1)(np.array([0.5]))[0], rtol=1e-6
    )
    assert set(t.column("model_id").to_pylist()) == {"m1"}
    r = pq.read_table(list_parts(out + "/rejects"))
    assert r.column("key").to_pylist() == ["bad"] and r.column("reason").to_pylist() == [
        "not_an_image"
    ]
    assert col.stats["scored"] + col.stats["rejected"] == ROWS + 6 + 4


def test_labeled_rows_keep_their_label_as_score(tmp_path):
    a = write_tar(tmp_path / "a.tar", labeled_members(3))
    job = ScoreJob(shards=[a], out_dir=str(tmp_path / "o"), source="labeled", require_label=True)
    col = ShardCollector(job)
    for batch in batches_for(a, job):
        col.add(batch)
    t = pq.read_table(list_parts(str(tmp_path / "o/labels")))
    assert t.column("score").to_pylist() == t.column("label").to_pylist()
    assert t.column("raw_score").null_count == 3


def test_stream_buffer_is_bounded_by_the_actors_and_the_cpus_not_the_pool():
    face = 448 * 448 * 3 + labeling.MEAN_IMAGE_BYTES
    block = 64 * face  # at 448 px a block is one batch of 64
    # The actors' slack: 1,024 images per actor (633 MB) rather than 4 blocks.
    actors = stream_buffer_bytes(LabelConfig(concurrency=[2, 8]), crop=448, decode_tasks=1)
    assert actors == 8 * 1024 * face
    # The decode tasks: two blocks each, over the 3/8 of the budget Ray Data gives an
    # operator. One H200 node, 15 decode tasks beside one actor: 3.2 GB (a 128 GB node's
    # object store holds 38 GB). The pool's size appears nowhere.
    h200 = stream_buffer_bytes(LabelConfig(concurrency=1), crop=448, decode_tasks=15)
    assert h200 == 8 * 15 * 2 * block // 3
    assert 3.1e9 < h200 < 3.3e9
    # 112 px: blocks of 576 faces, 4 of them per actor (124 MB) rather than 1,024 faces;
    # one decode task's share (166 MB) is more than one actor's.
    small = 576 * (112 * 112 * 3 + labeling.MEAN_IMAGE_BYTES)
    assert stream_buffer_bytes(LabelConfig(concurrency=4), crop=112) == 4 * 4 * small
    assert stream_buffer_bytes(LabelConfig(concurrency=1), crop=112) == 8 * 2 * small // 3
    assert stream_buffer_bytes(LabelConfig(buffer_mb=64), crop=448, decode_tasks=15) == 64 * 2**20


def test_ray_keeps_each_decoded_block_whole_and_alone():
    """Ray Data merges a task's yields up to its target block size and slices at 1.5 times it.

    At its default (128 MB) four 448 px blocks became one of 155 MB, and a running decode
    task, counted as holding two such blocks, left the stream's budget room for one task."""
    for crop, batch in ((448, 64), (112, 64), (224, 256), (352, 32)):
        target = labeling.ray_block_target(crop, batch)
        pixels = rows_per_block(crop, batch) * crop * crop * 3
        assert target < pixels  # every yield (pixels + encoded images) is emitted alone
        assert 1.5 * target > pixels * 1.3  # not sliced unless its JPEGs pass 30 % of pixels
    assert labeling.ray_block_target(None, 64) is None  # no pixels: Ray Data's default
