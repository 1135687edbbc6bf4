"""Every byte of a crawled pool is hostile (issue 44): what the decoder opens, what the tar
reader holds, which model files may run code, and a fuzz test of the per-shard path.

All plain Python, no Ray: the shard reader (`read_shard`), the decoder (`decode_image`) and
the decode task's per-shard logic (`decode_shards`), as the scoring engine runs them.
"""

import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tarfile
import time
import tracemalloc
import warnings
import zipfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_bad_inputs import cmyk_jpeg, encode, exif_rotated, job_for, run_engine, tables

from fiqa.config import (
    MAX_IMAGE_PIXELS_LIMIT,
    ConfigError,
    DataConfig,
    RunConfig,
    from_dict,
)
from fiqa.data.decode import RejectedSample, decode_image
from fiqa.data.reader import read_shard
from fiqa.data.tar_stream import (
    CHUNK,
    DEFAULT_MAX_MEMBER_BYTES,
    Skipped,
    TarFormatError,
    TruncatedShard,
    iter_tar,
)
from fiqa.scoring import ScoreJob, decode_task
from fiqa.scoring.decode_task import decode_shards

from conftest import REPO, jpeg_bytes, write_tar

# --------------------------------------------------------------------------- formats

EPS = (  # what an EPS file starts with: PIL would hand it to Ghostscript
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n"
    b"0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n"
)
DOS_EPS = b"\xc5\xd0\xd3\xc6" + struct.pack("<6I", 30, len(EPS), 0, 0, 0, 0) + b"\xff\xff" + EPS


def psd_bytes(w: int = 40, h: int = 40) -> bytes:
    """A minimal RGB Photoshop file (PIL reads PSD, cannot write it)."""
    head = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3)
    return head + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + bytes(3 * w * h)


def other_formats() -> dict[str, bytes]:
    img = Image.new("RGB", (40, 40), (10, 200, 30))
    return {
        "eps": EPS,
        "dos_eps": DOS_EPS,
        "tiff": encode(img, "TIFF"),
        "psd": psd_bytes(),
        "gif": encode(img, "GIF"),
        "bmp": encode(img, "BMP"),
    }


@pytest.fixture
def no_other_plugin(monkeypatch):
    """Any plugin but JPEG, PNG and WebP that is asked to open bytes fails the test."""
    Image.init()

    def refuse(fmt):
        def factory(*args, **kwargs):
            raise AssertionError(f"the {fmt} plugin was asked to open hostile bytes")

        return factory

    for fmt, (_, accept) in list(Image.OPEN.items()):
        if fmt not in ("JPEG", "PNG", "WEBP"):
            monkeypatch.setitem(Image.OPEN, fmt, (refuse(fmt), accept))


@pytest.mark.parametrize("name", sorted(other_formats()))
def test_other_formats_named_jpg_are_unsupported(tmp_path, no_other_plugin, name):
    data = other_formats()[name]
    with pytest.raises(RejectedSample) as e:
        decode_image(data, 32)
    assert e.value.reason == "unsupported_format"
    # ... as a shard member named .jpg, through the decode task's path
    job = job_for(tmp_path, [write_tar(tmp_path / "s.tar", [(f"{name}.jpg", data)])])
    run_engine(job)
    labels, rejects = tables(job.out_dir)
    assert labels == [] and [(r["key"], r["reason"]) for r in rejects] == [
        (name, "unsupported_format")
    ]


def webp(mode: str = "RGB", **kw) -> bytes:
    return encode(Image.new(mode, (48, 40), (30, 90, 160)), "WEBP", **kw)


DECODED = {
    "jpeg": lambda: jpeg_bytes((48, 40)),
    "png": lambda: encode(Image.new("RGB", (48, 40), (1, 2, 3)), "PNG"),
    "webp_lossy": lambda: webp(),
    "webp_lossless": lambda: webp(lossless=True),
    "webp_alpha": lambda: webp("RGBA"),
    "greyscale": lambda: jpeg_bytes((40, 40), color=90, mode="L"),
    "cmyk": cmyk_jpeg,
    "palette": lambda: encode(Image.new("P", (40, 40), 3), "PNG"),
    "exif_rotated": exif_rotated,
}


@pytest.mark.parametrize("name", sorted(DECODED))
def test_jpeg_png_webp_in_every_mode_still_decode(no_other_plugin, name):
    out = decode_image(DECODED[name](), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_a_webp_is_size_checked_before_its_plugin_allocates(monkeypatch):
    # A 30-byte VP8X header claiming a 16384 x 16384 canvas (1 GB of RGBA once opened).
    huge = b"RIFF" + struct.pack("<I", 22) + b"WEBPVP8X" + struct.pack("<I", 10) + bytes(4)
    huge += (16383).to_bytes(3, "little") * 2
    monkeypatch.setitem(Image.OPEN, "WEBP", (None, Image.OPEN["WEBP"][1]))  # never called
    with pytest.raises(RejectedSample, match="too_many_pixels: 16384x16384"):
        decode_image(huge, 32)
    with pytest.raises(RejectedSample, match="not_an_image"):  # no size to check: not opened
        decode_image(b"RIFF" + bytes(4) + b"WEBPJUNK" + bytes(20), 32)


def test_pils_own_bomb_guard_is_on_and_never_misnamed(monkeypatch):
    """PIL's guard fires (here at a lowered threshold): too_many_pixels, never not_an_image;
    its warning below the error threshold does not escape a decode."""
    img = jpeg_bytes((64, 64))  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # error above 2000
    with pytest.raises(RejectedSample) as e:
        decode_image(img, 32, max_pixels=10**6)
    assert e.value.reason == "too_many_pixels"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # a warning between 3000 and 6000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(img, 32, max_pixels=10**6).shape == (32, 32, 3)


def test_no_pil_setting_changes_at_import():
    code = (
        "from PIL import Image, ImageFile\n"
        "before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)\n"
        "import fiqa.data.decode, fiqa.data.reader, fiqa.predict, fiqa.scoring.decode_task\n"
        "print(before == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr[-2000:]


def test_images_are_opened_only_for_the_three_formats():
    """Every Image.open of the package names its formats, and no module turns PIL's guard off."""
    allowed = {"fiqa/data/synthetic.py"}  # re-reads the JPEG it has just encoded itself
    for folder in ("fiqa", "models", "pipelines", "cluster"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            text = path.read_text()
            assert "MAX_IMAGE_PIXELS =" not in text, rel
            assert "LOAD_TRUNCATED_IMAGES =" not in text, rel
            for line in text.splitlines():
                if "Image.open(" in line and rel not in allowed:
                    assert "formats=" in line, f"{rel}: {line.strip()}"


# --------------------------------------------------------------------------- config


def minimal(*overrides: str) -> RunConfig:
    keys = ("labeled_train", "labeled_val", "test", "unlabeled_1", "unlabeled_2")
    return from_dict({"run_dir": "runs/x", "data": {k: f"d/{k}" for k in keys}}, list(overrides))


def test_the_data_limits_are_validated_and_fingerprinted_only_when_set():
    import hashlib

    assert DataConfig.max_member_bytes == DEFAULT_MAX_MEMBER_BYTES == 64 * 2**20
    assert MAX_IMAGE_PIXELS_LIMIT == 2 * Image.MAX_IMAGE_PIXELS  # PIL's error threshold
    for bad in ("data.max_member_bytes=1000", "data.max_image_pixels=200000000"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            minimal(bad)
    cfg = minimal()
    # At its default the new key leaves the hash as runs from before it had it.
    old = {k: v for k, v in cfg.to_dict()["data"].items() if k != "max_member_bytes"}
    digest = hashlib.sha256(json.dumps({"data": old}, sort_keys=True).encode()).hexdigest()
    assert cfg.fingerprint("data", legacy=True) == digest[:16]
    assert minimal("data.max_member_bytes=2097152").fingerprint("data") != cfg.fingerprint("data")


def test_fiqa_label_takes_the_member_cap(tmp_path):
    from fiqa.cli import build_parser
    from fiqa.cli.label import label_config

    argv = ["label", "m", "in.tar", "-o", str(tmp_path), "--set", "data.max_member_bytes=2097152"]
    assert label_config(build_parser().parse_args(argv))["data"].max_member_bytes == 2097152
    with pytest.raises(ConfigError, match="data.max_member_bytes"):
        label_config(build_parser().parse_args([*argv[:-1], "data.max_member_bytes=10"]))


# --------------------------------------------------------------------------- tar members


Member = tuple[str | tarfile.TarInfo, bytes | None]  # a file's name, or a header as is


def tar_of(members: list[Member], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for head, data in members:
            info = head if isinstance(head, tarfile.TarInfo) else tarfile.TarInfo(head)
            if data is not None and not isinstance(head, tarfile.TarInfo):
                info.size = len(data)
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return buf.getvalue()


def name_of(member: Member) -> str:
    head = member[0]
    return head.name if isinstance(head, tarfile.TarInfo) else head


def with_pax_size(name: str, data: bytes, claimed: int) -> Member:
    """A member whose pax header claims ``claimed`` bytes (its ustar header the true size)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.pax_headers = {"size": str(claimed)}
    return info, data


class Recording(io.BytesIO):
    """A stream that notes the largest read asked of it."""

    largest = 0

    def read(self, n=-1):
        self.largest = max(self.largest, n if n is not None and n >= 0 else 1 << 62)
        return super().read(n)


def test_a_pax_header_claiming_200_gb_allocates_nothing(tmp_path):
    img = jpeg_bytes()
    raw = tar_of([("k1.jpg", img), with_pax_size("big.jpg", img, 200 * 10**9), ("k3.jpg", img)])
    path = tmp_path / "pax.tar"
    path.write_bytes(raw)
    tracemalloc.start()
    try:
        recs = list(read_shard(str(path)))  # the shard's size known: the claim is refused
        for size, cap in ((None, DEFAULT_MAX_MEMBER_BYTES), (None, None)):  # streamed
            stream = Recording(raw)
            with pytest.raises(TruncatedShard) as e:
                list(iter_tar(stream, size, cap, skipped=True))
            assert e.value.member == "big.jpg" and stream.largest <= CHUNK
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * CHUNK
    assert [(r["key"], (r["reason"] or "").split(":")[0]) for r in recs] == [
        ("k1", ""),
        ("big", "truncated_member"),
        ("", "truncated_shard"),
    ]
    assert "big.jpg: claims 200000000000 bytes" in recs[1]["reason"]


def rewrite_size(raw: bytes, name: str, size: int) -> bytes:
    """``raw`` with the ustar header of member ``name`` claiming ``size`` bytes."""
    out = bytearray(raw)
    at = raw.index(name.encode() + b"\0")
    out[at + 124 : at + 136] = b"%011o\0" % size
    out[at + 148 : at + 156] = b" " * 8
    out[at + 148 : at + 156] = b"%06o\0 " % sum(out[at : at + 512])
    return bytes(out)


def test_over_long_members_are_rejected_by_name(tmp_path):
    img, big = jpeg_bytes(), jpeg_bytes((200, 200), quality=100) + bytes(20_000)
    members = [("k1.jpg", img), ("k2.jpg", big), ("k2.json", b'{"mos": 3}'), ("k3.jpg", img)]
    shard = tmp_path / "long.tar"
    shard.write_bytes(tar_of(members, tarfile.USTAR_FORMAT))
    recs = {r["key"]: r["reason"] for r in read_shard(str(shard), max_member_bytes=16_384)}
    assert recs == {
        "k1": None,
        "k2": f"member_too_large: k2.jpg: {len(big)} bytes > 16384",
        "k3": None,
    }
    # The engine's job carries the cap to its decode tasks.
    job = job_for(tmp_path, [str(shard)])
    job.max_member_bytes = 16_384
    run_engine(job)
    labels, rejects = tables(job.out_dir)
    assert sorted(r["key"] for r in labels) == ["k1", "k3"]
    assert [r["reason"].split(":")[0] for r in rejects] == ["member_too_large"]
    # A member claiming more bytes than remain in the shard: a reject naming it, then the cut.
    cut = tmp_path / "cut.tar"
    cut.write_bytes(
        rewrite_size(tar_of(members[:2] + members[3:], tarfile.USTAR_FORMAT), "k2.jpg", 10**9)
    )
    got = [(r["key"], r["reason"]) for r in read_shard(str(cut))]
    assert got[0] == ("k1", None) and len(got) == 3
    assert got[1][0] == "k2" and got[1][1].startswith("truncated_member: k2.jpg: claims 1000000000")
    assert got[2][0] == "" and got[2][1].startswith("truncated_shard")


def special(name: str, kind: bytes, linkname: str = "") -> Member:
    """A link, device, FIFO or directory member."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def test_links_devices_fifos_and_directories_are_counted_rejects(tmp_path):
    img = jpeg_bytes()
    members = [
        ("s0.jpg", img),
        special("link.jpg", tarfile.SYMTYPE, "/etc/passwd"),
        special("hard.jpg", tarfile.LNKTYPE, "s0.jpg"),
        special("fifo.jpg", tarfile.FIFOTYPE),
        special("dev.jpg", tarfile.CHRTYPE),
        special("dir.jpg", tarfile.DIRTYPE),
        special("faces", tarfile.DIRTYPE),  # names no sample: not one
        ("s1.jpg", img),
        ("s1.json", b'{"mos": 2}'),
        ("mixed.jpg", img),
        special("mixed.json", tarfile.SYMTYPE, "../../secret.json"),
    ]
    shard = tmp_path / "odd.tar"
    shard.write_bytes(tar_of(members, tarfile.GNU_FORMAT))
    job = job_for(tmp_path, [str(shard)])
    run_engine(job)
    labels, rejects = tables(job.out_dir)
    assert sorted(r["key"] for r in labels) == ["s0", "s1"]
    assert {r["key"]: r["reason"] for r in rejects} == {
        "link": "not_a_file: link.jpg: symbolic link",
        "hard": "not_a_file: hard.jpg: hard link",
        "fifo": "not_a_file: fifo.jpg: FIFO",
        "dev": "not_a_file: dev.jpg: character device",
        "dir": "not_a_file: dir.jpg/: directory",  # tar names a directory with its slash
        "mixed": "not_a_file: mixed.json: symbolic link",
    }
    assert len(labels) + len(rejects) == 8  # every key once


def test_member_names_never_reach_the_filesystem(tmp_path, monkeypatch):
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    absolute = f"/tmp/fiqa-hostile-{os.getpid()}.jpg"
    names = ["../../escape.jpg", absolute, "a/../../../up.jpg", "./dot.jpg"]
    shard = write_tar(tmp_path / "names.tar", [(n, jpeg_bytes()) for n in names])
    before = sorted(p for p in tmp_path.rglob("*"))
    job = job_for(tmp_path, [shard])
    run_engine(job)
    labels, _ = tables(job.out_dir)
    assert sorted(r["key"] for r in labels) == sorted(n[: -len(".jpg")] for n in names)
    outside = [
        p for p in tmp_path.rglob("*") if p not in before and Path(job.out_dir) not in p.parents
    ]
    assert outside == [Path(job.out_dir)] and not os.path.exists(absolute)


def test_data_after_the_end_marker_is_reported():
    raw = tar_of([("k1.jpg", b"x")], tarfile.USTAR_FORMAT)
    assert list(iter_tar(io.BytesIO(raw + bytes(4096)), len(raw) + 4096)) == [("k1.jpg", b"x")]
    end = raw.index(bytes(1024), 1024)  # the end-of-archive blocks after k1's data
    hidden = raw[:end] + bytes(512) + tar_of([("k2.jpg", b"y")], tarfile.USTAR_FORMAT)
    got = []
    with pytest.raises(TarFormatError, match="after the end-of-archive block"):
        got.extend(iter_tar(io.BytesIO(hidden), len(hidden)))
    assert got == [("k1.jpg", b"x")]


def test_skipped_members_are_yielded_only_when_asked():
    raw = tar_of([("a.jpg", b"12345"), special("l.jpg", tarfile.SYMTYPE, "a.jpg")])
    assert list(iter_tar(io.BytesIO(raw), len(raw), 4)) == []
    assert list(iter_tar(io.BytesIO(raw), len(raw), 4, skipped=True)) == [
        ("a.jpg", Skipped("member_too_large", "5 bytes > 4")),
        ("l.jpg", Skipped("not_a_file", "symbolic link")),
    ]


# --------------------------------------------------------------------------- trusted models


def fake_torchscript(path: Path) -> str:
    with zipfile.ZipFile(path, "w") as z:  # TorchScript files are zip archives
        z.writestr("m/code/__torch__.py", "import os; os.system('echo owned')")
    return str(path)


def test_torchscript_needs_the_trust_flag(tmp_path, monkeypatch, capsys):
    from fiqa.cli import build_parser, main
    from fiqa.models import predictor

    ts = fake_torchscript(tmp_path / "m.pt")
    opened = []
    monkeypatch.setattr(predictor, "_open_torchscript", lambda p, d: opened.append(p) or "ok")
    with pytest.raises(ValueError, match="--trust-model-code"):
        predictor.open_predictor(ts, "cpu")
    assert opened == []  # refused before anything was loaded
    assert predictor.open_predictor(ts, "cpu", trust_model_code=True) == "ok"

    img = tmp_path / "face.jpg"
    img.write_bytes(jpeg_bytes())
    assert main(["predict", ts, str(img)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--trust-model-code" in err and "TorchScript" in err
    args = build_parser().parse_args(["predict", ts, str(img), "--trust-model-code"])
    assert args.trust_model_code
    # fiqa label takes checkpoints only: a TorchScript file is refused before torch loads.
    assert main(["label", ts, str(img), "-o", str(tmp_path / "out")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err and opened == [ts]


# --------------------------------------------------------------------------- fuzz

FUZZ_SHARDS = 600  # mutated shards, seeded: the same ones every run
PER_IMAGE_S = 2.0  # the most one image may take to decode (2 slow, shared cores)
PER_SHARD_S = 20.0  # a hang turns into a failure after this
KNOWN_REASONS = {
    "empty_image",
    "not_an_image",
    "unsupported_format",
    "truncated_image",
    "corrupt_image",
    "too_small",
    "too_many_pixels",
    "no_image",
    "no_label",
    "bad_label",
    "bad_json",
    "duplicate_key",
    "not_a_file",
    "member_too_large",
    "truncated_member",
    "truncated_shard",
    "unreadable_shard",
    "empty_shard",
}


def fuzz_members(rng: random.Random) -> list[Member]:
    """A small shard's files: JPEG, PNG and WebP faces-to-be with their labels."""
    out = []
    for i in range(rng.randint(3, 6)):
        w, h = rng.randint(16, 40), rng.randint(16, 40)
        arr = np.frombuffer(rng.randbytes(w * h * 3), np.uint8).reshape(h, w, 3) // 2 + 60
        fmt = rng.choice(["JPEG", "JPEG", "PNG", "WEBP"])
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        key = f"s{i:03d}" if i else "d" * rng.choice([3, 120]) + "/s000"  # a long name too
        out.append((f"{key}.{ext}", encode(Image.fromarray(arr), fmt)))
        out.append((f"{key}.json", json.dumps({"mos": 1 + i / 2}).encode()))
    return out


def hostile_image(rng: random.Random, data: bytes) -> bytes:
    """``data`` damaged, or swapped for another format or a bomb."""
    choice = rng.randrange(6)
    if choice == 0:
        return data[: rng.randrange(len(data))]
    if choice == 1:
        out = bytearray(data)
        for _ in range(rng.randint(1, 12)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    if choice == 2:
        return rng.choice(list(other_formats().values()))
    if choice == 3:  # a header's dimensions rewritten (JPEG frame header or PNG IHDR)
        out, at = bytearray(data), data.find(b"\xff\xc0")
        at = at + 5 if at > 0 else (16 if data[12:16] == b"IHDR" else 0)
        dims = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x01\x00\x01\x00"])
        out[at : at + 4] = dims
        return bytes(out)
    if choice == 4:
        return rng.randbytes(rng.randrange(1, 400))
    return b""


def mutate(rng: random.Random, members: list[Member], fmt: int) -> bytes:
    """A shard built from ``members``, then damaged one to three ways."""
    members = list(members)
    raw = None
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(9)
        if raw is None and kind >= 5:
            raw = tar_of(members, fmt)
        if kind == 0:  # members reordered, some repeated
            rng.shuffle(members)
            members += rng.sample(members, rng.randint(0, 2))
        elif kind in (1, 2):  # an image damaged or replaced; a pax header's size claim
            files = [j for j, (h, d) in enumerate(members) if isinstance(h, str) and d]
            if files:
                i = rng.choice(files)
                name, data = members[i]
                if kind == 1:
                    members[i] = (name, hostile_image(rng, data))
                else:
                    claim = rng.choice([0, 1, 10**6, 200 * 10**9, len(data) + 1])
                    members[i] = with_pax_size(name, data, claim)
        elif kind == 3:  # a member turned into a link, a device, a FIFO or a directory
            i = rng.randrange(len(members))
            kind_byte = rng.choice([b"1", b"2", b"3", b"4", b"5", b"6", b"Z"])
            members[i] = special(name_of(members[i]), kind_byte, "a")
        elif kind == 4:  # a json member that is not json
            members.append((name_of(members[0]).rsplit(".", 1)[0] + ".json", rng.randbytes(20)))
        if kind < 5:
            raw = None
            continue
        raw = bytearray(raw)
        if kind == 5:  # bytes flipped
            for _ in range(rng.randint(1, 8)):
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        elif kind == 6:  # cut
            del raw[rng.randrange(len(raw)) :]
        elif kind == 7:  # a header's size field rewritten, checksum fixed
            headers = [
                o for o in range(0, len(raw) - 512, 512) if raw[o + 257 : o + 262] == b"ustar"
            ]
            if headers:
                at = rng.choice(headers)
                size = rng.choice([0, 1, 511, 513, 8**11 - 1, len(raw) * 4])
                raw[at + 124 : at + 136] = b"%011o\0" % size
                raw[at + 148 : at + 156] = b" " * 8
                raw[at + 148 : at + 156] = b"%06o\0 " % sum(raw[at : at + 512])
        elif kind == 8:  # a block of garbage
            at = 512 * rng.randrange(max(1, len(raw) // 512))
            raw[at : at + 512] = rng.randbytes(512)
        raw = bytes(raw)
    return raw if raw is not None else tar_of(members, fmt)


def whole_keys(raw: bytes, mutated: bytes) -> set[str]:
    """Keys of the original members whose headers lie before the first changed byte: the
    reader has read their names, whatever happened to the bytes after."""
    diff = next((i for i, (a, b) in enumerate(zip(raw, mutated, strict=False)) if a != b), None)
    diff = min(len(raw), len(mutated)) if diff is None else diff
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return {m.name.split(".", 1)[0] for m in tar.getmembers() if m.offset_data <= diff}


@contextmanager
def deadline(seconds: float):
    def hang(signum, frame):
        raise TimeoutError(f"a shard took over {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_fuzzed_shards_never_crash_hang_or_lose_a_key(tmp_path, monkeypatch):
    """Seeded mutations of small generated shards (bytes flipped, cut, headers and sizes
    rewritten, pax claims, links, members reordered and repeated, images damaged or swapped
    for other formats) through the decode task's per-shard path: no exception, no image
    slower than `PER_IMAGE_S`, every reason a documented one, every key that the damage
    left whole accounted for, and each key once (repeats as duplicate_key)."""
    slowest = [0.0]

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return decode_image(*args, **kwargs)
        finally:
            slowest[0] = max(slowest[0], time.perf_counter() - t0)

    monkeypatch.setattr(decode_task, "decode_image", timed)
    job = ScoreJob(shards=[], out_dir="", source="fuzz", resize=32, crop=32, max_pixels=4_000_000)
    seen_reasons: Counter = Counter()
    t0 = time.perf_counter()
    for seed in range(FUZZ_SHARDS):
        rng = random.Random(seed)
        fmt = rng.choice([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
        members = fuzz_members(rng)
        raw = tar_of(members, fmt)
        mutated = raw if seed % 40 == 0 else mutate(rng, members, fmt)
        url = str(tmp_path / f"fuzz-{seed:04d}.tar")
        Path(url).write_bytes(mutated)
        with deadline(PER_SHARD_S):
            batches = list(decode_shards([url], job, block_rows=4))
        keys = [k for b in batches for k in b["key"]]
        reasons = [r for b in batches for r in b["reason"]]
        totals = [t for b in batches for t in b["shard_total"]]
        context = f"seed {seed}"
        assert totals[-1] == len(keys) and all(t == -1 for t in totals[:-1]), context
        kinds = [r.split(":")[0] for r in reasons]
        assert set(kinds) - {""} <= KNOWN_REASONS, (context, set(kinds) - KNOWN_REASONS)
        shard_rows = [i for i, k in enumerate(keys) if k == ""]
        assert shard_rows in ([], [len(keys) - 1]), context  # one shard-level row, last
        firsts = Counter(
            k for k, why in zip(keys, kinds, strict=True) if k and why != "duplicate_key"
        )
        assert max(firsts.values(), default=1) == 1, context
        assert whole_keys(raw, mutated) <= set(keys), context
        if mutated is raw:
            assert set(kinds) == {""}, context
        seen_reasons.update(kinds)
    elapsed = time.perf_counter() - t0
    assert slowest[0] < PER_IMAGE_S and elapsed < 60
    # The mutations reach the reader's and the decoder's reasons alike.
    for reason in ("", "truncated_member", "truncated_shard", "not_a_file", "unsupported_format"):
        assert seen_reasons[reason] > 0, (reason, seen_reasons)
