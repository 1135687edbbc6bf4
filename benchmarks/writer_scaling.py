"""The commit path on a cluster: rows/s on 1 and 2 worker nodes under one driver, and where
each node's CPU goes.

The commit ceiling's stand-ins (`commit_ceiling.py`: an actor that scores nothing, a decode
task that reads the tar and decodes nothing) on a real Ray cluster on 127.0.0.1
(`tests/ray_cluster.py`): a head with no CPUs of its own, as on KubeRay, and N worker nodes,
each a raylet of its own pinned to one core of this machine, as a machine brings its own
CPU. The driver and the head run on core 0, which a second node shares on a 2-core machine.
With ``--node-share F`` each node is instead held to F of a core (a CPU cgroup) on the cores
the driver does not use, so that N nodes have N times one node's CPU and none of the
driver's even on 2 cores. The actors stage their rows and each node's committer merges
them, so rows/s should grow with the nodes wherever the nodes are the limit; the processes
seen per node show whether Ray kept starting workers (1 to 2 s of CPU each).

    python benchmarks/writer_scaling.py                          # 112 px, 1 then 2 nodes
    python benchmarks/writer_scaling.py --sources 112 512 --repeat 2 --scale 2
    python benchmarks/writer_scaling.py --node-share 0.45 --repeat 2   # root: cgroups

Each configuration gets a fresh cluster; ``--repeat`` alternates them (1, 2, 1, 2 nodes).
Rows/s are counted from the first commit to the last; "CPU by node" is the CPU time of each
node's processes (raylet, agents, workers) over the run, "most CPU" the largest by what the
process was running (a worker between tasks is ``ray::IDLE``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import psutil
from commit_ceiling import POOLS, InstantScorer, make_ceiling_pool, read_only
from harness import cpu_model, label_run, make_checkpoint

from fiqa.config import ScoringConfig

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))  # the test bed's cluster

from ray_cluster import CpuCap, LocalCluster  # noqa: E402

DRIVER_CORE = 0


def node_cores(nodes: int, share: float | None = None) -> list[set[int]]:
    """Without a share, one core per node: cores 1, 2, ... then round to core 0 (the
    driver's) and on. With one, every node on all the cores but the driver's."""
    n = os.cpu_count() or 1
    if share:
        return [set(range(n)) - {DRIVER_CORE}] * nodes
    return [{(1 + i) % n} for i in range(nodes)]


class NodeCpu:
    """CPU seconds of each node's processes over a run, by what each was running: sampled
    every ``every`` s, each process's CPU since the last sample counted under its title then
    (``ray::<task or actor>``; a worker between tasks is ``ray::IDLE``)."""

    def __init__(self, cluster: LocalCluster, every: float = 0.1):
        self.cluster, self.every = cluster, every
        self.last: dict[int, float] = {}
        self.spent: dict[tuple[str, str], float] = {}
        self.pids: dict[str, set[int]] = {}  # every process of each node seen
        self.ran: dict[str, set[str]] = {}  # node -> what its processes were seen running
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, count: bool = True) -> None:
        for name, proc in list(self.cluster.nodes.items()):
            try:
                tree = [psutil.Process(proc.pid)]
                tree += tree[0].children(recursive=True)
            except psutil.Error:
                continue
            for p in tree:
                try:
                    t = p.cpu_times()
                    argv = p.cmdline()
                except psutil.Error:
                    continue
                cpu = t.user + t.system
                title = daemon_title(argv)
                if count:
                    key = (name, title.split(" ")[0])
                    self.spent[key] = self.spent.get(key, 0.0) + cpu - self.last.get(p.pid, 0.0)
                self.last[p.pid] = cpu
                self.pids.setdefault(name, set()).add(p.pid)
                self.ran.setdefault(name, set()).add(title.split(" ")[0].split(".")[0])

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> NodeCpu:
        self._sample(count=False)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_node(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (name, _), cpu in self.spent.items():
            out[name] = out.get(name, 0.0) + cpu
        return out


def daemon_title(argv: list[str]) -> str:
    """``ray::<task>`` for a worker; the program (or Python script) for Ray's daemons."""
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0]
    prog = os.path.basename(argv[0])
    if prog.startswith("python") and len(argv) > 1:
        prog = os.path.basename(argv[1] if argv[1] != "-m" else argv[2])
    return prog


def nodes_running(ran: dict[str, set[str]], title: str) -> list[str]:
    return sorted(n for n, titles in ran.items() if any(t.startswith(title) for t in titles))


def run_on(nodes: int, shards: list[str], rows: int, ckpt: str, work: Path, args) -> dict:
    """One run on a fresh cluster of ``nodes`` worker nodes: rows/s, driver CPU, CPU by node."""
    # the nodes' workers import the stand-ins from this directory
    paths = [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    cluster = LocalCluster(env, object_store_mb=args.object_store_mb, head_cores={DRIVER_CORE})
    try:
        for i, cores in enumerate(node_cores(nodes, args.node_share)):
            cluster.add_node(f"n{i}", cpus=args.node_cpus, cores=cores, cpu_share=args.node_share)
        cfg = ScoringConfig(
            batch_size=args.batch_size, concurrency=nodes, num_cpus=0.5, num_gpus=0.0
        )
        with NodeCpu(cluster) as cpu:
            run = label_run(
                ckpt, shards, work / "out", cfg, scorer=InstantScorer, decode=read_only,
                address=cluster.gcs_address,
            )  # fmt: skip
        throttled = {name: cap.throttled() for name, cap in cluster.caps.items()}
    finally:
        cluster.stop()
    if run.stats["shards"] != len(shards) or run.images != rows:
        raise SystemExit(f"{nodes} node(s): not every row committed: {run.stats}")
    steady = run.commit_times
    if len(steady) < 3:
        raise SystemExit(f"{len(steady)} commit(s): too few shards to time (raise --scale)")
    span = steady[-1] - steady[0]
    after = len(steady) - 1
    rate = after * run.images / len(shards) / span
    busy = (run.commit_cpu_times[-1] - run.commit_cpu_times[0]) / span
    mib = after * sum(os.path.getsize(s) for s in shards) / len(shards) / 2**20 / span
    return {"nodes": nodes, "rows_s": rate, "mib_s": mib, "driver_busy": busy,
            "driver_ms_per_1000": 1e6 * busy / rate, "seconds": run.seconds, "rows": run.images,
            "cpu_by_node": cpu.by_node(), "by_title": cpu.spent,
            "processes": {k: len(v) for k, v in cpu.pids.items()}, "throttled": throttled,
            "actors_on": nodes_running(cpu.ran, "ray::MapWorker("),
            "committers_on": nodes_running(cpu.ran, "ray::ShardCommitter")}  # fmt: skip


def describe(source: int, r: dict, share: float | None) -> str:
    """A run's lines: rows/s, the driver's CPU, each node's CPU and processes, the top users."""
    cores = ", ".join(",".join(map(str, sorted(c))) for c in node_cores(r["nodes"], share))
    held = f", each held to {share:g} of a core" if share else ""
    by_node = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(r["cpu_by_node"].items()))
    procs = ", ".join(f"{k} {v}" for k, v in sorted(r["processes"].items()))
    throttled = "".join(
        f"; {k} out of its share in {100 * v:.0f} % of periods"
        for k, v in sorted(r["throttled"].items())
    )
    top = sorted(r["by_title"].items(), key=lambda kv: -kv[1])[:6]
    return (
        f"{source} px, {r['nodes']} node(s) on core(s) {cores}{held}: {r['rows']:,} rows, "
        f"{r['rows_s']:,.0f} rows/s, {r['mib_s']:.1f} MiB/s after the first commit; driver "
        f"{r['driver_ms_per_1000']:.1f} ms CPU per 1,000 rows (busy {100 * r['driver_busy']:.0f} %)\n"
        f"    scoring actors on {', '.join(r['actors_on'])}; shard committers on "
        f"{', '.join(r['committers_on']) or 'none seen'}\n"
        f"    CPU by node: {by_node}; processes seen: {procs}{throttled}\n"
        f"    most CPU: " + ", ".join(f"{n} {t} {v:.1f} s" for (n, t), v in top)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", type=int, nargs="+", default=[112], choices=sorted(POOLS))
    p.add_argument("--scale", type=float, default=2.0, help="multiply the pools' sizes")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=1, help="runs of each node count, alternated")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--node-cpus", type=int, default=2, help="logical CPUs each node declares")
    p.add_argument("--object-store-mb", type=int, default=1024, help="each node's")
    p.add_argument(
        "--node-share", type=float, help="hold each node to this share of a core (cgroups)"
    )
    args = p.parse_args()
    cores = os.cpu_count() or 1
    if cores < 2:
        sys.exit("writer_scaling.py needs 2 cores or more: one node per core")
    if args.node_share is not None:
        if not CpuCap.available():
            sys.exit("--node-share needs a writable cgroup CPU controller (run as root)")
        if not 0 < args.node_share * max(args.nodes) <= cores - 1:
            sys.exit(
                f"--node-share {args.node_share} x {max(args.nodes)} nodes must fit the "
                f"{cores - 1} core(s) beside the driver's"
            )
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_AUTH_MODE"] = "disabled"  # as the cluster's nodes run (tests/ray_cluster.py)
    print(f"# {cpu_model()}, {os.cpu_count()} CPUs; driver and head on core {DRIVER_CORE}")
    work = Path(tempfile.mkdtemp(prefix="fiqa-writers-"))
    try:
        ckpt = make_checkpoint("mobilenetv3_small_100", work / "model")
        for source in args.sources:
            shards, rows = make_ceiling_pool(work, source, args.scale)
            runs: dict[int, list[dict]] = {}
            # the driver's threads (Ray's included, started by ray.init) inherit its core
            os.sched_setaffinity(0, {DRIVER_CORE})
            try:
                for _ in range(args.repeat):
                    for nodes in args.nodes:
                        r = run_on(nodes, shards, rows, ckpt, work, args)
                        runs.setdefault(nodes, []).append(r)
                        print(describe(source, r, args.node_share), flush=True)
            finally:
                os.sched_setaffinity(0, range(os.cpu_count() or 1))
            base = min(args.nodes)
            mean = {k: sum(r["rows_s"] for r in v) / len(v) for k, v in runs.items()}
            for nodes in sorted(mean):
                print(f"  {source} px: {nodes} node(s) {mean[nodes]:,.0f} rows/s, "
                      f"{mean[nodes] / mean[base]:.2f}x of {base} node(s)")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
