"""The per-shard logic of the scoring engine, without a cluster."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from fiqa.calibration import Logistic4
from fiqa.config import ScoringConfig
from fiqa.data.tables import list_parts, part_name
from fiqa.scoring import ScoreJob, stream
from fiqa.scoring.commit import ShardLedger, commit_shard, committed_shards
from fiqa.scoring.decode_task import read_and_decode, to_batch
from fiqa.scoring.fragments import staging_dir, write_fragments
from fiqa.scoring.stream import rows_per_block, stream_buffer_bytes

from conftest import labeled_members, write_tar

ROWS = 8  # rows per decoded block in these tests: one scoring batch of 8


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of one 8-row batch, so that a shard of a dozen samples spans several."""
    monkeypatch.setattr(stream, "BLOCK_BYTES", 1)
    return ScoringConfig(batch_size=ROWS)


def batches_for(shard, job):
    return list(read_and_decode({"shard": np.array([shard], dtype=object)}, job))


def test_blocks_hold_whole_batches_within_their_byte_budget():
    face = 112 * 112 * 3 + stream.MEAN_IMAGE_BYTES
    assert rows_per_block(112, 64) == 576  # 9 batches of 64: 31 MB, the 10th would pass 32 MB
    assert 576 * face <= stream.BLOCK_BYTES < 640 * face
    assert rows_per_block(448, 64) == 64  # one batch is 40 MB already: a block is one batch
    assert rows_per_block(448, 16) == 48
    assert rows_per_block(None, 64) == 2048  # no pixels (ingest): the encoded images only
    assert rows_per_block(112, 1) == 621


def test_read_and_decode_marks_the_shards_last_row_with_its_total(tmp_path, small_blocks):
    n = ROWS + 3
    shard = write_tar(tmp_path / "a.tar", labeled_members(n))
    job = ScoreJob(
        shards=[shard],
        out_dir=str(tmp_path / "out"),
        source="x",
        model_path="m",
        crop=32,
        resize=40,
        scoring=small_blocks,
    )
    batches = batches_for(shard, job)
    assert [len(b["key"]) for b in batches] == [ROWS, 3]
    assert (batches[0]["shard_total"] == -1).all()
    assert list(batches[-1]["shard_total"]) == [-1, -1, n]
    assert batches[0]["pixels"].shape == (ROWS, 32, 32, 3)


def test_last_batch_is_never_empty(tmp_path, small_blocks):
    shard = write_tar(tmp_path / "a.tar", labeled_members(ROWS))
    job = ScoreJob(shards=[shard], out_dir=str(tmp_path / "o"), source="x", scoring=small_blocks)
    (batch,) = batches_for(shard, job)
    assert batch["shard_total"][-1] == ROWS and "pixels" not in batch  # no model: no pixels


def test_a_task_fills_its_blocks_across_its_shards(tmp_path, small_blocks):
    """Shards read in turn into full blocks (Ray Data would merge a short one into the next):
    each shard's rows numbered from 0, its last row carrying its total; an empty tar and an
    unreadable shard each leave a row of their own."""
    import tarfile

    a = write_tar(tmp_path / "a.tar", labeled_members(5))
    b = write_tar(tmp_path / "b.tar", labeled_members(ROWS + 2, prefix="b"))
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar" * 100)
    urls = [a, b, str(empty), str(junk)]
    job = ScoreJob(shards=urls, out_dir=str(tmp_path / "o"), source="x", scoring=small_blocks)
    batches = list(read_and_decode({"shard": np.array(urls, dtype=object)}, job))
    assert [len(x["key"]) for x in batches] == [ROWS, ROWS, 1]  # 5 + 10 + 1 + 1 rows
    col = {k: np.concatenate([x[k] for x in batches]) for k in ("shard", "row", "shard_total")}
    for url, n in zip(urls, (5, ROWS + 2, 1, 1), strict=True):
        mine = col["shard"] == url
        assert list(col["row"][mine]) == list(range(n))
        assert list(col["shard_total"][mine]) == [-1] * (n - 1) + [n]
    ledger = ShardLedger()
    done = [u for x in batches for u, *_ in ledger.add(write_fragments(x, job))]
    assert done == urls and not ledger.open_shards


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
        scoring=small_blocks,
    )
    ledger = ShardLedger()
    stream = batches_for(a, job) + batches_for(b, job)
    stream = [stream[0], stream[2], stream[1]]  # shards interleave in any order
    done, counts = [], []
    for batch in stream:
        batch["raw_score"] = np.where(batch["reason"] == "", 0.5, np.nan)
        batch["mos"][:] = np.nan  # as for an unlabeled pool
        for url, total, _ in ledger.add(write_fragments(batch, job)):
            done.append(url)
            counts.append(commit_shard(job, url, total))
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
    assert counts[1] == {"scored": ROWS + 5, "rejected": 1, "reasons": {"not_an_image": 1}}
    assert sum(c["scored"] + c["rejected"] for c in counts) == ROWS + 6 + 4


def test_a_commit_retried_after_it_committed_reports_the_shard_again(tmp_path, small_blocks):
    # Ray retries a commit task whose node died; the lost attempt may have written both parts
    # and removed some or all of the staged fragments before the node went.
    a = write_tar(tmp_path / "a.tar", labeled_members(ROWS) + [("bad.jpg", b"junk")])
    out = str(tmp_path / "out")
    job = ScoreJob(shards=[a], out_dir=out, source="x", require_label=True, scoring=small_blocks)
    ledger = ShardLedger()
    (done,) = [d for batch in batches_for(a, job) for d in ledger.add(write_fragments(batch, job))]
    staged = list_parts(staging_dir(job, a))
    kept = {p: open(p, "rb").read() for p in staged[:1]}  # the removal got past the others
    first = commit_shard(job, done.url, done.total)
    for p, data in kept.items():
        os.makedirs(os.path.dirname(p), exist_ok=True)
        open(p, "wb").write(data)
    before = pq.read_table(list_parts(out + "/labels"))
    assert commit_shard(job, done.url, done.total) == first == {
        "scored": ROWS, "rejected": 1, "reasons": {"no_label": 1}
    }  # fmt: skip
    assert commit_shard(job, done.url, done.total) == first  # nothing staged at all any more
    assert pq.read_table(list_parts(out + "/labels")).equals(before)
    assert not list_parts(staging_dir(job, a))


def test_a_commit_whose_fragments_vanish_reports_the_shard_another_attempt_committed(
    tmp_path, small_blocks, monkeypatch
):
    # A committer taken for lost may still run: a second attempt finds no parts yet, then
    # finds the fragments gone, which the first removes only after writing both parts.
    from fiqa import storage

    a = write_tar(tmp_path / "a.tar", labeled_members(ROWS) + [("bad.jpg", b"junk")])
    job = ScoreJob(shards=[a], out_dir=str(tmp_path / "out"), source="x", require_label=True,
                   scoring=small_blocks)  # fmt: skip
    ledger = ShardLedger()
    (done,) = [d for batch in batches_for(a, job) for d in ledger.add(write_fragments(batch, job))]
    staged = list_parts(staging_dir(job, a))
    kept = {p: open(p, "rb").read() for p in staged[:1]}
    first = commit_shard(job, done.url, done.total)
    exists, asked = storage.exists, []

    def before_the_first_wrote(path):
        asked.append(path)
        return len(asked) > 1 and exists(path)

    monkeypatch.setattr(storage, "exists", before_the_first_wrote)
    assert commit_shard(job, done.url, done.total) == first  # nothing left staged
    for p, data in kept.items():  # one fragment left: the first attempt's removal under way
        os.makedirs(os.path.dirname(p), exist_ok=True)
        open(p, "wb").write(data)
    asked.clear()
    assert commit_shard(job, done.url, done.total) == first
    monkeypatch.setattr(storage, "exists", lambda path: False)  # and never committed: an error
    with pytest.raises(RuntimeError, match="distinct rows staged"):
        commit_shard(job, done.url, done.total)


def test_labeled_rows_keep_their_label_as_score(tmp_path):
    a = write_tar(tmp_path / "a.tar", labeled_members(3))
    job = ScoreJob(shards=[a], out_dir=str(tmp_path / "o"), source="labeled", require_label=True)
    ledger = ShardLedger()
    for batch in batches_for(a, job):
        for url, total, _ in ledger.add(write_fragments(batch, job)):
            commit_shard(job, url, total)
    t = pq.read_table(list_parts(str(tmp_path / "o/labels")))
    assert t.column("score").to_pylist() == t.column("mos").to_pylist()
    assert t.column("raw_score").null_count == 3


def test_stream_buffer_is_bounded_by_the_actors_and_the_cpus_not_the_pool():
    face = 448 * 448 * 3 + stream.MEAN_IMAGE_BYTES
    block = 64 * face  # at 448 px a block is one batch of 64

    def buffer(cfg, crop, decode_tasks, actors):
        return stream_buffer_bytes(cfg, crop, decode_tasks=decode_tasks, actors=actors)

    # The actors' slack: 1,024 images per actor (633 MB) rather than 4 blocks.
    assert buffer(ScoringConfig(concurrency=[2, 8]), 448, 1, 8) == 8 * 1024 * face
    # The decode tasks: 16/3 blocks each. One H200 node, 15 decode tasks beside one actor:
    # 3.2 GB (a 128 GB node's object store holds 38 GB). The pool's size appears nowhere.
    h200 = buffer(ScoringConfig(), 448, 15, 1)
    assert h200 == 8 * 15 * 2 * block // 3
    assert 3.1e9 < h200 < 3.3e9
    # 112 px: blocks of 576 faces, 4 of them per actor (124 MB) rather than 1,024 faces;
    # on 2 cores one decode task's 166 MB is more than one actor's.
    small = 576 * (112 * 112 * 3 + stream.MEAN_IMAGE_BYTES)
    assert buffer(ScoringConfig(concurrency=4), 112, 1, 4) == 4 * 4 * small
    assert buffer(ScoringConfig(), 112, 1, 1) == 8 * 2 * small // 3
    # Ingest (no model, no actors): the decode tasks' share alone.
    encoded = 2048 * stream.MEAN_IMAGE_BYTES
    assert buffer(ScoringConfig(concurrency=4), 0, 2, 0) == 8 * 2 * 2 * encoded // 3
    assert buffer(ScoringConfig(buffer_mb=64), 448, 15, 1) == 64 * 2**20


@pytest.mark.parametrize(
    "crop, batch, jpeg_kb, probed_kb",
    [
        (448, 64, 30, 30),
        (448, 64, 250, 250),
        (352, 64, 150, 150),
        (224, 256, 60, 60),
        (112, 64, 8, 8),
        (112, 64, 60, 60),
        (112, 256, 8, 4),  # images twice the probe's size
        (112, 256, 8, 16),  # half its size
        (0, 64, 16, 14),  # actor-decoding: encoded images only, 14 % over the probe
    ],
)
def test_ray_data_passes_each_decoded_block_on_as_it_was_yielded(crop, batch, jpeg_kb, probed_kb):
    """Through Ray Data's own output buffer, at the target the stream sets: a decode task's
    blocks (here three, as of its shards in turn) are neither merged (at Ray Data's 128 MB
    default four 448 px blocks became one, and a task's shards reached the actors together
    when it ended) nor sliced, when the images are within 20 % of the probed size in a block."""
    from ray.data._internal.output_buffer import BlockOutputBuffer, OutputBlockSizeOption

    rows = rows_per_block(crop, batch)
    target = stream.ray_block_target(crop, batch, stream.Sources(probed_kb * 1024))
    out = BlockOutputBuffer(OutputBlockSizeOption(target))
    sizes = []
    recs = [
        {
            "key": f"k{i}",
            "shard": "s.tar",
            "image": b"j" * (jpeg_kb * 1024),
            "mos": None,
            "reason": None,
            "pixels": np.zeros((crop, crop, 3), np.uint8),
        }
        for i in range(rows)
    ]
    # crop 0: the blocks of actor-decoding, encoded images only (here without a model)
    job = ScoreJob(shards=[], out_dir="", source="x", model_path="m" if crop else None, crop=crop)
    for _ in range(3):  # three blocks in turn, as `read_and_decode` yields them
        out.add_batch(to_batch(recs, -1, job))
        while out.has_next():
            sizes.append(out.next().num_rows)
    out.finalize()
    while out.has_next():
        sizes.append(out.next().num_rows)
    assert sizes == [rows] * 3


def test_a_decode_task_reads_several_shards_while_each_slot_keeps_several_tasks():
    assert stream.shards_per_task(3, 1) == 1  # a handful of shards: one a task, as ever
    assert stream.shards_per_task(80, 1) == 8  # at most 8 a task
    assert stream.shards_per_task(80, 4) == 5  # 16 tasks for 4 slots
    assert stream.shards_per_task(100_000, 15) == 8
    assert stream.shards_per_task(10, 0) == 2


def test_decode_tasks_grow_from_one_shard_at_the_start_and_shrink_to_one_at_the_end():
    urls = [f"s{i:02d}" for i in range(40)]
    groups = stream.task_groups(urls, per_task=8, decode_tasks=2)
    assert [len(g) for g in groups] == [1, 1, 2, 2, 4, 4, 8, 4, 4, 4, 2, 2, 1, 1]
    assert [u for g in groups for u in g] == urls  # every shard once, in order
    assert stream.task_groups(urls[:3], per_task=1, decode_tasks=4) == [["s00"], ["s01"], ["s02"]]
    one_slot = stream.task_groups(urls, per_task=3, decode_tasks=0)
    assert [len(g) for g in one_slot] == [1, 2, *[3] * 11, 1, 2, 1]
    few = stream.task_groups(urls[:5], per_task=8, decode_tasks=2)  # too few for both ramps
    assert [len(g) for g in few] == [1, 1, 1, 1, 1]
    assert stream.task_groups([], per_task=8, decode_tasks=2) == []
