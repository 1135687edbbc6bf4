"""The shape of a scoring stream: rows per decoded block, Ray Data's block target, and the
object-store bound that keeps memory flat however large the pool.

The figures behind each rule are in benchmarks/RESULTS.md (label_throughput, decode_admission).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

from fiqa.config import ScoringConfig

# Bytes, not rows: a block of 448 px faces would otherwise be 16x one of 112 px faces, and
# larger blocks cost the actor less Ray Data overhead per image. Not larger: at 128 MB the
# driver spends a third of the CPU per row, but Ray Data's backpressure, counted in bytes,
# then stalls decoding behind scoring (benchmarks/RESULTS.md, "Blocks of 128 MB").
BLOCK_BYTES = 32 * 2**20
MEAN_IMAGE_BYTES = 16_384  # an encoded face, for sizing blocks before any is read
BUFFER_ROWS_PER_ACTOR = 1024  # decoded images the stream may hold per actor, at least


@dataclass(frozen=True)
class Sources:
    """What a pool's first images say about it (`fiqa.scoring.decode_task.probe_sources`)."""

    mean_image_bytes: int = MEAN_IMAGE_BYTES
    max_pixels: int = 0  # width x height of the largest


def rows_per_block(crop: int | None, batch_size: int) -> int:
    """Rows of one decoded block: whole scoring batches, as many as fit in ``BLOCK_BYTES``
    and at least one (``crop`` None or 0: no pixels, the encoded images only)."""
    row = (crop or 0) ** 2 * 3 + MEAN_IMAGE_BYTES
    return max(1, BLOCK_BYTES // (row * batch_size)) * batch_size


# Ray Data merges a map task's outputs until they pass its target block size and slices one
# of 1.5 targets or more: a target of 0.8 of a block passes every block whose size is within
# 20 % of the plan's on as its own, neither merged with the next nor sliced.
TARGET_OF_BLOCK = 0.8
ROW_BYTES = 128  # a row's other columns: key, shard, row, mos, reason, shard_total


def ray_block_target(crop: int | None, batch_size: int, sources: Sources) -> int:
    """Ray Data's ``target_max_block_size`` for a stream whose decode tasks yield blocks of
    `rows_per_block` rows of ``crop`` px (and their encoded images, ``sources``' mean size).

    At its 128 MB default Ray Data would merge a task's blocks: its shards would reach the
    actors only when it ends, in blocks larger than the stream's object store was sized for."""
    row = (crop or 0) ** 2 * 3 + sources.mean_image_bytes + ROW_BYTES
    return int(TARGET_OF_BLOCK * rows_per_block(crop, batch_size) * row)


# Ray Data's executor spends the driver's CPU per task far more than per block
# (benchmarks/executor_cost.py), so a decode task reads several shards in turn, as long as
# each decode slot keeps several tasks to balance the stream's end.
MAX_SHARDS_PER_TASK = 8
TASKS_PER_SLOT = 4


def shards_per_task(shards: int, decode_tasks: int) -> int:
    """Shards one decode task reads, for ``shards`` over ``decode_tasks`` slots at once."""
    return max(1, min(MAX_SHARDS_PER_TASK, shards // (TASKS_PER_SLOT * max(1, decode_tasks))))


def task_groups(shards: list[str], per_task: int, decode_tasks: int) -> list[list[str]]:
    """The shards of each decode task in turn: ``per_task`` a task, but the stream opens and
    closes with waves of ``decode_tasks`` tasks of 1, 2, 4, ... shards. A block of several
    shards fills only as fast as one task decodes: small tasks first hand the actors rows
    after one shard, and small tasks last leave them one shard to score after decoding ends."""
    slots, k = max(1, decode_tasks), max(1, per_task)
    ramp, size = [], 1
    while size < k:
        ramp += [size] * slots
        size *= 2
    head, tail, left = [], [], len(shards)
    for size in ramp:
        for side in (head, tail):
            if left:
                side.append(min(size, left))
                left -= side[-1]
    sizes = head + [k] * (left // k) + ([left % k] if left % k else []) + tail[::-1]
    starts = [0, *itertools.accumulate(sizes)]
    return [shards[a:b] for a, b in itertools.pairwise(starts)]


def stream_buffer_bytes(cfg: ScoringConfig, crop: int, *, decode_tasks: int, actors: int) -> int:
    """Object store a scoring stream may hold: ``cfg.buffer_mb``, or what the actors or the
    decode tasks need to run at full speed, whichever is more.

    Per actor: 4 decoded blocks or 1,024 images, whichever is more (a fast GPU's slack when
    a block is one batch of large images). Per decode task: 16/3 blocks, because Ray Data
    admits a task only while its operator's share of the budget covers two blocks for every
    task running, and that share is about 3/8 of the budget.
    """
    if cfg.buffer_mb is not None:
        return cfg.buffer_mb * 2**20
    row = crop * crop * 3 + MEAN_IMAGE_BYTES
    rows = rows_per_block(crop, cfg.batch_size)
    per_actor = max(4 * rows, BUFFER_ROWS_PER_ACTOR) * row
    decoding = 16 * max(1, decode_tasks) * rows * row // 3
    return max(actors * per_actor, decoding)


# A decode task's own process (Python, numpy, pyarrow, PIL, Ray's worker), measured at 200 to
# 270 MiB USS; and the copies of a block it holds at its peak: the block being filled, its
# Arrow form, and its serialised form in the object store until the next operator maps it.
DECODE_TASK_BASE_BYTES = 256 * 2**20
DECODE_TASK_BLOCK_COPIES = 3


def decode_task_memory(crop: int, block_rows: int, sources: Sources) -> int:
    """Bytes a decode task holds at its peak: its process, three copies of a block (pixels
    when it decodes, ``crop`` 0 when the actors do, and the encoded images either way), and
    the largest source image decoded at full size, in RGB, twice (decoded and converted)."""
    block = block_rows * (crop * crop * 3 + sources.mean_image_bytes)
    return DECODE_TASK_BASE_BYTES + DECODE_TASK_BLOCK_COPIES * block + 6 * sources.max_pixels


@dataclass(frozen=True)
class StreamPlan:
    """What a scoring stream was sized for; the engine logs it."""

    buffer_bytes: int
    cap_bytes: int  # Ray Data never lets a stream use more than this share of the object store
    actors: int
    decode_tasks: int
    block_rows: int
    target_block_bytes: int | None  # Ray Data's block target (None: its default)
    shards_per_task: int  # shards each decode task reads
    decode_memory_bytes: int  # each decode task's reservation (Ray's logical memory)

    def as_dict(self) -> dict:
        return asdict(self)


def plan_stream(
    cfg: ScoringConfig,
    crop: int,
    *,
    actors: int,
    decode_tasks: int,
    object_store: float,
    cap_fraction: float,
    sources: Sources = Sources(),
    shards: int = 1,
    with_model: bool = True,
) -> StreamPlan:
    """The plan for a stream of ``shards`` shards of ``crop`` px pixels (0: no pixels: no
    model, or the actors decode); each decode task reserves ``cfg.decode_memory_mb``, or
    `decode_task_memory`. Without a model (ingest) the decode tasks stage their own rows and
    pass on a line a fragment: one shard a task, and Ray Data's default target."""
    rows = rows_per_block(crop, cfg.batch_size)
    memory = cfg.decode_memory_mb * 2**20 if cfg.decode_memory_mb else None
    return StreamPlan(
        buffer_bytes=stream_buffer_bytes(cfg, crop, decode_tasks=decode_tasks, actors=actors),
        cap_bytes=int(object_store * cap_fraction),
        actors=actors,
        decode_tasks=decode_tasks,
        block_rows=rows,
        target_block_bytes=ray_block_target(crop, cfg.batch_size, sources) if with_model else None,
        shards_per_task=shards_per_task(shards, decode_tasks) if with_model else 1,
        decode_memory_bytes=memory or decode_task_memory(crop, rows, sources),
    )
