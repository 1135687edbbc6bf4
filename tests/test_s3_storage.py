"""Object storage against a real S3 server (moto's, on 127.0.0.1): the storage layer,
tables, shard specs, stage manifests and resume, retries through a server restart, and
clear, quick errors for wrong credentials and missing buckets. No Ray needed."""

import dataclasses
import io
import json
import os
import subprocess
import threading
import time

import botocore.exceptions
import pyarrow as pa
import pytest
import yaml
from s3_server import SECRET_KEY, clean_env

from fiqa import storage
from fiqa.cli import main as fiqa_main
from fiqa.config import StorageConfig, from_dict
from fiqa.data.shards import ShardSpecError, expand_shard_spec
from fiqa.data.tables import SCORED_SCHEMA, list_parts, read_table, write_part
from fiqa.runner import run_stages, stage_states

from conftest import fiqa_cmd, labeled_members, write_tar

SPLITS = ("labeled_train", "labeled_val", "test", "unlabeled_1", "unlabeled_2")


@pytest.fixture(autouse=True)
def _restore_storage_settings(s3_server):  # (after the server fixture set the AWS env)
    """`storage.configure` exports settings to os.environ: undo that after each test."""
    saved = dict(os.environ)
    yield
    storage.configure(None)
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def s3(s3_server, bucket):
    """Storage configured for the test server; yields ``s3://bucket``."""
    storage.configure(StorageConfig(**s3_server.storage_config()))
    yield f"s3://{bucket}"
    storage.configure(StorageConfig(**s3_server.storage_config()))


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """The same storage tests on a local directory and on a bucket."""
    if request.param == "local":
        storage.configure(None)
        return str(tmp_path / "root")
    return request.getfixturevalue("s3") + "/root"


def test_files_roundtrip(root, tmp_path):
    assert not storage.exists(root) and storage.listdir(root) == []
    storage.write_json(storage.join(root, "a", "m.json"), {"x": 1})
    storage.write_text(storage.join(root, "a", "t.txt"), "hello")
    assert storage.read_json(storage.join(root, "a", "m.json")) == {"x": 1}
    assert storage.read_text(storage.join(root, "a", "t.txt")) == "hello"
    assert storage.exists(storage.join(root, "a")) and storage.exists(root)
    assert [p.rsplit("/", 1)[-1] for p in storage.listdir(storage.join(root, "a"))] == [
        "m.json",
        "t.txt",
    ]
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(root, "a", "missing"))
    # an export: the marker (last file) appears last, and replaces an older export whole
    local = tmp_path / "export"
    local.mkdir()
    (local / "w.bin").write_bytes(b"weights")
    (local / "model.json").write_text("{}")
    storage.write_text(storage.join(root, "model", "stale.txt"), "old")
    storage.publish(str(local), storage.join(root, "model"), ["w.bin", "model.json"])
    names = sorted(p.rsplit("/", 1)[-1] for p in storage.listdir(storage.join(root, "model")))
    assert names == ["model.json", "w.bin"]
    storage.rm(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "m.json"))
    storage.rm(storage.join(root, "never-there"))  # absent is fine


def test_tables_on_object_storage(s3):
    table = pa.table(
        {
            "key": ["k1", "k2"],
            "shard": ["s", "s"],
            "image": [b"a", b"b"],
            "mos": [1.0, None],
            "raw_score": [0.1, 0.2],
            "score": [1.0, 2.0],
            "score_spread": [None, 0.1],
            "model_id": ["m", "m"],
            "source": ["x", "x"],
        },
        schema=SCORED_SCHEMA,
    )
    d = f"{s3}/run/stage/labels"
    assert list_parts(d) == []
    url = write_part(table, d, "part-1.parquet")
    write_part(table.slice(0, 1), d, "part-2.parquet")
    assert url == f"{d}/part-1.parquet" and list_parts(d) == [url, f"{d}/part-2.parquet"]
    got = read_table(d, columns=["key", "score"])
    assert got.column_names == ["key", "score"] and got.column("key").to_pylist() == [
        "k1",
        "k2",
        "k1",
    ]


def test_shard_specs_on_object_storage(s3, s3_server, tmp_path):
    fs = s3_server.fs()
    bucket = s3.removeprefix("s3://")
    for i in range(3):
        fs.put_file(write_tar(tmp_path / f"s{i}.tar", labeled_members(1)), f"{bucket}/d/s{i}.tar")
    urls = [f"{s3}/d/s{i}.tar" for i in range(3)]
    assert expand_shard_spec(f"{s3}/d") == urls
    assert expand_shard_spec(f"{s3}/d/*.tar") == urls
    assert expand_shard_spec(f"{s3}/d/s{{0..1}}.tar") == urls[:2]
    with pytest.raises(ShardSpecError, match="does not exist"):
        expand_shard_spec(f"{s3}/d/nope.tar")
    with pytest.raises(ShardSpecError, match="matches no"):
        expand_shard_spec(f"{s3}/d/*.zip")


def test_many_objects_are_stated_with_one_listing(s3, s3_server, tmp_path):
    fs = s3_server.fs()
    bucket = s3.removeprefix("s3://")
    for i in range(5):
        fs.pipe(f"{bucket}/many/s{i}.tar", b"x" * (i + 1))
    fs.pipe(f"{bucket}/other/alone.tar", b"abc")
    urls = [f"{s3}/many/s{i}.tar" for i in (3, 0, 4)] + [f"{s3}/other/alone.tar"]
    batched = storage.infos(urls)
    single = [storage.info(u) for u in urls]
    assert [b["size"] for b in batched] == [4, 1, 5, 3] == [x["size"] for x in single]
    assert [b["ETag"] for b in batched] == [x["ETag"] for x in single]
    with pytest.raises(FileNotFoundError):  # one the listing lacks is stat-ed, and missing
        storage.infos([f"{s3}/many/s0.tar", f"{s3}/many/gone.tar"])


def test_storage_config_is_checked_and_outside_stage_fingerprints():
    from fiqa.config import ConfigError
    from fiqa.pipelines import STAGES

    base = {"run_dir": "s3://b/run", "data": {k: "x.tar" for k in SPLITS}}
    with pytest.raises(ConfigError, match="storage.addressing_style"):
        from_dict({**base, "storage": {"addressing_style": "sideways"}})
    with pytest.raises(ConfigError, match="must not carry credentials"):
        from_dict({**base, "storage": {"endpoint_url": "http://key:secret@minio:9000"}})
    # moving the run to another endpoint (same bucket contents) does not make stages stale
    one = from_dict({**base, "storage": {"endpoint_url": "http://one:9000"}})
    two = from_dict({**base, "storage": {"endpoint_url": "http://two:9000", "region": "x"}})
    for stage in STAGES:
        assert one.fingerprint(*stage.sections) == two.fingerprint(*stage.sections)
    storage.configure(one.storage)
    assert SECRET_KEY not in json.dumps(storage.worker_env()) + json.dumps(storage.options())


def test_transient_errors_are_told_apart():
    def client_error(code, status):
        return botocore.exceptions.ClientError(
            {
                "Error": {"Code": code, "Message": code},
                "ResponseMetadata": {"HTTPStatusCode": status},
            },
            "PutObject",
        )

    assert storage.is_transient(client_error("SlowDown", 503))
    assert storage.is_transient(client_error("InternalError", 500))
    assert storage.is_transient(client_error("Whatever", 502))
    assert storage.is_transient(botocore.exceptions.EndpointConnectionError(endpoint_url="x"))
    assert storage.is_transient(ConnectionRefusedError())
    assert not storage.is_transient(client_error("AccessDenied", 403))
    assert not storage.is_transient(client_error("NoSuchKey", 404))
    assert not storage.is_transient(FileNotFoundError("x"))
    wrapped = OSError(5, "Internal")
    wrapped.__cause__ = client_error("ServiceUnavailable", 503)
    assert storage.is_transient(wrapped)  # s3fs wraps botocore's errors


def test_writes_survive_a_server_restart(s3, s3_server, caplog):
    """Connection refused while the server is down: retried until it is back.

    With one attempt per request, botocore does not retry: the whole-operation
    retries of `fiqa.storage` bridge the outage on their own.
    """
    storage.configure(StorageConfig(**s3_server.storage_config(), max_attempts=1))
    url = f"{s3}/outage/manifest.json"
    s3_server.stop()
    restart = threading.Timer(4.0, s3_server.start)
    restart.start()
    try:
        t0 = time.monotonic()
        storage.write_json(url, {"ok": True})
        elapsed = time.monotonic() - t0
    finally:
        restart.join()
    assert elapsed >= 3.5  # it really waited for the server
    assert storage.read_json(url) == {"ok": True}
    retries = [r.getMessage() for r in caplog.records if r.name == "fiqa.storage"]
    assert retries and all(url in m and "EndpointConnectionError" in m for m in retries)


def test_checkpoint_reads_survive_a_server_restart(s3, s3_server, caplog):
    """A checkpoint's model.json is read with storage's retries (`fiqa label`, stages 2, 4, 6)."""
    from fiqa.models.checkpoint import read_meta

    storage.configure(StorageConfig(**s3_server.storage_config(), max_attempts=1))
    model = f"{s3}/ckpt/model"
    storage.write_json(f"{model}/model.json", {"arch": "resnet18", "image_size": 48})
    with pytest.raises(FileNotFoundError, match="model.json missing"):
        read_meta(f"{s3}/ckpt/nothing")
    s3_server.stop()
    restart = threading.Timer(3.0, s3_server.start)
    restart.start()
    try:
        meta = read_meta(model)
    finally:
        restart.join()
    assert meta["image_size"] == 48
    retries = [r.getMessage() for r in caplog.records if r.name == "fiqa.storage"]
    assert retries and all(f"{model}/model.json" in m for m in retries)


def test_training_refuses_checkpoints_of_another_config(root):
    """check_resumable reads the run's checkpoints where they are, local or in a bucket."""
    from fiqa.config import TrainConfig
    from fiqa.training import TrainJob, check_resumable, run_paths

    job = TrainJob(
        name="teacher",
        arch="resnet10t",
        image_size=32,
        resize=36,
        train_tables=[],
        val_table="",
        out_dir=f"{root}/train_teacher",
        train=TrainConfig(),
        config_fingerprint="now",
    )
    paths = run_paths(job)
    check_resumable(paths, job)  # nothing there yet
    ckpt = storage.join(paths.storage, "teacher", "checkpoint_2026-01-01_00-00-00.000000")
    storage.write_json(storage.join(ckpt, "model.json"), {"config_fingerprint": "now"})
    check_resumable(paths, job)  # same config: resumes
    storage.write_json(storage.join(ckpt, "model.json"), {"config_fingerprint": "before"})
    with pytest.raises(RuntimeError, match="checkpoints of another config"):
        check_resumable(paths, job)


def test_a_persistent_outage_fails_naming_the_object(s3, s3_server):
    storage.configure(StorageConfig(**s3_server.storage_config(), max_attempts=2, retry_seconds=3))
    url = f"{s3}/outage/never.json"
    s3_server.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(storage.StorageError) as err:
            storage.write_text(url, "x")
        elapsed = time.monotonic() - t0
    finally:
        s3_server.start()
    msg = str(err.value)
    assert url in msg and "Could not connect" in msg and "gave up after" in msg
    assert SECRET_KEY not in msg
    assert elapsed < 15


# ---- runs in a bucket, with stand-in stages ---------------------------------------------


def _stages(calls):
    """The first two real stages (names, config sections, inputs), with stand-in bodies."""
    from fiqa.pipelines import STAGES

    def body(name):
        def run(ctx):
            calls.append(name)
            # a multi-object output, written before the manifest commits it
            storage.write_text(f"{ctx.dir()}/out.txt", name)
            return {"ok": 1}

        return run

    return [dataclasses.replace(s, run=body(s.name)) for s in STAGES[:2]]


@pytest.fixture
def s3_run(s3, s3_server, tmp_path):
    fs = s3_server.fs()
    bucket = s3.removeprefix("s3://")
    data = {}
    for key in SPLITS:
        fs.put_file(write_tar(tmp_path / f"{key}.tar", labeled_members(2)), f"{bucket}/{key}.tar")
        data[key] = f"{s3}/{key}.tar"
    return {"run_dir": f"{s3}/run", "data": data, "storage": s3_server.storage_config()}


def test_a_run_in_a_bucket_resumes_at_stage_level(s3_run, s3_server):
    calls = []
    stages = _stages(calls)
    a, b = (s.name for s in stages)
    cfg = from_dict(s3_run)
    assert run_stages(cfg, stages) == {a: "ran", b: "ran"}
    assert run_stages(from_dict(s3_run), stages) == {a: "skipped", b: "skipped"}
    assert calls == [a, b]
    run_dir = s3_run["run_dir"]
    saved = yaml.safe_load(storage.read_text(f"{run_dir}/config.yaml"))
    assert saved["storage"]["endpoint_url"] == s3_server.endpoint
    # a crashed attempt of b: no manifest, its leftovers kept for the retry (same fingerprint)
    storage.rm(f"{run_dir}/{b}/manifest.json")
    assert [r["state"] for r in stage_states(cfg, stages)] == ["done", "partial"]
    storage.write_text(f"{run_dir}/{b}/leftover.txt", "same attempt")
    assert run_stages(from_dict(s3_run), stages) == {a: "skipped", b: "ran"}
    assert storage.exists(f"{run_dir}/{b}/leftover.txt")
    # another fingerprint: the earlier attempt's outputs are removed before b runs again
    storage.rm(f"{run_dir}/{b}/manifest.json")
    changed = from_dict(s3_run, ["scoring.views=flip"])
    assert run_stages(changed, stages) == {a: "skipped", b: "ran"}
    assert not storage.exists(f"{run_dir}/{b}/leftover.txt")
    assert storage.read_text(f"{run_dir}/{b}/out.txt") == b
    assert calls == [a, b, b, b]
    # a forced rerun of a finished stage starts from nothing
    storage.write_text(f"{run_dir}/{b}/leftover.txt", "from the finished run")
    assert run_stages(changed, stages, only=b, force=True) == {b: "ran"}
    assert not storage.exists(f"{run_dir}/{b}/leftover.txt")

    # `fiqa status s3://...` in a fresh process, the endpoint given with --set
    proc = subprocess.run(
        [
            *fiqa_cmd(),
            "status",
            run_dir,
            "--json",
            "--set",
            f"storage.endpoint_url={s3_server.endpoint}",
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [r["state"] for r in json.loads(proc.stdout)]
    assert states == ["done", "done", "pending", "pending", "pending", "pending"]
    assert SECRET_KEY not in proc.stdout + proc.stderr


def _cli(argv):
    """Run the `fiqa` CLI in this process; (exit code, stderr, seconds)."""
    import contextlib

    err = io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stderr(err):
        code = fiqa_main(argv)
    return code, err.getvalue(), time.monotonic() - t0


def _config_file(tmp_path, run_dir, endpoint, data=None, **storage_settings):
    shard = write_tar(tmp_path / "one.tar", labeled_members(2))
    cfg = {
        "run_dir": run_dir,
        "data": data or {k: shard for k in SPLITS},
        "storage": {"endpoint_url": endpoint, "addressing_style": "path", **storage_settings},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_missing_bucket_is_a_clear_error_within_seconds(s3_server, tmp_path):
    cfg = _config_file(tmp_path, "s3://no-such-bucket-fiqa/run", s3_server.endpoint)
    code, err, seconds = _cli(["run", cfg])
    assert code == 2 and seconds < 15, (code, seconds, err)
    assert "bucket 'no-such-bucket-fiqa' does not exist" in err
    assert SECRET_KEY not in err


def test_an_endpoint_that_does_not_answer_is_a_clear_error_within_its_bound(s3_server, tmp_path):
    """A wrong storage.endpoint_url: said once storage.retry_seconds is up, not minutes later
    (each request's own retries would multiply it)."""
    import socket

    with socket.socket() as sock:  # a port of 127.0.0.1 nothing listens on
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    cfg = _config_file(tmp_path, "s3://any-bucket/run", endpoint, retry_seconds=3)
    status = ["status", "s3://any-bucket/run", "--set", f"storage.endpoint_url={endpoint}"]
    for argv in (["run", cfg], [*status, "--set", "storage.retry_seconds=3"]):
        code, err, seconds = _cli(argv)
        assert code == 2 and seconds < 15, (argv, code, seconds, err)
        assert f"the object store at {endpoint} does not answer" in err, err
        assert SECRET_KEY not in err
    # one that takes connections and never replies (a port-forward with nothing behind it)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        cfg = _config_file(tmp_path, "s3://any-bucket/run", endpoint, retry_seconds=3)
        code, err, seconds = _cli(["run", cfg])
    assert code == 2 and seconds < 20, (code, seconds, err)
    assert f"the object store at {endpoint} does not answer" in err, err


def test_unreadable_input_bucket_is_a_clear_error(s3, s3_server, tmp_path):
    data = {k: f"s3://no-such-input-fiqa/{k}/*.tar" for k in SPLITS}
    cfg = _config_file(tmp_path, f"{s3}/run", s3_server.endpoint, data=data)
    code, err, seconds = _cli(["run", cfg])
    assert code == 2 and seconds < 15, (code, seconds, err)
    assert "no-such-input-fiqa" in err


def test_wrong_credentials_are_a_clear_error_within_seconds(s3_server, auth_s3_server, tmp_path):
    cfg = _config_file(tmp_path, "s3://any-bucket/run", auth_s3_server)
    code, err, seconds = _cli(["run", cfg])
    assert code == 2 and seconds < 15, (code, seconds, err)
    assert "s3://any-bucket/run" in err and "not writable" in err
    assert "access denied: check the credentials" in err
    assert SECRET_KEY not in err
