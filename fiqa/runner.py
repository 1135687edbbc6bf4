"""Running stages in order, with manifests that make reruns cheap and resumable.

Each stage writes its outputs in ``run_dir/<stage>/`` and then, last, a
``manifest.json`` (stage, fingerprint, input fingerprints, counts, timings,
and a fresh ``output_id``). A stage's fingerprint hashes the config sections
it reads, the shards it reads (path, size, mtime or ETag) and the
``output_id`` of every stage it depends on. So on a rerun:

* a stage whose manifest carries the current fingerprint is skipped;
* a stage whose config or inputs changed runs again, and since that gives it
  a new ``output_id``, every stage after it runs again too;
* a stage that was interrupted (no manifest) runs again; partial outputs of
  an attempt with the same fingerprint are kept (shards already committed by
  pseudo-labeling are not redone), those of a different one are removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fsspec
import yaml

from fiqa.config import RunConfig
from fiqa.data.shards import expand_shard_spec, filesystem_for

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


class StageContext:
    """What a stage gets: the config and the locations of its own and upstream outputs."""

    def __init__(self, cfg: RunConfig, stage: Stage, manifests: dict[str, dict]):
        self.cfg = cfg
        self.stage = stage
        self.run_dir = cfg.run_dir
        self.manifests = manifests

    def dir(self, stage: str | None = None) -> str:
        return os.path.join(self.run_dir, stage or self.stage.name)

    def shards(self, data_key: str) -> list[str]:
        return expand_shard_spec(getattr(self.cfg.data, data_key))


def _shard_fingerprint(urls: list[str]) -> str:
    h = hashlib.sha256()
    for u in urls:
        info = filesystem_for(u).info(u)
        stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
        h.update(f"{u}|{info.get('size')}|{stamp}\n".encode())
    return h.hexdigest()[:16]


def _file_fingerprint(path: str | None) -> str:
    if not path or not os.path.exists(path):
        return "absent"
    st = os.stat(path)
    return f"{st.st_size}-{st.st_mtime_ns}"


def stage_fingerprint(cfg: RunConfig, stage: Stage, manifests: dict[str, dict]) -> tuple[str, dict]:
    """The stage's fingerprint and the input fingerprints it was made from."""
    inputs = {
        f"data.{k}": _shard_fingerprint(expand_shard_spec(getattr(cfg.data, k))) for k in stage.data
    }
    inputs.update({f"data.{k}": _file_fingerprint(getattr(cfg.data, k)) for k in stage.files})
    for up in stage.after:
        if up not in manifests:
            raise ValueError(f"stage {stage.name} needs stage {up} to have completed first")
        inputs[up] = manifests[up]["output_id"]
    payload = {"stage": stage.name, "config": cfg.fingerprint(*stage.sections), "inputs": inputs}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return digest, inputs


def read_manifest(run_dir: str, stage: str) -> dict | None:
    path = os.path.join(run_dir, stage, "manifest.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def _prepare_stage_dir(path: str, fingerprint: str) -> None:
    """Keep a previous attempt's partial outputs only if it had the same fingerprint."""
    attempt = os.path.join(path, "attempt.json")
    if os.path.isdir(path):
        try:
            with open(attempt) as f:
                same = json.load(f).get("fingerprint") == fingerprint
        except (FileNotFoundError, ValueError):
            same = False
        if not same:
            shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    _write_json(attempt, {"fingerprint": fingerprint, "started_at": time.time()})
    stale = os.path.join(path, "manifest.json")
    if os.path.exists(stale):
        os.remove(stale)


def save_run_config(cfg: RunConfig) -> None:
    os.makedirs(cfg.run_dir, exist_ok=True)
    path = os.path.join(cfg.run_dir, "config.yaml")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)


def run_stages(
    cfg: RunConfig,
    stages: list[Stage],
    only: str | None = None,
    force: bool = False,
    on_start: Callable[[], None] | None = None,
) -> dict[str, str]:
    """Run ``stages`` in order (or just ``only``); returns each stage's outcome."""
    if "://" not in cfg.run_dir:  # Ray workers run elsewhere than the driver's working directory
        cfg = dataclasses.replace(cfg, run_dir=os.path.abspath(cfg.run_dir))
    save_run_config(cfg)
    names = [s.name for s in stages]
    if only is not None and only not in names:
        raise ValueError(f"unknown stage {only!r}; stages are: {', '.join(names)}")
    # Fail fast: every shard spec a selected stage reads must name shards now,
    # not after an hour of training.
    for stage in stages:
        if only is None or stage.name == only:
            for key in stage.data:
                expand_shard_spec(getattr(cfg.data, key))
    manifests = {s.name: m for s in stages if (m := read_manifest(cfg.run_dir, s.name))}
    outcome: dict[str, str] = {}
    started = False
    for i, stage in enumerate(stages):
        if only is not None and stage.name != only:
            continue
        fp, inputs = stage_fingerprint(cfg, stage, manifests)
        current = manifests.get(stage.name)
        if current and current.get("fingerprint") == fp and not (force and only):
            log.info("[%d/%d] %s: up to date, skipped", i + 1, len(stages), stage.name)
            outcome[stage.name] = "skipped"
            continue
        if not started and on_start:
            on_start()
            started = True
        log.info("[%d/%d] %s: %s", i + 1, len(stages), stage.name, stage.description)
        path = os.path.join(cfg.run_dir, stage.name)
        _prepare_stage_dir(path, fp)
        t0 = time.time()
        counts = stage.run(StageContext(cfg, stage, manifests))
        seconds = time.time() - t0
        manifest = {
            "stage": stage.name,
            "fingerprint": fp,
            "config_fingerprint": cfg.fingerprint(*stage.sections),
            "inputs": inputs,
            "counts": counts,
            "seconds": round(seconds, 2),
            "finished_at": time.time(),
            "output_id": uuid.uuid4().hex,
        }
        _write_json(os.path.join(path, "manifest.json"), manifest)
        manifests[stage.name] = manifest
        outcome[stage.name] = "ran"
        log.info("[%d/%d] %s: done in %.1f s", i + 1, len(stages), stage.name, seconds)
    return outcome


def stage_states(cfg: RunConfig, stages: list[Stage]) -> list[dict]:
    """For each stage: done, stale (its config or inputs changed), partial, or pending."""
    manifests = {s.name: m for s in stages if (m := read_manifest(cfg.run_dir, s.name))}
    rows = []
    for stage in stages:
        m = manifests.get(stage.name)
        path = Path(cfg.run_dir, stage.name)
        try:
            fp, _ = stage_fingerprint(cfg, stage, manifests)
        except Exception:
            fp = None
        if m and m.get("fingerprint") == fp:
            state = "done"
        elif m:
            state = "stale"
        elif path.exists():
            state = "partial"
        else:
            state = "pending"
        rows.append(
            {
                "stage": stage.name,
                "state": state,
                "seconds": m.get("seconds") if m else None,
                "counts": m.get("counts") if m else None,
            }
        )
    return rows


def load_run_config(run_dir: str) -> RunConfig:
    from fiqa.config import from_dict

    path = os.path.join(run_dir, "config.yaml")
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        raise FileNotFoundError(f"{run_dir!r} is not a run directory (no config.yaml)")
    with fs.open(root) as f:
        return from_dict(yaml.safe_load(f.read()))
