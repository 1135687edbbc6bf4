"""The console: Ray's known noise filtered (Python records, streamed lines, native writes),
the project's own lines kept, ``-v`` after the command, progress lines within an epoch."""

import logging
import os
import subprocess
import sys

from fiqa import console
from fiqa.cli import build_parser
from fiqa.training.progress import EpochProgress, duration, steps_per_epoch

from conftest import REPO

RAY_LINES = [
    "Reporting training result 3: TrainingReport(checkpoint=Checkpoint(filesystem=local, "
    "path=/r/checkpoint_1), metrics={'epoch': 3, 'train_loss': 0.7})",
    "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/r/checkpoint_1)",
    "Starting execution of Dataset train_0358_0. Full logs are in /tmp/ray/session/logs/ray-data",
    "Execution plan of Dataset train_0358_0: InputDataBuffer[Input] -> TaskPoolMapOperator[X]",
    "✔️  Dataset val_0_0358_1 execution finished in 0.36 seconds",
    "[2026-12-04 16:58:32,489 E 5680 5713] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: 'ea3a' has constructor arguments in the object store and "
    "max_restarts > 0. If the arguments in the object store go out of scope or are lost, ...",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current()."
    "enable_progress_bars = True`.",
    "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt "
    "out. For more information, see https://docs.ray.io/en/latest/ray-security/token-auth.html",
]
OWN_LINES = [
    "teacher epoch 3/10: loss 0.7725, val SRCC 0.7107 PLCC 0.7271 (18 steps, 171 img/s, 7s)",
    "[1/6] train_teacher: train the teacher on labeled faces",
    "Actor died: the Scorer on node 10.0.0.3 exited (max_restarts reached)",
]


def test_the_filter_drops_rays_known_noise_and_keeps_everything_else():
    assert all(console.is_noise(line) for line in RAY_LINES)
    assert not any(console.is_noise(line) for line in OWN_LINES)


def test_the_log_filter_on_rays_console_handlers():
    f = console.NoiseFilter()

    def record(msg):
        return logging.LogRecord("ray.data", logging.WARNING, __file__, 1, msg, None, None)

    assert not f.filter(record(RAY_LINES[-1]))
    assert f.filter(record("Warning: The Ray cluster currently does not have any available CPUs."))


def test_the_token_auth_notice_of_a_local_ray_is_dropped_where_it_is_logged(monkeypatch):
    monkeypatch.setattr(console, "_verbose", False)
    console.quiet_ray_in_driver()
    name = "ray._private.authentication.authentication_token_setup"
    auth = logging.getLogger(name)

    def record(msg):
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, None, None)

    assert not auth.filter(record(RAY_LINES[-1]))
    assert auth.filter(record("Token authentication is enabled but no token was found."))


def test_rays_deduplicator_drops_streamed_noise_with_our_pattern():
    from ray._private.ray_logging import LogDeduplicator

    dedup = LogDeduplicator(5, None, console.NOISE.pattern)
    batch = {"ip": "1.2.3.4", "pid": 42, "lines": RAY_LINES + OWN_LINES}
    kept = [line for b in dedup.deduplicate(batch) for line in b["lines"]]
    assert kept == OWN_LINES


def test_native_writes_to_descriptor_2_lose_only_the_noise():
    code = (
        "import os, sys; from fiqa.console import NativeStderrFilter; "
        "NativeStderrFilter.install(); "
        f"os.write(2, {(RAY_LINES[5] + chr(10)).encode()!r}); "
        "os.write(2, b'native line kept\\n'); "
        "print('python line kept', file=sys.stderr)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    assert "native line kept" in proc.stderr and "python line kept" in proc.stderr
    assert "core_worker.cc" not in proc.stderr


def test_drop_noise_keeps_partial_lines_and_progress_bars():
    chunk = (RAY_LINES[0] + "\n").encode() + b"kept\n\rscore test:  50%|#####"
    assert console.drop_noise(chunk) == b"kept\n\rscore test:  50%|#####"


def test_verbose_is_accepted_before_and_after_the_command():
    p = build_parser()
    assert p.parse_args(["run", "c.yaml", "-v"]).verbose
    assert p.parse_args(["-v", "run", "c.yaml"]).verbose
    assert not p.parse_args(["run", "c.yaml"]).verbose


def test_ray_train_logs_at_warning_unless_verbose(monkeypatch):
    monkeypatch.setattr(console, "_verbose", False)
    assert console.train_logging_config().log_level == "WARNING"
    assert console.ray_logs_note("/tmp/ray/session_1").startswith("Ray's own logs: /tmp/ray/")
    monkeypatch.setattr(console, "_verbose", True)
    assert console.train_logging_config().log_level == "INFO"
    assert console.ray_logs_note("/tmp/ray/session_1") is None


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_progress_line_every_so_often_within_an_epoch_and_none_at_its_end():
    clock, lines = Clock(), []
    meter = EpochProgress("teacher", 3, 10, 100, 64, every_s=30, clock=clock, emit=lines.append)
    for _ in range(10):  # 10 steps in 20 s: under the interval, silent
        clock.t += 2
        meter.step()
    assert lines == []
    for _ in range(10):
        clock.t += 2
        meter.step()
    assert lines == ["teacher epoch 3/10: step 15/100 (15%), 32 img/s, ETA 2m50s"]
    for _ in range(80):
        clock.t += 2
        meter.step()
    assert len(lines) == 6 and not lines[-1].startswith("teacher epoch 3/10: step 100/")


def test_steps_per_epoch_and_durations():
    assert steps_per_epoch(1200, 1, 64, 1) == 18
    assert steps_per_epoch(1200, 2, 16, 2) == 18
    assert [duration(s) for s in (42, 185, 3720)] == ["42s", "3m05s", "1h02m"]


def test_the_noise_pattern_is_added_once_however_often_commands_run(monkeypatch):
    monkeypatch.setenv("RAY_DEDUP_LOGS_SKIP_REGEX", "mine")
    for _ in range(3):
        console.skip_streamed_noise()
    assert os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] == f"mine|{console.NOISE.pattern}"
