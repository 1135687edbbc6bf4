"""`fiqa submit`, `fiqa jobs`, `fiqa stop` against a real Ray head started by the test.

The head is a `ray start --head --block` in its own session, with its own
`--temp-dir` and free ports, so it neither joins nor disturbs any other Ray on
the machine; teardown stops exactly the processes it started (never `ray stop`,
which stops every Ray of the user). It uses token authentication, as a Ray
2.5x head does by default, with a token made up for the test.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from fiqa.cli import main
from fiqa.cluster import submit
from fiqa.config import ConfigError, from_dict

from conftest import REPO, fiqa_cmd, subprocess_env, tiny_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any Ray address or auth setting of the caller."""
    env = {
        k: v
        for k, v in subprocess_env().items()
        if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") and not k.startswith("RAY_AUTH_")
    }
    env.update(extra)
    return env


def fiqa(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*fiqa_cmd(), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------------------
# Without a cluster


def minimal_config(run_dir: str = "runs/x", **extra) -> dict:
    data = {s: f"{s}/*.tar" for s in ("labeled_train", "labeled_val", "test", "unlabeled_1")}
    data["unlabeled_2"] = ["s3://bucket/u2/{000..009}.tar", "more/u2.tar"]
    return {"run_dir": run_dir, "data": data, **extra}


def test_submission_id_is_stable_per_run_and_stage():
    a = submission_id_of("/data/runs/Demo_1", None)
    assert a == submission_id_of("/data/runs/Demo_1/", None)
    assert re.fullmatch(r"fiqa-demo-1-all-[0-9a-f]{8}", a)
    assert submission_id_of("/data/runs/Demo_1", "pseudo_label_1").startswith(
        "fiqa-demo-1-pseudo-label-1-"
    )
    # another run with the same name is another id
    assert submission_id_of("/other/runs/Demo_1", None) != a
    assert re.fullmatch(r"fiqa-exp-7-all-[0-9a-f]{8}", submission_id_of("s3://b/runs/exp.7", None))


def submission_id_of(run_dir: str, stage: str | None) -> str:
    return submit.submission_base_id(run_dir, stage)


def test_next_attempt_gets_a_suffix():
    class Job:
        def __init__(self, sid):
            self.submission_id = sid

    base = "fiqa-demo-all-0123abcd"
    assert submit._next_id([], base) == base
    assert submit._next_id([Job(base), Job("raysubmit_x"), Job(None)], base) == f"{base}-2"
    jobs = [Job(base), Job(f"{base}-2"), Job(f"{base}-3"), Job(f"{base}-3x"), Job(f"{base}x-9")]
    assert submit._next_id(jobs, base) == f"{base}-4"


def test_job_config_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = from_dict(
        minimal_config(
            ray={"address": "http://head:8265", "num_cpus": 2},
            teacher={"pretrained_weights": "w/teacher.safetensors"},
        )
    )
    shipped = submit.job_config(cfg)
    assert shipped["run_dir"] == str(tmp_path / "runs/x")
    assert shipped["data"]["test"] == str(tmp_path / "test/*.tar")
    assert shipped["data"]["unlabeled_2"] == [
        "s3://bucket/u2/{000..009}.tar",
        str(tmp_path / "more/u2.tar"),
    ]
    assert shipped["teacher"]["pretrained_weights"] == str(tmp_path / "w/teacher.safetensors")
    assert shipped["student"]["pretrained_weights"] is None
    # the job's driver joins its own cluster; the rest of the config is unchanged
    assert shipped["ray"] == {
        "address": None,
        "num_cpus": 2,
        "object_store_memory": None,
        "autoscaling": None,  # the job joins via RAY_ADDRESS: a cluster that may grow
    }
    assert from_dict(shipped).train_teacher == cfg.train_teacher
    s3 = submit.job_config(from_dict(minimal_config(run_dir="s3://bucket/runs/x")))
    assert s3["run_dir"] == "s3://bucket/runs/x"


def test_address_resolution(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="no Ray address"):
        submit.resolve_address(None, None)
    # ray.address is for ray.init() unless it is the dashboard's URL
    with pytest.raises(ConfigError, match="no Ray address"):
        submit.resolve_address(None, "10.0.0.5:6379")
    assert submit.resolve_address(None, "http://head:8265/") == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9000")
    assert submit.resolve_address(None, "http://head:8265") == "http://127.0.0.1:9000"
    assert submit.resolve_address("https://ray.example.org", None) == "https://ray.example.org:8265"
    with pytest.raises(ConfigError, match="dashboard's URL"):
        submit.resolve_address("ray://head:10001", None)


def test_shipped_code_is_the_whole_package(tmp_path):
    root = submit.package_code(tmp_path)
    # the packages pyproject installs (tomllib is Python 3.11+; we support 3.10)
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = re.findall(r'"([\w.]+)"', re.search(r"^packages = \[(.*)\]", pyproject, re.M)[1])
    assert "fiqa.pipelines" in packages
    probe = (  # find_spec locates a package without running it (no torch import)
        "import importlib.util, json; "
        f"print(json.dumps({{n: importlib.util.find_spec(n).origin for n in {packages!r}}}))"
    )
    # a bare interpreter with only the copy on its path, as a job's worker would have it
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**clean_env(), "PYTHONPATH": str(tmp_path)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = json.loads(proc.stdout)
    assert set(files) == set(packages)
    for name, file in files.items():
        assert Path(file).is_relative_to(root), (name, file)
    assert not list(root.rglob("__pycache__"))


def test_unreachable_address_fails_fast(tmp_path, monkeypatch, capsys):
    closed = free_port()  # nothing listens there
    t0 = time.time()
    with pytest.raises(submit.ClusterError, match="no Ray dashboard answers"):
        submit.connect(f"http://127.0.0.1:{closed}")
    assert time.time() - t0 < 5

    # a port that accepts connections but never answers: bounded by the timeouts
    monkeypatch.setattr(submit, "CONNECT_TIMEOUT_S", 1.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        t0 = time.time()
        with pytest.raises(submit.ClusterError, match="ReadTimeout"):
            submit.connect(f"http://127.0.0.1:{silent.getsockname()[1]}")
        assert time.time() - t0 < 10

    cfg = write_config(tmp_path / "c.yaml", minimal_config(str(tmp_path / "run")))
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert main(["submit", str(cfg), "--address", f"http://127.0.0.1:{closed}"]) == 2
    assert f"no Ray dashboard answers at http://127.0.0.1:{closed}" in capsys.readouterr().err
    # a bad config fails before any address is tried
    bad = ["--set", "train_teacher.epochs=0"]
    assert main(["submit", str(cfg), "--address", f"http://127.0.0.1:{closed}", *bad]) == 2
    err = capsys.readouterr().err
    assert "train_teacher.epochs: must be >= 1" in err and "dashboard" not in err
    # so does a model name that is neither in the registry nor timm's (found by the student
    # stage, hours into the run, before)
    typo = ["--set", "student.arch=edgenext_xxsmall"]
    assert main(["submit", str(cfg), "--address", f"http://127.0.0.1:{closed}", *typo]) == 2
    err = capsys.readouterr().err
    assert "student.arch: unknown model 'edgenext_xxsmall'" in err and "dashboard" not in err
    assert main(["run", str(cfg), "--set", "teacher.arch=resnet10"]) == 2
    assert "teacher.arch: unknown model 'resnet10'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything of the run was written
    assert main(["jobs"]) == 2
    assert "no Ray address" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# With a Ray head


class Head:
    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="fqs-", dir="/tmp")  # short: Ray's socket paths
        self.token = secrets.token_hex(32)
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        venv_bin = os.path.dirname(sys.executable)
        # The job's launcher (`python3 fiqa_job.py`) runs fiqa with the Ray workers'
        # interpreter; the head's PATH only needs a python3 to start it.
        env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # a test head: no drain on stop
        env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
        ports = {
            "port": free_port(),
            "dashboard-port": self.dashboard_port,
            "ray-client-server-port": free_port(),
            "dashboard-agent-listen-port": free_port(),
            "dashboard-agent-grpc-port": free_port(),
            "runtime-env-agent-port": free_port(),
            "metrics-export-port": free_port(),
            "node-manager-port": free_port(),
            "object-manager-port": free_port(),
        }
        cmd = [
            os.path.join(venv_bin, "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--temp-dir={self.tmp}",
            "--disable-usage-stats",
            *(f"--{k}={v}" for k, v in ports.items()),
        ]
        self.log = open(os.path.join(self.tmp, "ray-start.log"), "w")
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=self.tmp, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        req = urllib.request.Request(
            f"{self.address}/api/jobs/", headers={"Authorization": f"Bearer {self.token}"}
        )
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    "ray start exited: " + Path(self.tmp, "ray-start.log").read_text()[-3000:]
                )
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        raise TimeoutError(f"the Ray head's Jobs API did not come up in {timeout} s")

    def env(self) -> dict[str, str]:
        """The environment of a user of this cluster: its token, Ray's variables."""
        return clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)

    def client(self):
        """A Jobs API client in this process, for the test's own checks."""
        return submit.connect(self.address, headers={"Authorization": f"Bearer {self.token}"})

    def _own_pids(self) -> list[int]:
        """Processes of this head that left its process group: job drivers (own
        session, working dir under the temp dir) and workers (temp dir in argv)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                argv = Path("/proc", entry, "cmdline").read_bytes().replace(b"\0", b" ")
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if self.tmp.encode() in argv or cwd.startswith(self.tmp):
                pids.append(int(entry))
        return pids

    def stop(self) -> None:
        # SIGTERM to `ray start --block` drains the node and stops its processes.
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            for pid in self._own_pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        self.proc.wait(timeout=10)
        self.log.close()
        left = self._own_pids()
        shutil.rmtree(self.tmp, ignore_errors=True)
        assert not left, f"processes of the test's Ray head still alive: {left}"


@pytest.fixture(scope="module")
def head():
    h = Head()
    try:
        h.wait_ready()
        yield h
    finally:
        h.stop()


def job_rows(head: Head) -> dict[str, list[str]]:
    proc = fiqa("jobs", "--address", head.address, env=head.env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["SUBMISSION", "ID", "STATUS"]
    return {line.split()[0]: line.split() for line in lines[1:]}


@pytest.mark.slow
def test_cluster_needs_its_token(head):
    proc = fiqa("jobs", "--address", head.address, env=clean_env())
    assert proc.returncode == 2
    assert "RAY_AUTH_MODE=token" in proc.stderr


@pytest.mark.slow
def test_jobs_run_the_shipped_code_and_config(head, tiny_data, tmp_path):
    cfg = from_dict(tiny_config(tiny_data, tmp_path / "run"))
    client = head.client()
    probe = (
        'python -c \'import fiqa.pipelines, os, yaml; print("CODE", fiqa.pipelines.__file__); '
        'print("RUN_DIR", yaml.safe_load(open("config.yaml"))["run_dir"])\''
    )
    seen = {}
    for ship in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            env = submit.build_runtime_env(submit.job_config(cfg), tmp, ship_code=ship)
            sid = client.submit_job(entrypoint=probe, runtime_env=env)
        assert submit.wait_for(client, sid, quiet=True) == "SUCCEEDED"
        logs = client.get_job_logs(sid)
        seen[ship] = re.search(r"^CODE (\S+)", logs, re.M).group(1)
        assert f"RUN_DIR {tmp_path / 'run'}" in logs
    # shipped: a copy unpacked by Ray on the head; not shipped: the installed checkout
    assert seen[True].startswith(head.tmp) and not seen[True].startswith(str(REPO))
    assert seen[False] == str(REPO / "pipelines" / "__init__.py")


@pytest.mark.slow
def test_failed_job_exits_nonzero_with_its_error(head, tiny_data, tmp_path):
    # a single stage whose upstream never ran: the job's `fiqa stage` fails
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tiny_data, tmp_path / "run"))
    proc = fiqa(
        "submit", str(cfg), "--stage", "evaluate", "--address", head.address, "--wait",
        env=head.env(),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    sid = proc.stdout.split()[0]
    assert sid.startswith("fiqa-run-evaluate-")
    assert f"fiqa: job {sid} failed:" in proc.stderr
    assert "stage evaluate needs stage" in proc.stderr  # the job's own error, from its logs
    assert job_rows(head)[sid][1] == "FAILED"


@pytest.mark.slow
def test_attach_conflict_and_stop(head, tiny_data, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tiny_data, tmp_path / "run"))
    env = head.env()
    first = fiqa("submit", str(cfg), "--address", head.address, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    sid = first.stdout.strip()
    assert sid == submit.submission_base_id(str(tmp_path / "run"), None)

    # the same run and config again: the active job, not a second one
    again = fiqa("submit", str(cfg), "--address", head.address, env=env)
    assert again.returncode == 0 and again.stdout.strip() == sid
    assert "already active" in again.stderr
    # the same run with another config, or another stage of it: refused while it runs
    for extra in (["--set", "distill_student.lr=0.002"], ["--stage", "train_teacher"]):
        other = fiqa("submit", str(cfg), "--address", head.address, *extra, env=env)
        assert other.returncode == 2
        assert f"already has an active job {sid}" in other.stderr
        assert f"fiqa stop {sid}" in other.stderr

    # a watcher attached with --wait sees the job end as stopped
    watcher = subprocess.Popen(
        [*fiqa_cmd(), "submit", str(cfg), "--address", head.address, "--wait"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert watcher.stdout.readline().strip() == sid  # it printed the id: it has attached
    client, deadline = head.client(), time.time() + 180
    while submit.status_name(client.get_job_status(sid)) != "RUNNING":
        assert time.time() < deadline, "the job never started"
        time.sleep(1)
    stop = fiqa("stop", sid, "--address", head.address, env=env)
    assert stop.returncode == 0, stop.stderr[-3000:]
    assert stop.stdout.strip() == f"{sid}: STOPPED"
    out, err = watcher.communicate(timeout=180)
    assert watcher.returncode == 1, err[-3000:]
    assert out.strip() == "" and "attaching" in err
    assert f"fiqa: job {sid} stopped:" in err
    row = job_rows(head)[sid]
    assert row[1] == "STOPPED"
    assert " ".join(row[-4:]) == "python3 fiqa_job.py run config.yaml"

    again = fiqa("stop", sid, "--address", head.address, env=env)
    assert again.returncode == 0 and "is not running (STOPPED)" in again.stdout
    missing = fiqa("stop", "fiqa-no-such-job", "--address", head.address, env=env)
    assert missing.returncode == 2 and "cannot stop fiqa-no-such-job" in missing.stderr


@pytest.mark.slow
def test_a_run_until_a_stage_runs_as_a_job_and_resubmitting_resumes(head, tiny_data, tmp_path):
    # The recipe up to its first stage (the whole recipe runs as a job in test_multinode, on
    # a 3-node cluster; a single stage's job in test_failed_job_exits_nonzero_with_its_error)
    run_dir = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml", tiny_config(tiny_data, run_dir, train_teacher={"epochs": 1})
    )
    stage = ["--until", "train_teacher"]
    t0 = time.time()
    proc = fiqa(
        "submit", str(cfg), *stage, "--address", head.address, "--follow", env=head.env(),
        timeout=900,
    )  # fmt: skip
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    sid = lines[0]
    assert sid == submit.submission_base_id(str(run_dir), None, until="train_teacher")
    assert "[1/6] train_teacher: done in" in proc.stdout  # the job's logs, streamed
    assert "ran 1 stage(s) (train_teacher)" in proc.stdout
    assert f"job {sid} succeeded" in proc.stderr
    assert (run_dir / "train_teacher" / "model" / "model.json").exists()
    print(f"stage job: {seconds:.0f} s")

    # resubmitting the finished stage: a new attempt, which finds it done
    before = json.loads((run_dir / "train_teacher" / "manifest.json").read_text())
    proc = fiqa("submit", str(cfg), *stage, "--address", head.address, "--follow", env=head.env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0] == f"{sid}-2"
    assert "ran 0 stage(s), 1 up to date" in proc.stdout
    after = json.loads((run_dir / "train_teacher" / "manifest.json").read_text())
    assert after["output_id"] == before["output_id"]
    client = head.client()
    assert [submit.status_name(client.get_job_status(i)) for i in (sid, f"{sid}-2")] == [
        "SUCCEEDED",
        "SUCCEEDED",
    ]
