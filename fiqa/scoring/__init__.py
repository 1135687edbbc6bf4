"""The scoring engine: shards in, Parquet tables out, on Ray Data.

One engine serves pseudo-labeling, evaluation, the ingest of labeled shards and
`fiqa label`. Every sample of every shard comes out either in the scored table
(``labels/``) or in the rejects table (``rejects/``), with a reason.

- `job`: what to score (`ScoreJob`, `job_for_model`);
- `decode_task`: the CPU task that reads a shard and decodes its images;
- `scorer`: the actor that holds the model;
- `fragments`: each scored batch staged where it was scored (the actor, `ScoreThenWrite`);
- `commit`: the driver's count of staged rows per shard, the commit task, resume;
- `unique_keys`: keys scored in several shards, found exactly and kept in one;
- `stream`: block sizes and the object-store bound of the stream;
- `engine`: `run_score_job`, which wires them on Ray Data.
"""

from fiqa.scoring.engine import run_score_job
from fiqa.scoring.job import ScoreJob, job_for_model

__all__ = ["ScoreJob", "job_for_model", "run_score_job"]
