"""A real multi-node Ray cluster on 127.0.0.1 for the tests, started by the tests.

`LocalCluster` runs a head (`ray start --head`: GCS, dashboard, the Jobs API) and
worker nodes (`ray start --address`), each a separate raylet with its own object
store, its own logical CPUs and a custom resource ``node:<name>``-like marker
(``fiqa_node_<name>: 1``) so that placement can be asserted and steered. Each
`ray start --block` runs in a session of its own: `kill_node` SIGKILLs one node's
whole process tree (its raylet, agents and workers) without grace, as a spot
instance vanishes; `add_node` brings a replacement. A node can be held to some cores of
this machine, and to a share of a core (`CpuCap`, a CPU cgroup), as a machine of its own
brings only its own CPU. Teardown stops exactly the processes the cluster started (never
`ray stop`, which stops every Ray of the user).

The ``ray_cluster`` fixture is a head with no CPUs of its own (as on KubeRay, the
driver's node runs no tasks) and two 2-CPU worker nodes.
"""

from __future__ import annotations

import contextlib
import os
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

import psutil
import pytest


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all bound at once: the kernel cannot hand one out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class CpuCap:
    """A CPU cgroup that holds the processes started in it, and their children, to ``share``
    of one core (cgroup v1 ``cpu.cfs_quota_us`` or v2 ``cpu.max``, over 100 ms periods).

    Needs a writable cgroup file system (root, or a delegated subtree): `CpuCap.available`
    says whether this machine has one.
    """

    PERIOD_US = 100_000
    V1, V2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")

    def __init__(self, name: str, share: float):
        if share <= 0:
            raise ValueError(f"a CPU share must be above 0, got {share}")
        root, version = self._root()
        self.path = root / name
        self.path.mkdir()
        quota = max(1000, round(share * self.PERIOD_US))
        try:
            if version == 1:
                (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
                (self.path / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (self.path / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
        except OSError:
            self.path.rmdir()
            raise

    @classmethod
    def _root(cls) -> tuple[Path, int]:
        if (cls.V1 / "cpu.cfs_quota_us").exists():
            return cls.V1, 1
        controllers = cls.V2 / "cgroup.subtree_control"
        if controllers.exists() and "cpu" in controllers.read_text().split():
            return cls.V2, 2
        raise OSError("no cgroup CPU controller (v1 cpu, or v2 with cpu enabled) found")

    @classmethod
    def available(cls) -> bool:
        """Whether a cap can be made here: tried, as permissions alone do not tell (a
        read-only mount, a user namespace)."""
        try:
            cls(f"fiqa-probe-{os.getpid()}", 1.0).remove()
        except OSError:
            return False
        return True

    def join(self) -> None:
        """Move the calling process into the cgroup (from a child's ``preexec_fn``)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def throttled(self) -> float:
        """The share of the cgroup's 100 ms periods so far in which it ran out of quota: near 1
        when its processes wanted more CPU than the cap, as a node short of cores."""
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        return int(stat["nr_throttled"]) / max(1, int(stat["nr_periods"]))

    def remove(self, timeout: float = 10) -> None:
        """Remove the cgroup once its processes are gone (the kernel refuses it before)."""
        deadline = time.time() + timeout
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)


def node_resource(name: str) -> str:
    """The custom resource that marks node ``name`` (1 unit per node)."""
    return f"fiqa_node_{name}"


class LocalCluster:
    """A head and named worker nodes on 127.0.0.1, each its own `ray start --block`."""

    def __init__(
        self,
        env: dict[str, str],
        head_cpus: int = 0,
        object_store_mb: int = 256,
        head_cores: set[int] | None = None,
    ):
        self.tmp = tempfile.mkdtemp(prefix="fqc-", dir="/tmp")  # short: Ray's socket paths
        # Not the caller's Ray: no address, no auth settings (an in-process `ray.init` of an
        # earlier test sets RAY_AUTH_MODE=token in this process's environment).
        self.env = {
            k: v for k, v in env.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH_")
        }
        self.env["RAY_AUTH_MODE"] = "disabled"
        self.env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # a test cluster: no drain
        # A killed node declared dead after 3 missed checks a second apart, not Ray's 5 of 3 s:
        # the suite waits for two node losses.
        self.env.setdefault("RAY_health_check_period_ms", "1000")
        self.env.setdefault("RAY_health_check_failure_threshold", "3")
        venv_bin = os.path.dirname(sys.executable)
        # a job's entrypoint starts with the head's PATH: the test's interpreter first
        self.env["PATH"] = venv_bin + os.pathsep + self.env.get("PATH", "")
        self._ray = os.path.join(venv_bin, "ray")
        self.object_store = object_store_mb * 1024 * 1024
        self.gcs_port, self.dashboard_port, client_port = free_ports(3)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"  # the Jobs API
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.caps: dict[str, CpuCap] = {}
        self.metrics_ports: dict[str, int] = {}  # each node's Prometheus endpoint
        self.killed: list[str] = []
        # node id -> name of every node seen: the state API lists a dead node without the
        # resources that name it
        self._names: dict[str, str] = {}
        self._start(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                f"--num-cpus={head_cpus}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={client_port}",
                f"--temp-dir={self.tmp}",
            ],
            head_cores,
        )
        try:
            self._wait_for_jobs_api()
        except BaseException:
            with contextlib.suppress(Exception):  # the start-up error is the one to see
                self.stop()
            raise

    # -- nodes --------------------------------------------------------------------------------

    def _start(
        self,
        name: str,
        args: list[str],
        cores: set[int] | None = None,
        cpu_share: float | None = None,
    ) -> None:
        """``cores``: the machine's cores this node's processes may run on (all by default),
        as a node of its own would have its own; ``cpu_share``: the share of one core they
        may use together (a `CpuCap`; none by default)."""
        names = [
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
            "node-manager-port",
            "object-manager-port",
        ]
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.metrics_ports[name] = ports["metrics-export-port"]
        cmd = [
            self._ray,
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--object-store-memory={self.object_store}",
            f'--resources={{"{node_resource(name)}": 1}}',
            "--disable-usage-stats",
            *args,
            *(f"--{k}={v}" for k, v in ports.items()),
        ]
        cap = None
        if name in self.caps:  # a node started again under a killed one's name
            self.caps.pop(name).remove()
        if cpu_share is not None:
            cap = self.caps[name] = CpuCap(f"{os.path.basename(self.tmp)}-{name}", cpu_share)

        def confine() -> None:  # in the child, before `ray start` runs
            if cores:
                os.sched_setaffinity(0, cores)
            if cap:
                cap.join()

        log = open(os.path.join(self.tmp, f"ray-start-{name}.log"), "w")
        self.nodes[name] = subprocess.Popen(
            cmd, env=self.env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=confine if cores or cap else None,
        )  # fmt: skip
        log.close()

    def add_node(
        self,
        name: str,
        cpus: int = 2,
        timeout: float = 120,
        cores: set[int] | None = None,
        cpu_share: float | None = None,
    ) -> None:
        """Start worker node ``name`` (on ``cores`` of this machine, default all; held to
        ``cpu_share`` of a core, default no cap) and wait until the head counts it alive."""
        # Its own temp dir, as each machine has its own disk: nodes sharing one would share
        # runtime_resources/, and one node's runtime-env agent would delete what another's
        # job driver runs in.
        temp = os.path.join(self.tmp, name)
        os.makedirs(temp, exist_ok=True)
        self._start(
            name,
            [f"--address={self.gcs_address}", f"--num-cpus={cpus}", f"--temp-dir={temp}"],
            cores,
            cpu_share,
        )
        deadline = time.time() + timeout
        while name not in self.alive().values():
            self._check_running(name)
            if time.time() > deadline:
                raise TimeoutError(f"node {name} did not join in {timeout} s")
            time.sleep(0.5)

    def kill_node(self, name: str) -> float:
        """SIGKILL node ``name``'s `ray start`, raylet, agents and workers, at once; the time."""
        proc = psutil.Process(self.nodes[name].pid)
        tree = [proc, *proc.children(recursive=True)]
        at = time.time()
        for p in tree:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=30)
        self.nodes.pop(name).wait(timeout=10)
        self.killed.append(name)
        return at

    def workers(self, title: str) -> dict[int, str]:
        """pid -> node name of this cluster's Ray workers running ``title`` now: found by
        process title (``ray::<actor class or task>...``) at once, where the state API lists
        a new actor a second or more late."""
        out = {}
        for name, proc in list(self.nodes.items()):
            try:
                tree = psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                continue
            for p in tree:
                try:
                    argv = p.cmdline()
                except psutil.Error:
                    continue
                if argv and argv[0].startswith(f"ray::{title}"):
                    out[p.pid] = name
        return out

    def alive(self) -> dict[str, str]:
        """node id -> the test's name, of the nodes the head counts alive ({} while it cannot say)."""
        return {i: n for i, (n, state) in self._nodes().items() if state == "ALIVE"}

    def node_names(self) -> dict[str, str]:
        """node id -> the test's name, of every node that ever joined (dead ones too)."""
        self._nodes()
        return dict(self._names)

    def _nodes(self) -> dict[str, tuple[str, str]]:
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(
                address=self.address, detail=True, limit=1000, raise_on_missing_output=False
            )
        except Exception:  # the dashboard is starting, or busy: no answer is no node
            return {}
        out = {}
        for n in nodes:
            marks = [r for r in (n.resources_total or {}) if r.startswith("fiqa_node_")]
            if marks:
                out[n.node_id] = (marks[0].removeprefix("fiqa_node_"), n.state)
                self._names[n.node_id] = out[n.node_id][0]
        return out

    # -- start-up and teardown ----------------------------------------------------------------

    def _check_running(self, name: str) -> None:
        if self.nodes[name].poll() is not None:
            log = Path(self.tmp, f"ray-start-{name}.log").read_text()[-3000:]
            raise RuntimeError(f"ray start of node {name} exited:\n{log}")

    def _wait_for_jobs_api(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        req = urllib.request.Request(f"{self.address}/api/jobs/")
        last: object = None
        while time.time() < deadline:
            self._check_running("head")
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        return
                    last = r.status
            except (urllib.error.URLError, OSError) as e:
                last = e
            time.sleep(1)
        raise TimeoutError(
            f"the head's Jobs API did not come up in {timeout} s (last answer: {last!r})\n"
            + self.logs_tail("head")
        )

    def wait_for_metrics(self, name: str, timeout: float = 120) -> None:
        """Wait until node ``name``'s metrics agent serves Ray's own metrics.

        A process connects its metrics exporter to the agent once, at start, and gives up
        (exporting nothing) if the agent is not up within a few retries: a driver that
        must be seen in Prometheus connects after this."""
        deadline, last = time.time() + timeout, None
        url = f"http://127.0.0.1:{self.metrics_ports[name]}/metrics"
        while time.time() < deadline:
            self._check_running(name)
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    text = r.read().decode()
                if "\nray_" in text:
                    return
                last = "no ray_ metric yet"
            except (urllib.error.URLError, OSError) as e:
                last = e
            time.sleep(1)
        raise TimeoutError(
            f"node {name}'s metrics agent did not serve in {timeout} s (last: {last!r})\n"
            + self.logs_tail(name)
        )

    def logs_tail(self, name: str, chars: int = 3000) -> str:
        """The end of node ``name``'s `ray start` output and of its dashboard's log."""
        temp = self.tmp if name == "head" else os.path.join(self.tmp, name)
        out = []
        for f in (
            Path(self.tmp, f"ray-start-{name}.log"),
            Path(temp, "session_latest", "logs", "dashboard.log"),
        ):
            if f.exists():
                out.append(f"--- {f}\n{f.read_text(errors='replace')[-chars:]}")
        env = {k: (v if len(v) < 200 else f"<{len(v)} chars>") for k, v in self.env.items()}
        ray_env = {k: v for k, v in env.items() if k.startswith(("RAY_", "AWS_", "FSSPEC"))}
        return "\n".join([*out, f"--- the nodes' Ray/AWS environment: {ray_env}"])

    def own_pids(self) -> list[int]:
        """Processes of this cluster: its temp dir in their argv, or as their working dir."""
        pids = []
        for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
            if p.info["pid"] == os.getpid():
                continue
            argv = " ".join(p.info["cmdline"] or [])
            if self.tmp in argv or (p.info["cwd"] or "").startswith(self.tmp):
                pids.append(p.info["pid"])
        return pids

    def stop(self) -> None:
        # SIGTERM to the workers' `ray start --block` first, the head last; then SIGKILL.
        for name in sorted(self.nodes, key=lambda n: n == "head"):
            proc = self.nodes[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in self.nodes.values():
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            for pid in self.own_pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        for proc in self.nodes.values():
            proc.wait(timeout=10)
        left = self.own_pids()
        for cap in self.caps.values():
            with contextlib.suppress(OSError):  # held by a process left: asserted below
                cap.remove()
        shutil.rmtree(self.tmp, ignore_errors=True)
        assert not left, f"processes of the test's Ray cluster still alive: {left}"


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """A head (0 CPUs, the Jobs API) and worker nodes ``a`` and ``b`` (2 CPUs each).

    The nodes' environment carries the S3 test server's credentials: run data and
    ``run_dir`` go through the bucket, as on a cluster whose nodes share no disk.
    """
    from s3_server import clean_env

    cluster = LocalCluster(clean_env(PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="1"))
    try:
        cluster.add_node("a")
        cluster.add_node("b")
        yield cluster
    finally:
        cluster.stop()
