"""The chaos table: faults injected into the recipe's stages on a 3-node Ray cluster, and what
each costs.

    python benchmarks/chaos.py                          # every fault, a table, about 15 min
    python benchmarks/chaos.py --faults actor_kills,s3_outage_commits --json chaos.json

The cluster is the tests' (`tests/ray_cluster.py`): a head with no CPUs of its own and the
Jobs API, and worker nodes of 2 CPUs each, separate raylets on 127.0.0.1; run data and
``run_dir`` live in the tests' S3 server (moto, on 127.0.0.1), since nodes share no disk.
Stages are submitted as users submit them (``fiqa submit --stage``). Each fault is injected
at a moment read off the run's own progress (committed parts, checkpoints in the bucket),
then the stage is left to finish, or rerun where the fault ended the job (the driver's
death). Every labeling run is checked key by key against the pool's shards; every training
run by its history and by loading each checkpoint it left. A clean run of the same stage,
measured in the same session, gives the fault's extra seconds.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from harness import DECODE_TASK, ray_task_processes, scratch

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))  # the test bed: the cluster, the S3 server, the tiny config

from ray_cluster import LocalCluster  # noqa: E402
from s3_server import S3Server, clean_env  # noqa: E402

from conftest import fiqa_cmd, reshard, tiny_config  # noqa: E402

U1_IMAGES, SHARD_SIZE = 768, 16  # 48 small shards: faults land between commits
TP_EPOCHS = 4
SCORING_ACTOR = "MapWorker(MapBatches(ScoreThenWrite))"  # its process title, after "ray::"
OUTAGE_S = 10.0


@dataclass
class Fault:
    name: str
    stage: str  # pseudo_label_1 or train_teacher_plus
    what: str  # the table's words for it
    inject: Callable[[Chaos, Submission], str]  # does it; returns when it happened, in words
    ends_job: bool = False  # the fault kills the job itself: the user reruns the command
    restarts: bool = False  # the fault must make training resume from a checkpoint


@dataclass
class Result:
    fault: str
    stage: str
    when: str
    outcome: str
    keys_lost: int | None
    keys_duplicated: int | None
    seconds: float
    extra_seconds: float | None = None
    checks: dict = field(default_factory=dict)


class Submission:
    """``fiqa submit --stage STAGE --wait`` in a subprocess; its submission id once printed."""

    def __init__(self, cfg_path: Path, stage: str, cluster: LocalCluster, log: Path):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [*fiqa_cmd(), "submit", str(cfg_path), "--stage", stage, "--wait",
                 "--address", cluster.address],
                stdout=out, stderr=subprocess.STDOUT, env=cluster.env, text=True,
            )  # fmt: skip

    @property
    def job_id(self) -> str | None:
        found = re.search(r"^submitted (\S+) to", self.text(), re.MULTILINE)
        return found and found.group(1)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, cluster: LocalCluster, timeout: float = 1800) -> int:
        """The exit status of ``fiqa submit --wait``; the job's own logs kept beside its log."""
        from fiqa.cluster import submit

        rc = self.proc.wait(timeout=timeout)
        if self.job_id:
            try:
                logs = submit.connect(cluster.address).get_job_logs(self.job_id)
            except Exception as e:  # noqa: BLE001 - the logs are a convenience
                logs = f"(no logs: {e})"
            self.log.with_suffix(".job.log").write_text(logs)
        return rc


class Chaos:
    """The cluster, the bucket, the run and the probes the faults are timed by."""

    def __init__(self, work: Path):
        self.work = work
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
        self.s3 = S3Server()
        self.s3.start()
        os.environ.update(clean_env({}))  # this process's own S3 client: the test server only
        self.fs = self.s3.fs()
        self.bucket = self.s3.make_bucket()
        self.run = f"{self.bucket}/run"
        self.expected_keys = self._upload_data()
        self.cluster = LocalCluster(clean_env(PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="1"))
        self.spare = iter("cdefghijk")  # names of replacement nodes
        self.replacement_after: str | None = None  # a node a fault removed without replacing
        self.cluster.add_node("a")
        self.cluster.add_node("b")

    def _upload_data(self) -> set[str]:
        from fiqa.data.synthetic import make_demo_data

        data = self.work / "data"
        sizes = {"labeled_train": 256, "labeled_val": 64, "test": 64, "unlabeled_2": 64}
        make_demo_data(data, seed=1, sizes={**sizes, "unlabeled_1": U1_IMAGES}, shard_size=64)
        for split in (*sizes, "ground_truth"):
            self.fs.put(str(data / split), f"{self.bucket}/data/{split}", recursive=True)
        keys = set()
        for p in reshard(data / "unlabeled_1", self.work / "u1", SHARD_SIZE):
            self.fs.put_file(str(p), f"{self.bucket}/data/unlabeled_1/{p.name}")
            with tarfile.open(p) as tar:
                keys |= {m.name.split(".", 1)[0] for m in tar.getmembers()}
        root = f"s3://{self.bucket}/data"
        cfg = tiny_config(
            data,
            f"s3://{self.run}",
            train_teacher_plus={"epochs": TP_EPOCHS},
            scoring={"batch_size": SHARD_SIZE},
            storage=self.s3.storage_config(),
        )
        for k in ("labeled_train", "labeled_val", "test", "unlabeled_1", "unlabeled_2"):
            cfg["data"][k] = f"{root}/{k}"
        for k in ("unlabeled_1", "unlabeled_2"):
            cfg["data"][f"{k}_truth"] = f"{root}/ground_truth/{k}.csv"
        self.cfg_path = self.work / "config.yaml"
        self.cfg_path.write_text(yaml.safe_dump(cfg))
        return keys

    # -- probes (each tolerates the S3 server being down: no answer is no progress) ------------

    def _find(self, prefix: str) -> list[str]:
        try:
            self.fs.invalidate_cache()
            return self.fs.find(prefix)
        except Exception:
            return []

    def committed(self, stage: str) -> int:
        return sum(p.endswith(".parquet") for p in self._find(f"{self.run}/{stage}/labels"))

    def checkpoint_registered(self) -> bool:
        """Ray Train writes its snapshot once a checkpoint is whole in storage."""
        snapshot = "train_teacher_plus/ray_train/teacher_plus/checkpoint_manager_snapshot.json"
        return bool(self._find(f"{self.run}/{snapshot}"))

    def actors(self, fragment: str, sub: Submission) -> list:
        """The alive actors of ``sub``'s job whose class name contains ``fragment`` (an
        earlier job's may still be listed alive for a moment)."""
        from ray.util.state import list_actors

        from fiqa.cluster import submit

        try:
            job = submit.connect(self.cluster.address).get_job_info(sub.job_id).job_id
            listed = list_actors(
                address=self.cluster.address, filters=[("state", "=", "ALIVE")], detail=True,
                limit=1000, raise_on_missing_output=False,
            )  # fmt: skip
        except Exception:
            return []
        return [a for a in listed if fragment in a.class_name and job and a.job_id == job]

    def wait(
        self, condition: Callable[[], object], what: str, sub: Submission, timeout=600, every=0.1
    ):
        deadline = time.time() + timeout
        while not (found := condition()):
            if sub.proc.poll() is not None:
                raise RuntimeError(f"the job ended before {what}:\n{sub.text()[-3000:]}")
            if time.time() > deadline:
                raise TimeoutError(f"no {what} in {timeout} s")
            time.sleep(every)
        return found

    def replace(self, node: str) -> str:
        """Kill ``node`` whole and start a replacement; the replacement's name."""
        self.cluster.kill_node(node)
        spare = next(self.spare)
        self.cluster.add_node(spare)
        return spare

    def s3_outage(self, seconds: float = OUTAGE_S) -> None:
        self.s3.stop()
        time.sleep(seconds)
        self.s3.start()

    # -- one run of a stage, with a fault ------------------------------------------------------

    def run_stage(self, fault: Fault | None, stage: str) -> Result:
        if self._find(f"{self.run}/{stage}"):
            self.fs.rm(f"{self.run}/{stage}", recursive=True)  # each run starts the stage afresh
        name = fault.name if fault else "none"
        t0 = time.time()
        sub = Submission(self.cfg_path, stage, self.cluster, self.work / f"{name}.log")
        when, error = "-", None
        if fault is not None:
            box: dict = {}

            def inject() -> None:
                try:
                    box["when"] = fault.inject(self, sub)
                except Exception as e:  # noqa: BLE001 - reported in the table
                    box["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"

            t = threading.Thread(target=inject, daemon=True)
            t.start()
            sub.wait(self.cluster)
            t.join(timeout=120)
            when, error = box.get("when", "not injected"), box.get("error")
        else:
            sub.wait(self.cluster)
        outcome = "completed" if sub.proc.returncode == 0 else "job failed"
        if fault is not None and fault.ends_job and sub.proc.returncode != 0:
            rerun = Submission(self.cfg_path, stage, self.cluster, self.work / f"{name}-rerun.log")
            rerun.wait(self.cluster)
            outcome = "completed on rerun" if rerun.proc.returncode == 0 else "rerun failed"
        seconds = time.time() - t0
        if error:
            outcome += f" (injection: {error})"
        check = self.check_labels if stage.startswith("pseudo_label") else self.check_training
        lost, dup, checks = check(stage)
        if fault is not None and fault.restarts and not checks.get("restarts"):
            checks["problems"].append("training did not resume from a checkpoint")
        if checks.get("problems"):
            outcome += "; " + "; ".join(checks["problems"])
        return Result(name, stage, when, outcome, lost, dup, round(seconds, 1), checks=checks)

    # -- checks ------------------------------------------------------------------------------

    def check_labels(self, stage: str) -> tuple[int, int, dict]:
        import pyarrow.parquet as pq

        problems, keys = [], []
        parts = {
            kind: sorted(p for p in self._find(f"{self.run}/{stage}/{kind}") if p.endswith(".parquet"))
            for kind in ("labels", "rejects")
        }  # fmt: skip
        for kind, paths in parts.items():
            if len(paths) != len(self.expected_keys) // SHARD_SIZE:
                problems.append(
                    f"{len(paths)} {kind} parts for {len(self.expected_keys) // SHARD_SIZE} shards"
                )
            for p in paths:
                try:
                    keys += pq.read_table(io.BytesIO(self.fs.cat(p)), columns=["key"])[
                        "key"
                    ].to_pylist()
                except Exception as e:  # noqa: BLE001 - a partial part is what this looks for
                    problems.append(f"unreadable part {p}: {e}")
        found = set(keys)
        lost = len(self.expected_keys - found)
        dup = len(keys) - len(found)
        return lost, dup, {"rows": len(keys), "parts": len(parts["labels"]), "problems": problems}

    def check_training(self, stage: str) -> tuple[None, None, dict]:
        from safetensors.numpy import load as load_safetensors

        problems = []
        try:
            history = json.loads(self.fs.cat(f"{self.run}/{stage}/history.json"))
        except Exception as e:  # noqa: BLE001
            history = []
            problems.append(f"no history: {e}")
        epochs = [h["epoch"] for h in history]
        if epochs != list(range(1, TP_EPOCHS + 1)):
            problems.append(f"epochs {epochs}")
        loaded = 0
        for p in [
            *self._find(f"{self.run}/{stage}/ray_train"),
            *self._find(f"{self.run}/{stage}/model"),
        ]:
            if p.endswith("model.safetensors"):
                try:
                    load_safetensors(self.fs.cat(p))
                    loaded += 1
                except Exception as e:  # noqa: BLE001 - a corrupt checkpoint is what this looks for
                    problems.append(f"corrupt {p}: {e}")
        restarts = history[-1].get("restarts", 0) if history else None
        return None, None, {"epochs": epochs, "restarts": restarts, "checkpoints_loaded": loaded,
                            "problems": problems}  # fmt: skip


# -- the faults ----------------------------------------------------------------------------------
def _after(c: Chaos, n: int) -> Callable[[], int]:
    """A probe: the committed shards of pseudo_label_1 once there are ``n``, else 0."""
    return lambda: (k := c.committed("pseudo_label_1")) >= n and k


def kill_scoring_actors(c: Chaos, sub: Submission) -> str:
    at, n = [], 3
    for _ in range(3):
        n = c.wait(_after(c, n + 1), f"{n + 1} committed shards", sub)
        # The actor (the first or its restart) back at work: found by its process title at
        # once, where the state API lists a restarted actor seconds late.
        actor = c.wait(
            lambda: ray_task_processes(f"{SCORING_ACTOR}.submit"),
            "a scoring actor",
            sub,
            every=0.01,
        )[0]
        actor.send_signal(signal.SIGKILL)
        at.append(str(n))
    return f"after {', '.join(at)} of 48 shards committed"


def kill_decode_worker(c: Chaos, sub: Submission) -> str:
    # Decoding runs ahead of scoring (the stream buffers its blocks): on this small pool it is
    # over before the first commit, so the first decode task is the one killed.
    worker = c.wait(
        lambda: ray_task_processes(DECODE_TASK), "a running decode task", sub, every=0.002
    )[0]  # a task lasts tens of milliseconds here
    worker.send_signal(signal.SIGKILL)
    return f"the first decode task, mid-task ({c.committed('pseudo_label_1')} shards committed)"


def lose_scoring_node(c: Chaos, sub: Submission) -> str:
    n = c.wait(_after(c, 4), "4 committed shards", sub)
    actor = c.wait(lambda: c.actors("MapWorker", sub), "a scoring actor", sub)[0]
    node = c.cluster.alive()[actor.node_id]
    spare = c.replace(node)
    return f"after {n} of 48 shards committed; node {node} (scoring actor) lost, {spare} joins"


def lose_decode_node(c: Chaos, sub: Submission) -> str:
    n = c.wait(_after(c, 4), "4 committed shards", sub)
    actor = c.wait(lambda: c.actors("MapWorker", sub), "a scoring actor", sub)[0]
    alive = c.cluster.alive()
    node = next(name for i, name in alive.items() if i != actor.node_id and name != "head")
    c.cluster.kill_node(node)  # its object store held decoded blocks: their only copy
    at = f"after {n} of 48 shards committed; node {node} (decode tasks, their blocks) lost"
    c.replacement_after = node
    return at


def kill_driver(c: Chaos, sub: Submission) -> str:
    from fiqa.cluster import submit

    n = c.wait(_after(c, 4), "4 committed shards", sub)
    info = submit.connect(c.cluster.address).get_job_info(
        c.wait(lambda: sub.job_id, "a job id", sub)
    )
    os.kill(int(info.driver_info.pid), signal.SIGKILL)
    return f"after {n} of 48 shards committed; the same command rerun"


def s3_outage_commits(c: Chaos, sub: Submission) -> str:
    n = c.wait(_after(c, 8), "8 committed shards", sub)
    c.s3_outage()
    return f"{OUTAGE_S:.0f} s from {n} of 48 shards committed"


def lose_training_node(c: Chaos, sub: Submission) -> str:
    c.wait(c.checkpoint_registered, "a registered checkpoint", sub)
    trainer = c.wait(lambda: c.actors("RayTrainWorker", sub), "a Train worker", sub)[0]
    node = c.cluster.alive()[trainer.node_id]
    c.cluster.kill_node(node)
    c.replacement_after = node
    return f"after checkpoint 1 of {TP_EPOCHS} registered; node {node} (the Train worker) lost"


def s3_outage_checkpoint(c: Chaos, sub: Submission) -> str:
    # From checkpoint 1's registration, 10 s: longer than an epoch here (about 7 s), so the
    # outage covers epoch 2's reads of its tables and its checkpoint's upload.
    c.wait(c.checkpoint_registered, "a registered checkpoint", sub)
    c.s3_outage()
    return f"{OUTAGE_S:.0f} s from checkpoint 1 of {TP_EPOCHS} registered (epoch 2 and its upload)"


FAULTS = [
    Fault("actor_kills", "pseudo_label_1", "scoring actor SIGKILL x3", kill_scoring_actors),
    Fault("decode_kill", "pseudo_label_1", "decode worker SIGKILL", kill_decode_worker),
    Fault("node_loss_label", "pseudo_label_1", "node lost + replaced", lose_scoring_node),
    Fault("object_loss", "pseudo_label_1", "node with blocks' only copy lost", lose_decode_node),
    Fault("driver_kill", "pseudo_label_1", "driver SIGKILL, rerun", kill_driver, ends_job=True),
    Fault("s3_outage_commits", "pseudo_label_1", "S3 down 10 s mid-commits", s3_outage_commits),
    Fault("node_loss_train", "train_teacher_plus", "node lost", lose_training_node, restarts=True),
    Fault("s3_outage_checkpoint", "train_teacher_plus", "S3 down 10 s at a checkpoint upload",
          s3_outage_checkpoint),
]  # fmt: skip


def table(results: list[Result], faults: dict[str, Fault]) -> str:
    rows = [
        "| fault | stage | when injected | outcome | keys lost | keys duplicated | seconds | extra s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        what = faults[r.fault].what if r.fault in faults else "none (clean run)"
        extra = "-" if r.extra_seconds is None else f"{r.extra_seconds:+.0f}"
        lost = "-" if r.keys_lost is None else r.keys_lost
        dup = "-" if r.keys_duplicated is None else r.keys_duplicated
        outcome = r.outcome
        if r.stage == "train_teacher_plus":
            lost = dup = "n/a"
            c = r.checks
            outcome += (
                f"; epochs 1-{len(c.get('epochs', []))}, restarts {c.get('restarts')}, "
                f"{c.get('checkpoints_loaded')} checkpoints load"
            )
        rows.append(
            f"| {what} | {r.stage} | {r.when} | {outcome} | {lost} | {dup} | {r.seconds:.0f} "
            f"| {extra} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--faults",
        default=",".join(f.name for f in FAULTS),
        help="comma-separated, of: " + ", ".join(f.name for f in FAULTS),
    )
    ap.add_argument("--work", help="keep the data and logs here (default: a temporary dir)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)  # fmt: skip
    by_name = {f.name: f for f in FAULTS}
    chosen = [by_name[n] for n in args.faults.split(",") if n]  # KeyError names a bad fault
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the cluster on the way out
    with scratch(args.work, "fiqa-chaos-") as work:
        c = Chaos(work)
        results: list[Result] = []
        try:
            for stage in ("train_teacher",):
                sub = Submission(c.cfg_path, stage, c.cluster, work / f"{stage}.log")
                if sub.wait(c.cluster):
                    raise RuntimeError(f"{stage} failed:\n{sub.text()[-3000:]}")
            clean: dict[str, float] = {}
            stages = ["pseudo_label_1"] + (
                ["train_teacher_plus"]
                if any(f.stage == "train_teacher_plus" for f in chosen)
                else []
            )
            for stage in stages:
                base = c.run_stage(None, stage)
                clean[stage] = base.seconds
                results.append(base)
                print(f"{stage}: clean run {base.seconds:.0f} s, {base.outcome}", flush=True)
                for fault in (f for f in chosen if f.stage == stage):
                    c.replacement_after = None
                    r = c.run_stage(fault, stage)
                    r.extra_seconds = round(r.seconds - clean[stage], 1)
                    results.append(r)
                    print(f"{fault.name}: {r.outcome}, {r.seconds:.0f} s ({r.when})", flush=True)
                    if c.replacement_after:  # back to two worker nodes for the next fault
                        c.cluster.add_node(next(c.spare))
                # the last labeling run's output feeds teacher-plus: a complete one
                if stage == "pseudo_label_1" and not results[-1].outcome.startswith("completed"):
                    c.run_stage(None, stage)
        finally:
            c.cluster.stop()
            c.s3.stop()
        print()
        print(table(results, by_name))
        machine = f"{platform.node()}, {os.cpu_count()} CPUs; 3 raylets on 127.0.0.1 (head 0 CPUs, 2 x 2 CPUs)"
        print(f"\nmachine: {machine}")
        if args.json:
            Path(args.json).write_text(
                json.dumps({"machine": machine, "results": [r.__dict__ for r in results]}, indent=2)
            )
        bad = [
            r
            for r in results
            if r.keys_lost or r.keys_duplicated or r.when == "not injected"
            or not r.outcome.startswith("completed") or "injection" in r.outcome
        ]  # fmt: skip
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
