"""One CLI convention for every command (fiqa/cli/options.py), checked on the parser itself.

Light: no Ray. Walks every subcommand's options: each has help text, a flag means the
same and is spelled the same everywhere, old spellings are hidden aliases; `--version`;
`fiqa label` with a missing model fails in well under 2 s (before torch or Ray); a
checkpoint named by its weights file works as its directory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fiqa.cli import build_parser, main
from fiqa.cli.options import DEPRECATED

REPO = Path(__file__).resolve().parents[1]
# The commands that read a run config, or sections of one: each takes --set.
CONFIG_COMMANDS = {"run", "stage", "status", "submit", "label"}
# Old spellings no command may show: the convention's spelling instead.
RETIRED = {"--out": "--output", "--batch": "--batch-size", "--max-pixels": "--max-image-pixels"}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def visible(action: argparse.Action, command: str) -> list[str]:
    hidden = getattr(action, "deprecated_aliases", ())
    return [o for o in action.option_strings if o not in hidden]


def test_every_option_of_every_command_has_help():
    for name, s in subcommands().items():
        assert s.description or s.format_usage(), name
        for a in s._actions:
            what = f"fiqa {name} {'/'.join(a.option_strings) or a.metavar or a.dest}"
            if a.help == argparse.SUPPRESS:  # only an old spelling may be hidden
                assert all((name, o) in DEPRECATED for o in a.option_strings), what
                assert a.option_strings or (name, a.dest) in DEPRECATED, what
                continue
            assert a.help and a.help.strip(), f"{what}: no help text"


def test_shared_flags_are_spelled_and_behave_the_same():
    seen: dict[str, tuple] = {}  # long flag -> (its spellings, takes a value, repeatable)
    for name, s in subcommands().items():
        for a in s._actions:
            if a.help == argparse.SUPPRESS or not a.option_strings:
                continue
            flags = visible(a, name)
            for retired, instead in RETIRED.items():
                assert retired not in flags, f"fiqa {name} shows {retired}; use {instead}"
            shape = (tuple(flags), a.nargs != 0, isinstance(a, argparse._AppendAction))
            for flag in flags:
                if flag.startswith("--"):
                    before = seen.setdefault(flag, shape)
                    assert before == shape, f"fiqa {name} {flag}: {shape} elsewhere {before}"
            if a.dest == "output":
                assert flags == ["-o", "--output"], f"fiqa {name}: output as {flags}"
            if "batch" in a.dest:
                assert flags == ["--batch-size"], f"fiqa {name}: {flags}"
        flags = {o for a in s._actions for o in a.option_strings}
        assert {"-v", "--verbose", "-h"} <= flags, name
        assert ("--set" in flags) == (name in CONFIG_COMMANDS), name
        # the model is always the first argument
        positionals = [a.dest for a in s._actions if not a.option_strings]
        if "model" in positionals:
            assert positionals.index("model") == 0, name


def test_label_flags_are_named_after_the_config_keys_they_set():
    from fiqa.cli.label import SHORTCUTS, label_config

    p = build_parser()
    s = subcommands()["label"]
    for dest, key in SHORTCUTS.items():
        (a,) = [a for a in s._actions if a.dest == dest]
        if a.help != argparse.SUPPRESS:
            assert visible(a, "label") == ["--" + key.split(".")[1].replace("_", "-")]
            assert a.help.startswith(key), (dest, a.help)

    args = p.parse_args(["label", "m", "a.tar", "-o", "out", "--batch-size", "8"])
    cfg = label_config(args)
    assert cfg["scoring"].batch_size == 8 and cfg["data"].max_image_pixels == 40_000_000
    argv = ["label", "m", "a.tar", "b.tar", "-o", "out", "--concurrency", "2,8"]
    argv += ["--pin-cores", "no", "--min-image-side", "32", "--batch-size", "8"]
    argv += ["--set", "scoring.batch_size=16", "--set", "scoring.precision=32-true"]
    argv += ["--set", "storage.region=eu-west-1", "--set", "ray.num_cpus=3"]
    args = p.parse_args(argv)
    assert args.model == "m" and args.inputs == ["a.tar", "b.tar"]
    cfg = label_config(args)
    sc = cfg["scoring"]
    assert (sc.batch_size, sc.concurrency, sc.pin_cores, sc.precision) == (
        16,
        [2, 8],
        False,
        "32-true",
    )
    assert cfg["data"].min_image_side == 32 and cfg["storage"].region == "eu-west-1"
    assert cfg["ray"].num_cpus == 3
    # old spellings still parse, into the same keys
    old = ["label", "--model", "m", "--input", "a.tar", "--out", "o", "--max-pixels", "7"]
    args = p.parse_args([*old, "--num-cpus-total", "2"])
    assert (args.model_flag, args.input_flag, args.output) == ("m", ["a.tar"], "o")
    cfg = label_config(args)
    assert cfg["data"].max_image_pixels == 7 and cfg["ray"].num_cpus == 2
    for bad, says in (
        ("train_teacher.lr=1", "fiqa label reads scoring.*"),
        ("data.test=x", "data.test"),
        ("scoring.batch_size=0", "scoring.batch_size: must be >= 1"),
        ("scoring.no_such_key=1", "unknown key scoring.no_such_key"),
    ):
        args = p.parse_args(["label", "m", "a.tar", "-o", "o", "--set", bad])
        with pytest.raises(ValueError, match=re_escape(says)):
            label_config(args)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("fiqa ") and len(out) > len("fiqa "), out


def test_old_spellings_parse_and_say_what_to_use(tmp_path, capsys):
    p = build_parser()
    assert p.parse_args(["make-demo-data", "data/x"]).output_dir == "data/x"  # k8s overlays
    assert p.parse_args(["make-demo-data", "-o", "data/x"]).output == "data/x"
    assert p.parse_args(["predict", "m", "a.jpg", "--out", "x.csv"]).output == "x.csv"
    args = p.parse_args(["export", "m", "--format", "onnx", "--out", "x.onnx", "--batch", "3"])
    assert (args.output, args.batch_size) == ("x.onnx", 3)
    argv = ["label", "--model", str(tmp_path / "none"), "--input", "a.tar", "--output", "o"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--model is deprecated; use MODEL" in err and "--input is deprecated" in err
    assert "no checkpoint at" in err
    assert main(["label", "-o", "o"]) == 2
    assert "give the MODEL, then at least one INPUT" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["label", "/nonexistent/model", "{in}", "-o", "{out}"],
        ["label", "--model", "/nonexistent", "--input", "{in}", "--output", "{out}"],
        ["predict", "/nonexistent/model.safetensors", "{in}"],
        ["export", "/nonexistent/model", "--format", "onnx", "-o", "{out}.onnx"],
    ],
    ids=["label", "label-old-flags", "predict", "export"],
)
def test_a_missing_model_fails_fast(tmp_path, argv):
    """Checked before torch, Ray or anything heavy is imported: well under 2 s."""
    shard = tmp_path / "a.tar"
    shard.write_bytes(b"")
    argv = [a.format(**{"in": shard, "out": tmp_path / "out"}) for a in argv]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fiqa.cli", *argv], capture_output=True, text=True, cwd=REPO
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    assert "fiqa: error: no checkpoint at '/nonexistent" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert seconds < 2.0, f"{seconds:.1f} s to say the model is missing"
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from fiqa.models import create_model, save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "model"
    arch = "mobilenetv3_small_100"
    save_checkpoint(
        str(path), create_model(arch, 64), {"arch": arch, "image_size": 64, "resize": 72}
    )
    return path


def test_a_checkpoint_named_by_its_weights_file_is_its_directory(checkpoint, tmp_path):
    import numpy as np

    from fiqa.models.checkpoint import load_checkpoint
    from fiqa.models.meta import checkpoint_dir, read_meta
    from fiqa.models.predictor import model_kind, open_predictor

    d = str(checkpoint)
    for f in ("model.safetensors", "model.json"):
        named = f"{d}/{f}"
        assert checkpoint_dir(named) == d
        assert read_meta(named) == read_meta(d)
        assert model_kind(named) == "checkpoint"
    assert checkpoint_dir(d) == d and checkpoint_dir("s3://b/m/model.json") == "s3://b/m"
    assert load_checkpoint(f"{d}/model.safetensors").info.arch == "mobilenetv3_small_100"
    pixels = np.zeros((2, 64, 64, 3), np.uint8)
    raw_file, _ = open_predictor(f"{d}/model.safetensors", "cpu")(pixels)
    raw_dir, _ = open_predictor(d, "cpu")(pixels)
    assert np.allclose(raw_file, raw_dir)
    # a file that is not a checkpoint's says so, rather than NotADirectoryError
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="is a file, not a checkpoint directory"):
        read_meta(str(other))


@pytest.mark.parametrize(
    "command",
    [["make-demo-data"], ["shard", "--images", "imgs", "--labels", "s.csv"]],
    ids=["make-demo-data", "shard"],
)
def test_a_bucket_as_output_is_refused_not_made_a_local_folder(
    command, tmp_path, monkeypatch, capsys
):
    """Both write local shards; `-o s3://b/x` once made ./s3:/b/x and failed in webdataset."""
    monkeypatch.chdir(tmp_path)
    assert main([*command, "-o", "s3://bucket/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fiqa: error: -o 's3://bucket/x': shards are written to a local ")
    assert err.endswith("e.g. `aws s3 sync DIR s3://bucket/x`\n") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_an_os_error_a_path_causes_is_one_line_naming_it(tmp_path, capsys):
    """A NotADirectoryError from deep in `fiqa shard` (-o under a file), without a traceback."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "s.csv").write_text("a.jpg,3.2\n")
    out = tmp_path / "s.csv" / "shards"
    argv = ["shard", "--images", str(tmp_path / "imgs"), "--labels", str(tmp_path / "s.csv")]
    assert main([*argv, "-o", str(out)]) == 2
    assert capsys.readouterr().err == f"fiqa: error: {out}: not a directory\n"


def test_a_bad_calibration_file_names_the_flag_and_the_file(checkpoint, tmp_path, capsys):
    from fiqa.calibration import Logistic4
    from fiqa.cli.label import read_calibration

    shard = tmp_path / "a.tar"
    shard.write_bytes(b"")

    def label(calibration) -> str:
        argv = ["label", str(checkpoint), str(shard), "-o", str(tmp_path / "out")]
        assert main([*argv, "--calibration", str(calibration)]) == 2
        return capsys.readouterr().err

    missing = tmp_path / "none.json"
    assert label(missing) == f"fiqa: error: --calibration {missing}: not found\n"
    assert "a directory; give a JSON file" in label(tmp_path)
    bad = tmp_path / "cal.json"
    for text in ("b1=1", '{"b1": 1, "b2": 2}', "[1, 2, 3, 4]", '{"calibration": null}'):
        bad.write_text(text)
        assert label(bad).startswith(f"fiqa: error: --calibration {bad}: not JSON with b1..b4")
    assert not (tmp_path / "out").exists()
    bad.write_text('{"b1": 5, "b2": 0.5, "b3": 1, "b4": 2}')
    assert read_calibration(str(bad)) == Logistic4(5.0, 0.5, 1.0, 2.0)
    bad.write_text('{"arch": "x", "calibration": {"b1": 5, "b2": 0.5, "b3": 1, "b4": 2}}')
    assert read_calibration(str(bad)) == Logistic4(5.0, 0.5, 1.0, 2.0)


def test_a_missing_relative_input_says_where_it_was_looked_for(
    checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert main(["label", str(checkpoint), "shards/a.tar", "-o", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"fiqa: error: INPUT: shard 'shards/a.tar' does not exist (looked for "
        f"{os.getcwd()}/shards/a.tar: a relative path resolves from the working directory)\n"
    )


# ---------------------------------------------------------------------------
# `fiqa submit`'s job launcher: the cluster's interpreter, or what it lacks


def test_the_launcher_finds_the_ray_workers_python_from_their_memory_maps():
    from fiqa.cluster.job_launcher import python_of_raylet_maps, ray_worker_python

    line = "7f0-7f1 r-xp 0 08:01 42  /opt/venv/lib/python3.11/site-packages/ray/_raylet.so"
    assert python_of_raylet_maps("junk\n" + line) == [
        "/opt/venv/bin/python3.11",
        "/opt/venv/bin/python3",
        "/opt/venv/bin/python",
    ]
    assert python_of_raylet_maps("/usr/lib/x86_64-linux-gnu/libc.so.6") == []
    if not Path("/proc/self/maps").exists():
        pytest.skip("no /proc")
    # a process that loaded Ray's extension (without starting Ray): its environment's python
    child = subprocess.Popen(
        [sys.executable, "-c", "import ray._raylet, sys; print(1, flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "1"
        found = ray_worker_python(child.pid)
    finally:
        child.communicate("")
    assert found and Path(found).parent == Path(sys.executable).parent, found
    assert ray_worker_python(os.getpid(), depth=0) is None


def test_the_launcher_runs_fiqa_or_names_what_is_missing(tmp_path, monkeypatch, capsys):
    from fiqa.cluster import job_launcher, submit

    runtime_env = submit.build_runtime_env({"run_dir": "x"}, tmp_path)
    launcher = Path(runtime_env["working_dir"]) / submit.LAUNCHER
    assert submit.entrypoint(None) == f"python3 {submit.LAUNCHER} run config.yaml"
    assert submit.entrypoint(None, until="pseudo_label_1").endswith(
        "run config.yaml --until pseudo_label_1"
    )
    assert submit.submission_base_id("s3://b/run", None, "pseudo_label_1").startswith(
        "fiqa-run-until-pseudo-label-1-"
    )
    proc = subprocess.run(
        [sys.executable, str(launcher), "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.startswith("fiqa "), proc.stderr
    assert job_launcher.missing_modules(sys.executable, ("json", "no_such_mod")) == ["no_such_mod"]

    monkeypatch.setattr(job_launcher, "ray_worker_python", lambda: None)
    monkeypatch.setattr(job_launcher.sys, "executable", "/usr/bin/python-without-deps")
    assert job_launcher.main(["run", "config.yaml"]) == 1
    err = capsys.readouterr().err
    assert "/usr/bin/python-without-deps (the head's python3 on its PATH" in err
    assert "cannot import fiqa, ray, torch" in err and "ray start --head" in err
