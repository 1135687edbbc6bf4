"""Bad input is accounted for, never fatal, never silent.

Each case goes through the scoring engine's per-shard code (`read_and_decode`, then
staged and committed as the actors and commit tasks do, no cluster needed) and must land in the scored table
or in the rejects table with the expected reason; for every shard, scored +
rejected == samples read. `test_fiqa_label_on_a_zoo_of_bad_shards` then runs
the same zoo through `fiqa label` on a real local Ray.
"""

import io
import json
import struct
import subprocess
import tarfile
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fiqa.data.tables import list_parts, part_name
from fiqa.scoring import ScoreJob
from fiqa.scoring.commit import ShardLedger, commit_shard
from fiqa.scoring.decode_task import read_and_decode
from fiqa.scoring.fragments import write_fragments
from fiqa.scoring.unique_keys import reject_duplicate_keys

from conftest import fiqa_cmd, jpeg_bytes, subprocess_env, write_tar

CROP = 32


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise_jpeg(size=(120, 120), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)), "JPEG")


def corrupted_jpeg() -> bytes:
    """A JPEG whose start-of-scan segment and the data after it are garbage.

    (Garbage further into the entropy-coded data still decodes, to garbled
    pixels: libjpeg only warns, and PIL does not pass the warning on.)
    """
    data = bytearray(noise_jpeg())
    sos = data.index(b"\xff\xda")
    data[sos : sos + 600] = np.random.default_rng(1).integers(0, 255, 600, np.uint8).tobytes()
    return bytes(data)


def png_bomb(width=100_000, height=100_000) -> bytes:
    """A 100-byte PNG whose header claims 10^10 pixels (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


def exif_rotated() -> bytes:
    """Stored 60x30 with the left half blue; EXIF says: rotate 90 degrees clockwise to display."""
    img = Image.new("RGB", (60, 30), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", exif=exif, quality=95)


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG")  # pure red in CMYK


# name -> (files of the sample, expected reason or None when it must be scored)
CASES = {
    "corrupted_jpeg": ({"jpg": corrupted_jpeg()}, "corrupt_image"),
    "truncated_image": ({"jpg": noise_jpeg()[:3000]}, "truncated_image"),
    "zero_byte": ({"jpg": b""}, "empty_image"),
    "not_an_image": ({"jpg": b"<html>404 not found</html>"}, "not_an_image"),
    "png16": ({"png": encode(Image.fromarray(np.full((40, 40), 40000, np.uint16)), "PNG")}, None),
    "grayscale": ({"jpg": jpeg_bytes((40, 40), color=90, mode="L")}, None),
    "cmyk": ({"jpg": cmyk_jpeg()}, None),
    "rgba": ({"png": encode(Image.new("RGBA", (40, 40), (10, 200, 30, 128)), "PNG")}, None),
    "palette": ({"png": encode(Image.new("P", (40, 40), 3), "PNG")}, None),
    "exif_rotated": ({"jpg": exif_rotated()}, None),
    "tiny": ({"jpg": jpeg_bytes((8, 8))}, "too_small"),
    "huge": ({"jpg": jpeg_bytes((4000, 3000))}, None),  # 12 MP: within the limit, downscaled
    "over_limit": ({"png": encode(Image.new("L", (4000, 4000)), "PNG")}, "too_many_pixels"),
    "bomb": ({"png": png_bomb()}, "too_many_pixels"),
    "no_image": ({"json": b"{}"}, "no_image"),
}
MAX_PIXELS = 13_000_000  # lets "huge" (12 MP) through, stops "over_limit" (16 MP)


def zoo_members(cases=CASES) -> list[tuple[str, bytes]]:
    members = []
    for name, (files, _) in cases.items():
        for ext, data in files.items():
            members.append((f"{name}.{ext}", data))
    return members


def job_for(tmp_path, shards) -> ScoreJob:
    return ScoreJob(
        shards=shards,
        out_dir=str(tmp_path / "out"),
        source="pseudo",
        model_path="(no model: the test fills raw_score)",
        crop=CROP,
        resize=CROP,
        max_pixels=MAX_PIXELS,
    )


def run_engine(job: ScoreJob) -> dict:
    """The engine's per-shard path without a cluster; the 'model' scores mean brightness.
    Returns the commits' counts."""
    ledger, shards = ShardLedger(), 0
    for url in job.shards:
        for batch in read_and_decode({"shard": np.array([url], dtype=object)}, job):
            pixels = batch.pop("pixels")
            ok = batch["reason"] == ""
            batch["raw_score"] = np.where(ok, pixels.reshape(len(ok), -1).mean(axis=1), np.nan)
            for done, total, _ in ledger.add(write_fragments(batch, job)):
                commit_shard(job, done, total)
                shards += 1
    assert not ledger.open_shards, "every shard must be committed"
    reject_duplicate_keys(job)
    return {"shards": shards}


def tables(out_dir):
    labels = pq.read_table(list_parts(f"{out_dir}/labels")).to_pylist()
    rejects = pq.read_table(list_parts(f"{out_dir}/rejects")).to_pylist()
    return labels, rejects


def samples_in_tar(path) -> int:
    with tarfile.open(path) as tar:
        return len({m.name.split(".", 1)[0] for m in tar.getmembers()})


@pytest.fixture
def zoo(tmp_path):
    shard = write_tar(tmp_path / "zoo.tar", zoo_members())
    job = job_for(tmp_path, [shard])
    run_engine(job)
    labels, rejects = tables(job.out_dir)
    return shard, {r["key"]: r for r in labels}, {r["key"]: r["reason"] for r in rejects}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_bad_input_is_scored_or_rejected_with_its_reason(zoo, case):
    _, labeled, rejected = zoo
    expected = CASES[case][1]
    if expected is None:
        assert case in labeled and case not in rejected, rejected.get(case)
        assert np.isfinite(labeled[case]["raw_score"])
    else:
        assert rejected.get(case) == expected and case not in labeled


def test_the_zoo_shard_balances(zoo):
    shard, labeled, rejected = zoo
    assert len(labeled) + len(rejected) == samples_in_tar(shard) == len(CASES)


def test_exif_rotated_photo_is_scored_upright(tmp_path):
    from fiqa.data.decode import decode_image

    out = decode_image(exif_rotated(), 30)
    top, bottom = out[:5].mean(axis=(0, 1)), out[-5:].mean(axis=(0, 1))
    assert top[2] > 200 > top[0] and bottom[0] > 200 > bottom[2]  # blue on top, red below


def test_colour_modes_become_the_right_rgb():
    from fiqa.data.decode import decode_image

    assert decode_image(cmyk_jpeg(), 16).mean(axis=(0, 1)) == pytest.approx([255, 0, 0], abs=12)
    png16 = CASES["png16"][0]["png"]
    assert decode_image(png16, 16).mean() == pytest.approx(40000 / 257, abs=1)  # 16 bit -> 8 bit
    dark16 = encode(Image.fromarray(np.full((40, 40), 1000, np.uint16)), "PNG")
    assert decode_image(dark16, 16).mean() < 6  # a dark 16-bit photo stays dark


def test_bomb_is_rejected_from_its_header_alone():
    import resource

    from fiqa.data.decode import RejectedSample, decode_image

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(RejectedSample, match="too_many_pixels: 100000x100000"):
        decode_image(png_bomb(), 32)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 50  # 10^10 pixels would be 10 GB


def test_duplicate_keys_within_and_across_shards(tmp_path):
    a = write_tar(
        tmp_path / "a.tar",
        [("k1.jpg", jpeg_bytes()), ("k2.jpg", jpeg_bytes()), ("k1.jpg", jpeg_bytes())],
    )
    b = write_tar(tmp_path / "b.tar", [("k2.jpg", jpeg_bytes()), ("k3.jpg", jpeg_bytes())])
    job = job_for(tmp_path, [a, b])
    run_engine(job)
    labels, rejects = tables(job.out_dir)
    assert sorted(r["key"] for r in labels) == ["k1", "k2", "k3"]  # every key scored once
    assert sorted((r["key"], r["shard"], r["reason"]) for r in rejects) == [
        ("k1", a, "duplicate_key"),
        ("k2", b, "duplicate_key"),
    ]


def test_keys_stay_unique_when_a_job_resumes(tmp_path):
    a = write_tar(tmp_path / "a.tar", [("k1.jpg", jpeg_bytes()), ("k2.jpg", jpeg_bytes())])
    b = write_tar(tmp_path / "b.tar", [("k2.jpg", jpeg_bytes()), ("k4.jpg", jpeg_bytes())])
    run_engine(job_for(tmp_path, [a]))  # the first attempt committed shard a only
    job = job_for(tmp_path, [b])
    run_engine(job)
    labels, rejects = tables(job.out_dir)
    assert sorted(r["key"] for r in labels) == ["k1", "k2", "k4"]
    assert [(r["key"], r["reason"]) for r in rejects] == [("k2", "duplicate_key")]


def test_truncated_and_unreadable_shards(tmp_path):
    from conftest import labeled_members

    whole = write_tar(tmp_path / "whole.tar", labeled_members(30))
    data = open(whole, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 40)
    good = write_tar(tmp_path / "good.tar", labeled_members(5, prefix="g"))
    job = job_for(tmp_path, [str(cut), str(junk), good])
    counts = run_engine(job)
    labels, rejects = tables(job.out_dir)
    by_shard = {}
    for r in labels:
        by_shard.setdefault(r["shard"], []).append(r["key"])
    assert 10 < len(by_shard[str(cut)]) < 30  # the readable samples are labeled ...
    member_rej, cut_rej = [r for r in rejects if r["shard"] == str(cut)]
    # ... the sample the cut went through is rejected by its key, naming the member ...
    assert member_rej["key"] not in by_shard[str(cut)]
    assert member_rej["reason"].startswith(f"truncated_member: {member_rej['key']}.")
    assert cut_rej["key"] == "" and cut_rej["reason"].startswith(
        "truncated_shard"
    )  # ... and the rest reported
    (junk_rej,) = [r for r in rejects if r["shard"] == str(junk)]
    assert junk_rej["reason"].startswith("unreadable_shard")
    assert len(by_shard[good]) == 5  # the others go on
    assert counts["shards"] == 3
    assert {p.rsplit("/", 1)[-1] for p in list_parts(job.out_dir + "/labels")} == {
        part_name(u) for u in job.shards
    }


def make_checkpoint(path) -> str:
    from fiqa.calibration import Logistic4
    from fiqa.models import create_model, save_checkpoint

    model = create_model("resnet10t")
    calib = Logistic4(5.0, 1.0, 0.0, 1.0)
    save_checkpoint(
        str(path),
        model,
        {"arch": "resnet10t", "image_size": CROP, "resize": CROP, "calibration": calib.to_dict()},
    )
    return str(path)


@pytest.mark.slow
def test_fiqa_label_on_a_zoo_of_bad_shards(tmp_path):
    """The zoo, a duplicate across shards, a truncated and an unreadable shard, through real Ray."""
    from conftest import labeled_members

    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "00-zoo.tar", zoo_members())
    write_tar(shards / "01-dup.tar", [("grayscale.jpg", jpeg_bytes()), ("fresh.jpg", jpeg_bytes())])
    whole = write_tar(tmp_path / "whole.tar", labeled_members(30, prefix="c"))
    (shards / "02-cut.tar").write_bytes(open(whole, "rb").read()[:40_000])
    (shards / "03-junk.tar").write_bytes(b"\x00garbage" * 300)
    model = make_checkpoint(tmp_path / "model")
    out = tmp_path / "labels-out"
    cmd = [
        *fiqa_cmd(),
        "label",
        model,
        str(shards),
        "--output",
        str(out),
        "--batch-size",
        "16",
        "--max-image-pixels",
        str(MAX_PIXELS),
        "--num-cpus",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    labels, rejects = tables(out)
    for path in sorted(shards.iterdir()):
        url = str(path)
        n_labeled = sum(r["shard"] == url for r in labels)
        n_rejected = sum(r["shard"] == url and r["key"] != "" for r in rejects)
        shard_level = [r["reason"] for r in rejects if r["shard"] == url and not r["key"]]
        if path.name == "03-junk.tar":
            assert n_labeled == 0 and shard_level[0].startswith("unreadable_shard")
        elif path.name == "02-cut.tar":
            assert n_labeled > 0 and shard_level[0].startswith("truncated_shard")
        else:
            assert n_labeled + n_rejected == samples_in_tar(path), path.name
    keys = [r["key"] for r in labels]
    assert len(keys) == len(set(keys))
    dup = [r for r in rejects if r["key"] == "grayscale"]
    assert [r["reason"] for r in dup] == ["duplicate_key"]
    scores = np.array([r["score"] for r in labels])
    assert np.all((scores >= 1.0) & (scores <= 5.0))  # the checkpoint's calibration was applied
    summary = json.loads((out / "label_summary.json").read_text())
    assert summary["scored"] == len(labels) and summary["rejected"] == len(rejects)
    assert "reject reasons:" in proc.stdout

    # The same command again resumes: every shard is committed, nothing is scored twice.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(4 already done)" in again.stdout
    assert len(tables(out)[0]) == len(labels)

    # Another model into the same output is refused rather than mixed in.
    other = make_checkpoint(tmp_path / "model2")
    meta = json.loads((tmp_path / "model2" / "model.json").read_text())
    meta["calibration"]["b1"] = 9.0
    (tmp_path / "model2" / "model.json").write_text(json.dumps(meta))
    cmd[cmd.index(model)] = other
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert refused.returncode == 2 and "holds labels from" in refused.stderr
