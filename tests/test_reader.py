import json

from fiqa.data.reader import read_shard

from conftest import jpeg_bytes, labeled_members, write_tar


def test_every_sample_is_accounted_for(tmp_path):
    members = labeled_members(3) + [
        ("s0001.jpg", jpeg_bytes()),  # a second s0001 later in the tar: duplicate key
        ("noimg.json", json.dumps({"mos": 3}).encode()),
        ("nolabel.jpg", jpeg_bytes()),
        ("nolabel.json", b"{}"),
        ("badjson.jpg", jpeg_bytes()),
        ("badjson.json", b"{not json"),
        ("badlabel.jpg", jpeg_bytes()),
        ("badlabel.json", json.dumps({"mos": "high"}).encode()),
    ]
    shard = write_tar(tmp_path / "a.tar", members)
    recs = list(read_shard(shard, require_label=True))
    reasons = {r["key"]: r["reason"] for r in recs if r["reason"]}
    assert reasons == {
        "s0001": "duplicate_key",
        "noimg": "no_image",
        "nolabel": "no_label",
        "badjson": "bad_json",
        "badlabel": "bad_label",
    }
    good = [r for r in recs if not r["reason"]]
    assert [r["key"] for r in good] == ["s0000", "s0001", "s0002"]
    assert good[1]["mos"] == 1.1 and good[0]["image"].startswith(b"\xff\xd8")


def test_unlabeled_samples_are_fine_without_labels(tmp_path):
    shard = write_tar(tmp_path / "u.tar", [("u1.jpg", jpeg_bytes()), ("u1.json", b"{}")])
    (rec,) = read_shard(shard, require_label=False)
    assert rec["reason"] is None and rec["mos"] is None


def test_truncated_and_unreadable_shards_are_reported(tmp_path):
    shard = write_tar(tmp_path / "t.tar", labeled_members(20))
    data = open(shard, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    recs = list(read_shard(str(cut)))
    assert recs[-1]["key"] == "" and recs[-1]["reason"].startswith("truncated_shard")
    assert 5 < len(recs) - 1 < 20
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x00garbage" * 100)
    (rec,) = read_shard(str(junk))
    assert rec["reason"].startswith("unreadable_shard")
