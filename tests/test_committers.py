"""The shard committers on a real local Ray: a shard is committed by the committer of the
node that staged it, and by another where that node's committer cannot run."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from fiqa.config import ScoringConfig
from fiqa.data.tables import list_parts
from fiqa.scoring import ScoreJob, stream
from fiqa.scoring.commit import ShardLedger
from fiqa.scoring.decode_task import read_and_decode
from fiqa.scoring.engine import Committers
from fiqa.scoring.fragments import write_fragments

from conftest import labeled_members, write_tar

ROWS = 8


@pytest.fixture
def local_ray():
    import ray

    ray.init(num_cpus=1, include_dashboard=False)
    yield ray
    ray.shutdown()


def staged(tmp_path, monkeypatch, names: list[str]):
    """A job whose shards ``names`` (a dozen rows each) are staged, the ledger's view of them."""
    monkeypatch.setattr(stream, "BLOCK_BYTES", 1)  # blocks of one 8-row batch
    shards = [write_tar(tmp_path / f"{n}.tar", labeled_members(ROWS + 4, prefix=n)) for n in names]
    job = ScoreJob(shards=shards, out_dir=str(tmp_path / "out"), source="x", require_label=True,
                   scoring=ScoringConfig(batch_size=ROWS))  # fmt: skip
    ledger, done = ShardLedger(), []
    for url in shards:
        for batch in read_and_decode({"shard": np.array([url], dtype=object)}, job):
            done += ledger.add(write_fragments(batch, job))
    return job, done


def test_each_shard_is_committed_on_the_node_that_staged_it(tmp_path, monkeypatch, local_ray):
    job, done = staged(tmp_path, monkeypatch, ["a", "b"])
    node = local_ray.get_runtime_context().get_node_id()
    assert [d.node for d in done] == [node, node]  # the lines name the staging process's node
    commits = Committers(job)
    for shard in done:
        commits.submit(shard)
    counts = dict(commits.finished(wait=True))
    assert counts == {d.url: {"scored": ROWS + 4, "rejected": 0, "reasons": {}} for d in done}
    assert list(commits.actors) == [node] and not commits.gone  # one committer for the node
    assert pq.read_table(list_parts(job.out_dir + "/labels")).num_rows == 2 * (ROWS + 4)


def test_the_shards_of_a_node_that_is_gone_are_committed_by_another_committer(
    tmp_path, monkeypatch, local_ray
):
    job, done = staged(tmp_path, monkeypatch, list("abcdef"))
    gone = "ab" * 28  # a node id no node of this Ray has: its committer can never be placed
    commits = Committers(job)
    for shard in done:  # 4 sent to the node's committer at once, 2 waiting behind them
        commits.submit(shard._replace(node=gone))
    counts = dict(commits.finished(wait=True))
    assert counts == {d.url: {"scored": ROWS + 4, "rejected": 0, "reasons": {}} for d in done}
    assert commits.gone == {gone}
    assert list(commits.actors) == [local_ray.get_runtime_context().get_node_id()]
    # each shard sent to the lost committer failed there once; the waiting ones never went
    assert sorted(commits.lost.values()) == [1, 1, 1, 1]
