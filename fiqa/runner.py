"""Running stages in order, with manifests that make reruns cheap and resumable.

Each stage writes its outputs in ``run_dir/<stage>/`` and then, last, a
``manifest.json`` (stage, fingerprint, input fingerprints, the stage's summary and
headline, timings in seconds and ISO 8601 UTC, and a fresh ``output_id``). A stage's fingerprint hashes the config sections
it reads, the shards it reads (path, size, mtime or ETag) and the
``output_id`` of every stage it depends on. So on a rerun:

* a stage whose manifest carries the current fingerprint is skipped;
* a stage whose config or inputs changed runs again, and since that gives it
  a new ``output_id``, every stage after it runs again too;
* a stage that was interrupted (no manifest) runs again; partial outputs of
  an attempt with the same fingerprint are kept (shards already committed by
  pseudo-labeling are not redone, training restarts from its last checkpoint),
  those of a different one are removed.

``run_dir`` may be a local directory or an ``s3://`` prefix: all reads and
writes go through `fiqa.storage`, and before any stage starts (and before
Ray) the run directory is checked to be writable, so wrong credentials or a
missing bucket fail in seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import yaml

from fiqa import storage
from fiqa.config import RunConfig
from fiqa.data.shards import expand_shard_spec
from fiqa.data.tables import TABLES_VERSION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], dict]
    sections: tuple[str, ...]  # config sections whose values define the stage
    data: tuple[str, ...] = ()  # data.* keys holding shard specs it reads
    files: tuple[str, ...] = ()  # data.* keys holding optional single files it reads
    after: tuple[str, ...] = ()  # stages whose outputs it reads
    description: str = ""
    headline: Callable[[dict], str] | None = None  # its summary -> the metric `status` shows


class StageContext:
    """What a stage gets: the config and the locations of its own and upstream outputs."""

    def __init__(
        self,
        cfg: RunConfig,
        stage: Stage,
        manifests: dict[str, dict],
        shards: dict[str, list[str]] | None = None,
    ):
        self.cfg = cfg
        self.stage = stage
        self.run_dir = cfg.run_dir
        self.manifests = manifests
        self._shards = shards if shards is not None else {}

    def dir(self, stage: str | None = None) -> str:
        return storage.join(self.run_dir, stage or self.stage.name)

    def shards(self, data_key: str) -> list[str]:
        """The shards of ``data.<data_key>``, as listed when the run started (and fingerprinted)."""
        if data_key not in self._shards:
            spec = getattr(self.cfg.data, data_key)
            self._shards[data_key] = expand_shard_spec(spec, what=f"data.{data_key}")
        return self._shards[data_key]


def iso_time(t: float | None = None) -> str:
    """``2026-12-04T16:59:25Z``: a manifest's times, readable and sortable."""
    when = datetime.fromtimestamp(time.time() if t is None else t, tz=timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def stage_headline(stage: Stage, summary: dict | None) -> str:
    """The stage's headline metric, or "" (none defined, or a summary it cannot read)."""
    if not summary or stage.headline is None:
        return ""
    try:
        return stage.headline(summary)
    except (KeyError, TypeError, ValueError, AttributeError):
        return ""  # a manifest from an older version of the stage


def _stamp(info: dict) -> str:
    """What changes when a file is rewritten: its ETag, else its modification time."""
    return info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""


def _shard_fingerprint(urls: list[str]) -> str:
    h = hashlib.sha256()
    for u, info in zip(urls, storage.infos(urls), strict=True):
        h.update(f"{u}|{info.get('size')}|{_stamp(info)}\n".encode())
    return h.hexdigest()[:16]


def _file_fingerprint(path: str | None) -> str:
    if not path:
        return "absent"
    try:
        info = storage.info(path)
    except FileNotFoundError:
        return "absent"
    return f"{info.get('size')}-{_stamp(info)}"


def list_stage_shards(cfg: RunConfig, stages: list[Stage]) -> dict[str, list[str]]:
    """Each shard spec ``stages`` read, listed once: a missing or empty spec fails here, and
    a stage reads exactly the shards its fingerprint covers (a shard written to the bucket
    meanwhile waits for the next run instead of being labeled unfingerprinted)."""
    keys = dict.fromkeys(k for stage in stages for k in stage.data)
    return {k: expand_shard_spec(getattr(cfg.data, k), what=f"data.{k}") for k in keys}


def stage_fingerprint(
    cfg: RunConfig,
    stage: Stage,
    manifests: dict[str, dict],
    shards: dict[str, list[str]] | None = None,
) -> tuple[str, dict]:
    """The stage's fingerprint and the input fingerprints it was made from."""
    if shards is None:
        shards = list_stage_shards(cfg, [stage])
    inputs = {f"data.{k}": _shard_fingerprint(shards[k]) for k in stage.data}
    inputs.update({f"data.{k}": _file_fingerprint(getattr(cfg.data, k)) for k in stage.files})
    check_upstream(stage, manifests)
    inputs.update({up: manifests[up]["output_id"] for up in stage.after})
    return _digest(cfg, stage, inputs), inputs


def check_upstream(stage: Stage, manifests: dict[str, dict]) -> None:
    for up in stage.after:
        if up not in manifests:
            raise ValueError(f"stage {stage.name} needs stage {up} to have completed first")


def _digest(cfg: RunConfig, stage: Stage, inputs: dict, legacy: bool = False) -> str:
    """The stage's fingerprint; ``legacy``: as earlier versions hashed it (every config key),
    which a manifest or attempt they wrote still carries: accepted too, so none is redone."""
    payload = {
        "stage": stage.name,
        "config": cfg.fingerprint(*stage.sections, legacy=legacy),
        "inputs": inputs,
        "tables": TABLES_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(run_dir: str, stage: str) -> dict | None:
    try:
        return storage.read_json(storage.join(run_dir, stage, "manifest.json"))
    except FileNotFoundError:
        return None


def _prepare_stage_dir(
    path: str, fingerprint: str, fresh: bool = False, legacy: str | None = None
) -> None:
    """Keep a previous attempt's partial outputs only if it had the same fingerprint (or its
    ``legacy`` one, `_digest`).

    The manifest of a previous run of the stage is removed first: from here on
    the stage is uncommitted until `run_stages` writes a new one. ``fresh``
    (a forced rerun of a finished stage) removes every earlier output.
    """
    storage.rm(storage.join(path, "manifest.json"), recursive=False)
    try:
        recorded = storage.read_json(storage.join(path, "attempt.json")).get("fingerprint")
        kept = recorded is not None and recorded in (fingerprint, legacy)
    except (FileNotFoundError, ValueError):
        kept = False
    if (fresh or not kept) and storage.exists(path):
        why = "forced rerun" if fresh else "an earlier attempt with another fingerprint"
        log.info("removing the outputs of %s: %s", why, path)
        storage.rm(path)
    # (this write creates a local stage directory)
    storage.write_json(
        storage.join(path, "attempt.json"), {"fingerprint": fingerprint, "started_at": iso_time()}
    )


def save_run_config(cfg: RunConfig) -> None:
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    storage.write_text(storage.join(cfg.run_dir, "config.yaml"), text)


def run_stages(
    cfg: RunConfig,
    stages: list[Stage],
    only: str | None = None,
    force: bool = False,
    on_start: Callable[[], None] | None = None,
    until: str | None = None,
) -> dict[str, str]:
    """Run ``stages`` in order (just ``only``, or those up to and including ``until``);
    returns each stage's outcome."""
    if "://" not in cfg.run_dir:  # Ray workers run elsewhere than the driver's working directory
        cfg = dataclasses.replace(cfg, run_dir=os.path.abspath(cfg.run_dir))
    else:
        cfg = dataclasses.replace(cfg, run_dir=cfg.run_dir.rstrip("/"))
    names = [s.name for s in stages]
    for name in (only, until):
        if name is not None and name not in names:
            raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(names)}")
    total = len(stages)  # "[i/total]": a stage's place in the whole recipe
    if until is not None:
        stages = stages[: names.index(until) + 1]
    storage.configure(cfg.storage)
    # Fail fast, before Ray starts: wrong credentials or a missing bucket are an
    # error in seconds, not after the first stage.
    storage.check_writable(cfg.run_dir)
    # Fail fast: every shard spec a selected stage reads must name shards now,
    # not after an hour of training.
    shards = list_stage_shards(cfg, [s for s in stages if only is None or s.name == only])
    manifests = {s.name: m for s in stages if (m := read_manifest(cfg.run_dir, s.name))}
    if only is not None:
        check_upstream(next(s for s in stages if s.name == only), manifests)
    save_run_config(cfg)  # (after the checks: a run refused keeps the run's config as it was)
    outcome: dict[str, str] = {}
    started = False
    for i, stage in enumerate(stages):
        if only is not None and stage.name != only:
            continue
        fp, inputs = stage_fingerprint(cfg, stage, manifests, shards)
        legacy = _digest(cfg, stage, inputs, legacy=True)
        current = manifests.get(stage.name)
        if current and current.get("fingerprint") == legacy != fp:
            current = {**current, "fingerprint": fp}  # recorded as this version hashes it
            storage.write_json(storage.join(cfg.run_dir, stage.name, "manifest.json"), current)
            manifests[stage.name] = current
        if current and current.get("fingerprint") == fp and not (force and only):
            log.info("[%d/%d] %s: up to date, skipped", i + 1, total, stage.name)
            outcome[stage.name] = "skipped"
            continue
        if not started and on_start:
            on_start()
            started = True
        log.info("[%d/%d] %s: %s", i + 1, total, stage.name, stage.description)
        path = storage.join(cfg.run_dir, stage.name)
        finished = bool(current) and current.get("fingerprint") == fp
        _prepare_stage_dir(path, fp, fresh=finished, legacy=legacy)  # (fresh: a forced rerun)
        t0 = time.time()
        summary = stage.run(StageContext(cfg, stage, manifests, shards))
        seconds = time.time() - t0
        manifest = {
            "stage": stage.name,
            "fingerprint": fp,
            "config_fingerprint": cfg.fingerprint(*stage.sections),
            "inputs": inputs,
            "summary": summary,  # what the stage returned: its counts, models, metrics
            "headline": stage_headline(stage, summary),
            "seconds": round(seconds, 2),
            "started_at": iso_time(t0),
            "finished_at": iso_time(),
            "output_id": uuid.uuid4().hex,
        }
        storage.write_json(storage.join(path, "manifest.json"), manifest)  # the commit
        manifests[stage.name] = manifest
        outcome[stage.name] = "ran"
        done = f"[{i + 1}/{total}] {stage.name}: done in {seconds:.1f} s"
        log.info(done + (f": {manifest['headline']}" if manifest["headline"] else ""))
    return outcome


def stage_states(cfg: RunConfig, stages: list[Stage]) -> list[dict]:
    """For each stage: done, stale (its config or inputs changed), partial, or pending."""
    manifests = {s.name: m for s in stages if (m := read_manifest(cfg.run_dir, s.name))}
    rows = []
    states: dict[str, str] = {}
    for stage in stages:
        m = manifests.get(stage.name)
        try:
            fp, inputs = stage_fingerprint(cfg, stage, manifests)
            same = bool(m) and m.get("fingerprint") in (fp, _digest(cfg, stage, inputs, True))
        except Exception:
            same = False
        # An upstream stage a run would redo gives this one new inputs: it is redone too.
        upstream_done = all(states.get(up, "done") == "done" for up in stage.after)
        if m and same and upstream_done:
            state = "done"
        elif m:
            state = "stale"
        elif storage.exists(storage.join(cfg.run_dir, stage.name)):
            state = "partial"
        else:
            state = "pending"
        states[stage.name] = state
        summary = (m.get("summary", m.get("counts")) if m else None) or None
        rows.append(
            {
                "stage": stage.name,
                "state": state,
                "seconds": m.get("seconds") if m else None,
                "finished_at": m.get("finished_at") if m else None,
                "headline": (m.get("headline") or stage_headline(stage, summary)) if m else "",
                "summary": summary,
            }
        )
    return rows


def load_run_config(run_dir: str, overrides: list[str] | None = None) -> RunConfig:
    """The config a run was last started with, read from ``run_dir`` (local or s3://).

    ``storage.*`` overrides (``--set storage.endpoint_url=...``) apply before
    the file is read, since they may be needed to reach it.
    """
    from fiqa.config import StorageConfig, _build, apply_overrides, from_dict

    boot = apply_overrides({}, [o for o in overrides or [] if o.startswith("storage.")])
    storage.configure(_build(StorageConfig, boot.get("storage", {}), "storage"))
    storage.check_reachable(run_dir)
    try:
        text = storage.read_text(storage.join(run_dir, "config.yaml"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_dir!r} is not a run directory (no config.yaml)") from None
    cfg = from_dict(yaml.safe_load(text), overrides)
    storage.configure(cfg.storage)
    return cfg
