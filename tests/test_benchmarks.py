"""The benchmarks still run against the code they measure: each script once, on a tiny pool.

What they print is checked for shape and bookkeeping (every method reports a rate, the
pipeline accounts for every image of both memory pools), never for speed: timings belong
in the benchmarks' own output (`benchmarks/RESULTS.md`), not in a test on a shared machine.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RATE = r"([0-9]+\.[0-9])"


def run_benchmark(script: str, *args: str) -> str:
    env = subprocess_env()
    env.pop("RAY_ADDRESS", None)  # each script starts a local Ray of its own
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=420,
        env=env,
        cwd=BENCHMARKS.parent,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_label_throughput_runs_every_method_and_accounts_for_both_pools(tmp_path):
    out = run_benchmark(
        "label_throughput.py",
        "--models", "student",
        "--synthetic", "1024",  # 2 shards of 512
        "--naive-images", "16",
        "--memory-scale", "2",
        "--batch-size", "32",
        "--work", str(tmp_path),
    )  # fmt: skip
    assert "pool: synthetic, 2 shards, 1024 images" in out
    line = re.search(
        rf"\(a\) model-only +{RATE} +\(b\) naive +{RATE} +\(c\) DataLoader +{RATE} +"
        rf"\(d\) pipeline +{RATE} img/s +d/a ([0-9.]+) +d/b ([0-9.]+) +d/c ([0-9.]+)",
        out,
    )
    assert line, out
    a, b, c, d, d_a, d_b, d_c = map(float, line.groups())
    assert min(a, b, c, d) > 0
    assert d_a == pytest.approx(d / a, abs=0.006)
    assert d_c == pytest.approx(d / c, abs=0.006)
    assert d_b == pytest.approx(d / b, abs=0.06)
    # Under 16 shards there is no steady middle, and the script says so rather than guess.
    assert "n/a (2 shards; it needs 16 or more)" in out
    # The memory runs label the 1x pool (one shard) and the pool twice over, every image.
    assert re.search(r"peak memory: 512 images [0-9.]+ GB, 1024 images [0-9.]+ GB", out), out


def test_label_startup_times_a_run_to_its_last_commit():
    out = run_benchmark("label_startup.py", "--synthetic", "1024")
    assert "2 shards, 1024 images" in out
    events = {}
    for name in ("first decode task starts", "first shard committed", "last shard committed"):
        m = re.search(rf"([0-9.]+) s +{name}", out)
        assert m, out
        events[name] = float(m.group(1))
    assert 0 < events["first shard committed"] <= events["last shard committed"]
    assert "last shard committed (2 shards)" in out


def test_model_cost_reports_both_demo_models():
    from fiqa.models import create_model

    out = run_benchmark("model_cost.py", "--repeats", "1")
    row = r"^(teacher|student) +(\S+) +(\d+) +([0-9.]+)"
    rows = {m.group(1): m for m in re.finditer(row, out, re.M)}
    assert set(rows) == {"teacher", "student"}, out
    for m in rows.values():
        arch, px, params = m.group(2), int(m.group(3)), float(m.group(4))
        counted = sum(p.numel() for p in create_model(arch, px).parameters()) / 1e6
        assert params == pytest.approx(counted, abs=0.006)
    assert "student/teacher: params" in out


def test_train_throughput_times_every_epoch_of_each_loop(tmp_path):
    figures = tmp_path / "train.json"
    out = run_benchmark(
        "train_throughput.py",
        "--rows", "128",
        "--epochs", "2",
        "--workers", "1",
        "--batch-size", "16",
        "--json", str(figures),
    )  # fmt: skip
    assert "| Ray Train, 1 worker(s) |" in out
    result = json.loads(figures.read_text())
    assert result["steady_images_per_s"]["plain"] > 0
    assert result["steady_images_per_s"]["ray_1"] > 0
    assert len(result["runs"]["ray_1"]["epochs"]) == 2


def test_label_gpu_refuses_a_machine_without_a_gpu_and_runs_on_cpu_when_allowed(tmp_path):
    import torch

    if not torch.cuda.is_available():
        env = subprocess_env()
        proc = subprocess.run(
            [sys.executable, str(BENCHMARKS / "label_gpu.py")],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=BENCHMARKS.parent,
        )
        assert proc.returncode != 0
        assert "no CUDA GPU here" in proc.stderr
    figures = tmp_path / "label_gpu.json"
    out = run_benchmark(
        "label_gpu.py",
        "--allow-cpu",
        "--source-size", "96",
        "--images", "512",
        "--copies", "2",  # 2 shards, the second with its keys prefixed
        "--teacher-shards", "1",
        "--compile-models",  # none: nothing compiled on a CPU
        "--tasks-baseline", "student",  # the decode-in-tasks run for one model (time)
        "--seconds", "0.2",
        "--json", str(figures),
        "--work", str(tmp_path / "work"),
    )  # fmt: skip
    assert "pool: 2 shards, 1024 synthetic 96 px JPEGs" in out
    result = json.loads(figures.read_text())
    assert set(result["models"]) == {"teacher", "student"}
    for role, m in result["models"].items():
        bound = {k: v for k, v in m["bound"].items() if k.startswith("eager")}
        assert len(bound) == 2 and all(v["images_per_s"] > 0 for v in bound.values()), role
        assert m["a"] == max(v["images_per_s"] for v in bound.values())  # (a'), (d) at the best
        assert all(v["mos_error"] < 1e-6 for v in bound.values())  # fp32 against fp32 on a CPU
        assert m["actor_only"]["pixels"] > 0 and m["actor_only"]["bytes"] > 0
        assert m["decode"]["cpu_one_core"] > 0 and m["decode"]["device"] > 0
        runs = m["pipelines"]
        # decoding in the actors, then (the student) in the tasks
        assert [k.split(",")[0] for k in runs] == (
            ["decode in actor", "decode in tasks"] if role == "student" else ["decode in actor"]
        ), runs.keys()
        images = 512 if role == "teacher" else 1024  # the teacher's pool: --teacher-shards 1
        for name, d in runs.items():
            # Every image is scored: the copy's keys are distinct, none is a duplicate.
            assert (d["images"], d["rejected"]) == (images, 0), name
            assert d["max_decode_tasks"] >= 1, name  # the decode tasks were seen running
            assert 20 <= d["decode_task_peak_mib"] <= d["decode_task_reserved_mib"], name
            s = d["startup"]
            assert s["actor_start"] <= s["actor_ready (loaded, warmed up)"], name
            assert s["first_batch_arrives"] <= s["first_batch_scored"] <= s["first_commit"], name
    assert "n/a (2 shards; it needs 16 or more)" in out


def test_decode_admission_counts_the_decode_tasks_of_each_buffer(tmp_path):
    out = run_benchmark(
        "decode_admission.py",
        "--crop", "224",
        "--batch-size", "256",  # one batch per block, as at 448 px with 64
        "--cpus", "4",
        "--rate", "4000",
        "--images", "512",
        "--copies", "2",
        "--source-size", "64",
        "--buffer-mb", "0", "256",
        "--work", str(tmp_path),
    )  # fmt: skip
    assert "a local Ray of 4 logical CPUs: 1 stand-in actor at 4000 img/s, 3 CPUs" in out
    assert "2 shards, 1024 JPEGs of 64 px decoded to 224 px, blocks of 256 rows" in out
    from fiqa.config import ScoringConfig
    from fiqa.scoring.stream import stream_buffer_bytes

    lines = re.findall(
        r"stream buffer +(\d+) MiB( \(default\))? *: decode tasks at once n/a in steady state "
        r"\(2 shards; it needs 16 or more\), at most (\d+) of (\d+), each at most (\d+) MiB "
        r"\(USS; reserved (\d+) MiB\) .* (\d+) images in "
        r"[0-9.]+ s, (\d+) rejected",
        out,
    )
    assert len(lines) == 2, out
    (default_mib, default, peak, slots, task_mib, reserved, n, rejected), (mib, plain, *_) = lines
    assert default and not plain and mib == "256"
    # The bound the engine logged: 3 decode tasks beside the actor, 16/3 blocks of 256 each.
    cfg = ScoringConfig(batch_size=256)
    expected = stream_buffer_bytes(cfg, 224, decode_tasks=3, actors=1)
    assert (int(default_mib), slots) == (round(expected / 2**20), "3")
    assert 1 <= int(peak) <= 3  # the decode tasks were seen running, never more than the CPUs
    assert int(task_mib) >= 20  # and measured: a Ray worker with numpy, pyarrow, its blocks
    assert int(task_mib) <= int(reserved)  # within what it reserved (sized for its blocks)
    assert (int(n), int(rejected)) == (1024, 0)


def test_commit_ceiling_commits_every_row_and_profiles_the_driver():
    # 112 px only: the 512 px pool is slow to draw and runs the same code
    out = run_benchmark("commit_ceiling.py", "--scale", "0.1", "--sources", "112")
    head = r"112 px sources, up to 8 shard.s. a decode task, 32 MB blocks: 256 rows"
    line = re.search(rf"{head}, .*: ([0-9,]+) rows/s, {RATE} MiB/s", out)
    assert line and int(line[1].replace(",", "")) > 0, out
    shares = [float(s) for s in re.findall(r"([0-9.]+) % of the driver's time", out)]
    assert len(shares) == 3 and all(0 <= s <= 100 for s in shares), out


def test_commit_ceiling_fits_the_driver_cost_over_paced_runs():
    # 32 px at this scale: 3 copies of 2,048 + 409 rows, a shard a task, blocks of 1,024 rows
    out = run_benchmark(
        "commit_ceiling.py", "--scale", "0.3", "--sources", "32", "--batch-size", "1024",
        "--rates", "3000", "0",
    )  # fmt: skip
    name = "32 px sources, up to 8 shard(s) a decode task, 32 MB blocks"
    assert f"{name}, paced to 3,000 rows/s: 7371 rows" in out
    assert f"{name}, unpaced: 7371 rows" in out, out
    fit = re.search(
        r"batch 1024: driver busy = (-?[0-9.]+) % \+ (-?[0-9.]+) ms per 1,000 rows", out
    )
    assert fit, out


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="writer_scaling.py needs a core per node")
def test_writer_scaling_commits_on_the_nodes_that_staged_the_rows():
    from ray_cluster import CpuCap

    # 112 px at this scale: 10 copies of 2,048 rows in shards of 512, on 2 nodes only (time);
    # each node held to a share of a core where this machine lets a test make cgroups
    capped = CpuCap.available()
    share = ["--node-share", "0.45"] if capped else []
    out = run_benchmark("writer_scaling.py", "--scale", "1", "--nodes", "2", *share)
    held = ", each held to 0.45 of a core" if capped else ""
    head = rf"112 px, 2 node\(s\) on core\(s\) [0-9, ]+{held}: 20,480 rows"
    line = re.search(
        rf"{head}, ([0-9,]+) rows/s.*\n    scoring actors on (.*); shard committers on (.*)\n"
        r"    CPU by node: (.*)\n",
        out,
    )
    assert line and int(line[1].replace(",", "")) > 0, out
    # a committer on each node with CPUs; the head (no CPUs, as on KubeRay) runs neither
    actors, committers = line[2].split(", "), line[3].split(", ")
    assert committers == ["n0", "n1"] and "head" not in actors, out
    if capped:  # the cap bit: each node ran out of its share in some of its periods
        shares = re.findall(r"n[01] out of its share in ([0-9]+) % of periods", line[4])
        assert len(shares) == 2 and all(int(s) > 0 for s in shares), out
    assert re.search(r"112 px: 2 node\(s\) [0-9,]+ rows/s, 1.00x of 2 node", out), out


def test_label_scale_labels_each_key_once_and_resumes_only_what_is_left(tmp_path):
    report = tmp_path / "scale.json"
    out = run_benchmark(
        "label_scale.py", "--sizes", "1200", "2400", "--shard", "100", "--json", str(report)
    )
    assert "2x the images" in out and "resume: killed after" in out
    figures = json.loads(report.read_text())
    small, large = figures["runs"]
    assert (small["images"], large["images"]) == (1200, 2400)
    for run in figures["runs"]:
        assert run["scored"] + run["rejected"] == run["images"]  # checked key by key there
        assert run["driver_peak_mib"] > 0 and run["all_processes_peak_mib"] > 0
    resume = figures["resume"]
    assert 0 < resume["committed_before"] < resume["shards"]
    assert resume["rescored_shards"] == resume["shards"] - resume["committed_before"]


def _stand_in_faces(folder: Path) -> None:
    """Generated faces laid out as ../shared/data/real-faces is (``faceNNNNNN.jpg`` + ``.json``
    with an identity, shards of 40): the real ones are research-only and stay out of tests."""
    from fiqa.data.synthetic import make_sample

    from conftest import write_tar

    folder.mkdir()
    counts = {"ada": 20, "bo": 15, "cy": 45, "di": 40}  # test takes 20, labeled_val 15
    names = [name for name, n in counts.items() for _ in range(n)]
    for shard in range(0, len(names), 40):
        members = []
        for i in range(shard, min(shard + 40, len(names))):
            members.append((f"face{i:06d}.jpg", make_sample(7, "unlabeled_1", i).jpeg))
            members.append((f"face{i:06d}.json", json.dumps({"identity": names[i]}).encode()))
        write_tar(folder / f"faces-{shard // 40:04d}.tar", members)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_real_face_quality_builds_the_demo_layout_deterministically(tmp_path):
    import csv
    import statistics
    import tarfile

    from fiqa.data.reader import read_shard

    faces = tmp_path / "faces"
    _stand_in_faces(faces)
    sizes = ["labeled_train=30", "labeled_val=15", "test=20", "unlabeled_1=25", "unlabeled_2=25"]
    common = ["--faces", str(faces), "--seed", "3", "--shard-size", "16", "--sizes", *sizes]
    out = run_benchmark("real_face_quality.py", "build", "--out", str(tmp_path / "a"), *common)
    assert "test identities (1): ada" in out and "labeled_val identities (1): bo" in out
    assert "wrote 115 images" in out and "labels (MOS, all splits)" in out
    # Another number of processes, the same bytes: every sample is a function of its source.
    run_benchmark(
        "real_face_quality.py", "build", "--out", str(tmp_path / "b"), "--workers", "1", *common
    )
    built = _tree(tmp_path / "a")
    assert built == _tree(tmp_path / "b")

    root = tmp_path / "a"
    meta = json.loads((root / "dataset.json").read_text())
    want = dict(s.split("=") for s in sizes)
    assert {k: str(v) for k, v in meta["sizes"].items()} == want
    assert meta["label_field"] == "mos" and meta["identities"]["test"] == ["ada"]
    keys, labels, sources, identities = set(), [], set(), {}
    for split, n in want.items():
        shards = sorted((root / split).glob("*.tar"))
        assert [p.name for p in shards] == meta["splits"][split]
        assert [p.name for p in shards] == [f"{split}-{i:06d}.tar" for i in range(len(shards))]
        records = [r for p in shards for r in read_shard(str(p), require_label="unl" not in split)]
        assert len(records) == int(n) and all(r["reason"] is None for r in records), split
        split_keys = {r["key"] for r in records}
        assert not split_keys & keys  # keys unique across splits
        keys |= split_keys
        if "unl" in split:
            with open(root / "ground_truth" / f"{split}.csv") as f:
                truth = list(csv.DictReader(f))
            assert {t["key"] for t in truth} == split_keys
            labels += [float(t["mos"]) for t in truth]
        else:
            labels += [r["mos"] for r in records]
        identities[split] = set()
        for p in shards:
            with tarfile.open(p) as tar:
                for m in tar:
                    if m.name.endswith(".json"):
                        sample = json.loads(tar.extractfile(m).read())
                        identities[split].add(sample["identity"])
                        sources.add(sample["source"])
    assert len(sources) == len(keys) == 115  # each source image used at most once
    for held_out in ("test", "labeled_val"):
        others = set().union(*(ids for s, ids in identities.items() if s != held_out))
        assert identities[held_out] and not identities[held_out] & others, held_out
    assert min(labels) >= 1.0 and max(labels) <= 5.0
    assert max(labels) - min(labels) > 1.5 and statistics.pstdev(labels) > 0.3


def test_executor_cost_prints_the_driver_cpu_of_each_stream_shape():
    out = run_benchmark("executor_cost.py", "--blocks", "16", "--rounds", "1")
    shapes = re.findall(
        r"round 1: (\d+) tasks x (\d+) block\(s\), (\d+) actor tasks: .* ms a task", out
    )
    assert [(int(t), int(b)) for t, b, _ in shapes] == [(16, 1), (4, 4), (2, 8), (4, 1)], out
    assert all(1 <= int(a) <= int(t) * int(b) for t, b, a in shapes), out
