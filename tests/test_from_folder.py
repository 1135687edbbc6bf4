import subprocess

import pytest

from fiqa.data.from_folder import read_label_csv, shard_folder
from fiqa.data.reader import read_shard
from fiqa.data.shards import expand_shard_spec

from conftest import fiqa_cmd, jpeg_bytes, subprocess_env


def test_shard_folder_round_trips(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(5):
        (imgs / f"face.{i}.jpg").write_bytes(jpeg_bytes())
    (imgs / "x.png").write_bytes(jpeg_bytes(fmt="PNG"))
    csv = tmp_path / "scores.csv"
    csv.write_text(
        "name,score\n"
        + "".join(f"face.{i}.jpg,{i + 1}.5\n" for i in range(5))
        + "x.png,2\nmissing.jpg,3\n"
    )
    res = shard_folder(imgs, csv, tmp_path / "out", shard_size=4)
    assert res["written"] == 6 and res["missing"] == ["missing.jpg"] and len(res["shards"]) == 2
    recs = [
        r
        for s in expand_shard_spec(str(tmp_path / "out"))
        for r in read_shard(s, require_label=True)
    ]
    assert sorted(r["mos"] for r in recs) == [1.5, 2.0, 2.5, 3.5, 4.5, 5.5]
    assert all(r["reason"] is None for r in recs) and "face_0" in {r["key"] for r in recs}


def test_bad_csv_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a.jpg,1\nb.jpg,high\n")
    with pytest.raises(ValueError, match="bad.csv:2"):
        read_label_csv(bad)


def run_shard_cli(images, labels, out):
    return subprocess.run(
        [*fiqa_cmd(), "shard", "--images", str(images), "--labels", str(labels), "-o", str(out)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )


def test_cli(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "s.csv").write_text("a.jpg,3.2\n")
    out = run_shard_cli(tmp_path / "imgs", tmp_path / "s.csv", tmp_path / "o")
    assert out.returncode == 0 and "wrote 1 samples" in out.stdout
    bad = run_shard_cli(tmp_path / "nope", tmp_path / "s.csv", tmp_path / "o")
    assert bad.returncode == 2 and "is not a directory" in bad.stderr


def test_a_bucket_as_out_is_refused_not_made_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "s.csv").write_text("a.jpg,3.2\n")
    with pytest.raises(ValueError, match="aws s3 sync DIR s3://bucket/x"):
        shard_folder("imgs", "s.csv", "s3://bucket/x")
    assert not (tmp_path / "s3:").exists()


def test_cli_an_existing_file_as_output_is_one_error_line(tmp_path):
    """It was a FileExistsError traceback, exit 1."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "s.csv").write_text("a.jpg,3.2\n")
    out = run_shard_cli(tmp_path / "imgs", tmp_path / "s.csv", tmp_path / "s.csv")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == (
        f"fiqa: error: -o '{tmp_path}/s.csv' is a file; give a directory to write the shards to"
    )
    assert (tmp_path / "s.csv").read_text() == "a.jpg,3.2\n"
