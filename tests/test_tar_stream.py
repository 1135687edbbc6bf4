"""The streaming tar reader against Python's tarfile, on every format tarfile writes."""

import io
import os
import tarfile

import pytest

from fiqa.data.tar_stream import TarFormatError, TruncatedShard, _number, iter_tar

LONG = "d" * 90 + "/" + "e" * 80 + "/sample-0001.jpg"  # > 100 chars: ustar prefix, pax or GNU
VERY_LONG = "x" * 300 + ".json"  # no ustar split: pax path or GNU long name only


def make_tar(fmt: int, members: list[tuple[str, bytes]], extra: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if extra:
            d = tarfile.TarInfo("a-dir")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
        if extra:
            link = tarfile.TarInfo("a-link")
            link.type = tarfile.SYMTYPE
            link.linkname = "l" * 150  # a long link name: pax linkpath or GNU 'K'
            tar.addfile(link)
    return buf.getvalue()


def by_tarfile(raw: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tar:
        return [(i.name, tar.extractfile(i).read()) for i in tar if i.isreg()]


MEMBERS = [
    ("s0.jpg", os.urandom(1000)),
    ("s0.json", b'{"mos": 3.2}'),
    ("empty.txt", b""),
    ("exact.bin", os.urandom(1024)),  # a whole number of blocks: no padding
    (LONG, os.urandom(700)),
    (VERY_LONG, b"{}"),
    ("ünïcödé/é.jpg", os.urandom(10)),
]


@pytest.mark.parametrize(
    "fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=str
)
def test_reads_what_tarfile_reads(fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [m for m in MEMBERS if m[0] != VERY_LONG]
    if fmt == tarfile.USTAR_FORMAT:  # ustar cannot hold non-ASCII names or long link names
        members = [m for m in members if m[0].isascii()]
    raw = make_tar(fmt, members, extra=fmt != tarfile.USTAR_FORMAT)
    ours = list(iter_tar(io.BytesIO(raw), len(raw)))
    assert ours == by_tarfile(raw) == members


class Trickle(io.RawIOBase):
    """A stream that returns at most 97 bytes per read, as network streams may."""

    def __init__(self, raw: bytes):
        self.buf = io.BytesIO(raw)

    def readable(self):
        return True

    def read(self, n=-1):
        return self.buf.read(min(n, 97) if n >= 0 else 97)


def test_short_reads_are_completed():
    raw = make_tar(tarfile.PAX_FORMAT, MEMBERS)
    assert list(iter_tar(Trickle(raw), len(raw))) == MEMBERS


def test_an_archive_without_members_yields_nothing():
    raw = make_tar(tarfile.PAX_FORMAT, [], extra=False)
    assert list(iter_tar(io.BytesIO(raw), len(raw))) == []


def test_a_cut_inside_a_member_names_it_after_the_whole_members():
    raw = make_tar(tarfile.PAX_FORMAT, MEMBERS[:2], extra=False)
    cut = raw[: 512 + 1024 + 512 + 5]  # inside s0.json's data
    got = []
    with pytest.raises(TruncatedShard) as e:
        for m in iter_tar(io.BytesIO(cut), len(cut)):
            got.append(m)
    assert got == MEMBERS[:1] and e.value.member == "s0.json"


def test_a_cut_at_a_header_boundary_is_a_missing_end_marker():
    raw = make_tar(tarfile.USTAR_FORMAT, MEMBERS[:2], extra=False)
    cut = raw[: 512 + 1024]  # s0.jpg whole (header + 2 data blocks), then nothing
    got = []
    with pytest.raises(TruncatedShard, match="no end-of-archive marker") as e:
        for m in iter_tar(io.BytesIO(cut), len(cut)):
            got.append(m)
    assert got == MEMBERS[:1] and e.value.member is None


def test_not_a_tar_and_an_empty_file():
    junk = b"this is not a tar archive" * 100
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_tar(io.BytesIO(junk), len(junk)))
    with pytest.raises(TruncatedShard):
        list(iter_tar(io.BytesIO(b""), 0))


def test_a_damaged_header_fails_its_checksum():
    raw = bytearray(make_tar(tarfile.USTAR_FORMAT, MEMBERS[:2], extra=False))
    raw[512 * 3 + 10] ^= 0xFF  # a byte of the second member's name
    with pytest.raises(TarFormatError, match="byte 1536"):
        list(iter_tar(io.BytesIO(bytes(raw)), len(raw)))


def test_numbers_in_octal_and_base_256():
    assert _number(b"0000644\0") == 0o644
    assert _number(b"        ") == 0
    big = 9 * 2**33  # over the 8 GiB that 11 octal digits hold
    assert _number(bytes([0x80]) + big.to_bytes(11, "big")) == big
    with pytest.raises(TarFormatError):
        _number(b"12x4\0")


def test_a_checksum_summed_as_signed_chars_is_accepted():
    """Some old tar programs sum the header as signed chars; tarfile accepts that, and so do we."""
    raw = bytearray(make_tar(tarfile.USTAR_FORMAT, [("é/ü.jpg", b"x" * 10)], extra=False))
    header = raw[:512]
    assert any(b > 127 for b in header)  # the UTF-8 name: bytes that sum differently signed
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 8 * 32
    raw[148:156] = b"%06o\0 " % signed
    assert by_tarfile(bytes(raw)) == [("é/ü.jpg", b"x" * 10)]
    assert list(iter_tar(io.BytesIO(bytes(raw)), len(raw))) == [("é/ü.jpg", b"x" * 10)]
