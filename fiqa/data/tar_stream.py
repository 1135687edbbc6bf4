"""A streaming reader of tar archives' regular files, for WebDataset shards.

Python's `tarfile` builds header objects, parses pax and wraps the stream for every
member in pure Python, a real share of decoding a small face crop. This reader does
only what reading a shard needs: walk the 512-byte headers in order and hand out each
regular file's name and bytes.

Formats: ustar (with its name prefix), POSIX pax (``x`` headers: ``path``,
``size``; ``g`` global headers are skipped) and GNU long names (``L``).
Directories, links and other entries are skipped, as are their data blocks.

A shard is untrusted input, so the reader bounds what it holds: data is read in chunks of
at most `CHUNK` bytes (a header claiming 200 GB allocates nothing it has not read), a
member's claimed size is checked against what remains of the shard when its size is
known, a member over ``max_member_bytes`` is skipped unread, and pax and GNU long-name
headers are held only up to `MAX_HEADER_BYTES`. With ``skipped=True`` the members whose
data is not handed out (links, devices, FIFOs, directories, members over the cap) are
yielded too, as ``(name, Skipped)``, so that a caller can account for each. Member names
are only returned, never used as paths.

Failures are explicit, never a silent short read:

- `TarFormatError` for a header whose checksum does not match (not a tar,
  or a damaged one) or whose fields cannot be parsed, and for anything but zeros after
  the first zero block (members after it would otherwise go unread without a trace);
- `TruncatedShard` when a member's data is shorter than its header says (or claims more
  bytes than remain in the shard), or when the archive ends without its end-of-archive
  marker (two zero blocks), which is how a shard cut short at a header boundary shows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

BLOCK = 512
_ZERO = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_META = (b"x", b"g", b"L", b"K")  # pax, pax global, GNU long name, GNU long link name
# What a skipped member is, in its Skipped.detail; other typeflags are "type X".
_KINDS = {
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "character device",
    b"4": "block device",
    b"5": "directory",
    b"6": "FIFO",
    b"D": "GNU dump directory",
    b"S": "GNU sparse file",
    b"V": "volume header",
}
CHUNK = 1 << 20  # the most read (and allocated) at once
# pax and GNU long-name headers: a few hundred bytes in any real shard; more is hostile.
MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_MEMBER_BYTES = 64 << 20  # DataConfig.max_member_bytes


@dataclass(frozen=True)
class Skipped:
    """A member whose data is not handed out: ``reason`` (``not_a_file``,
    ``member_too_large``) and what it was."""

    reason: str
    detail: str


class TarFormatError(Exception):
    """A header that is not a valid tar header."""


class TruncatedShard(Exception):
    """The archive ends inside a member (``member``), or without its end-of-archive marker."""

    def __init__(self, message: str, member: str | None = None):
        super().__init__(message)
        self.member = member


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes; fewer only at the end of the stream. Read in chunks of `CHUNK`, so
    that a size claimed by a header costs only the bytes that are really there."""
    chunks, left = [], n
    while left > 0:
        chunk = stream.read(min(left, CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _skip(stream: BinaryIO, n: int) -> int:
    """Read past ``n`` bytes, holding one chunk at a time; returns how many were there."""
    done = 0
    while done < n:
        chunk = stream.read(min(n - done, CHUNK))
        if not chunk:
            break
        done += len(chunk)
    return done


def _check_only_zeros(stream: BinaryIO, offset: int) -> None:
    """Raise `TarFormatError` if anything but zeros follows the zero block at ``offset``:
    members after a lone zero block, or a second archive appended, would go unread unseen."""
    at = offset + BLOCK
    while chunk := stream.read(CHUNK):
        if chunk.count(0) != len(chunk):
            first = at + len(chunk) - len(chunk.lstrip(b"\0"))
            raise TarFormatError(
                f"data at byte {first} after the end-of-archive block at byte {offset}"
            )
        at += len(chunk)


def _cut_in_padding(what: str) -> TruncatedShard:
    return TruncatedShard(f"no end-of-archive marker: the archive ends in the padding after {what}")


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when the first bit is set."""
    if field[:1] and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad number {field!r} in a tar header") from None


def _check(header: bytes, offset: int) -> None:
    try:
        stored = _number(header[148:156])
    except TarFormatError:
        raise TarFormatError(f"invalid tar header at byte {offset} (no checksum)") from None
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if stored == unsigned:
        return
    # Some old tar programs summed the header as signed chars: a byte above 127 counts 256 less.
    high = sum(1 for b in header[:148] + header[156:] if b > 127)
    if stored != unsigned - 256 * high:
        raise TarFormatError(f"invalid tar header at byte {offset} (checksum mismatch)")


def _pax_records(data: bytes) -> dict[str, str]:
    """``"<length> <key>=<value>\\n"`` records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError("bad pax record length") from None
        if length <= 0 or pos + length > len(data):
            raise TarFormatError("bad pax record length")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def iter_tar(
    stream: BinaryIO,
    size: int | None = None,
    max_member_bytes: int | None = None,
    skipped: bool = False,
) -> Iterator[tuple[str, bytes | Skipped]]:
    """Yield ``(name, data)`` for each regular file of the tar read from ``stream``.

    ``size``, the archive's length in bytes when known, lets the end-of-archive
    check tell an archive cut short at a header boundary from a complete one, and a member
    that claims more bytes than remain raise `TruncatedShard` before anything is read.
    A member over ``max_member_bytes`` (None: no cap) is read past, not held. With
    ``skipped``, each member whose data is not handed out is yielded as ``(name, Skipped)``.
    """
    offset = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = _read_exact(stream, BLOCK)
        if len(header) < BLOCK:
            break  # the end of the stream (checked below)
        if header == _ZERO:  # the end-of-archive marker: only zeros may follow it
            _check_only_zeros(stream, offset)
            break
        _check(header, offset)
        kind = header[156:157]
        name = header[0:100].split(b"\0", 1)[0]
        if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX ustar name prefix
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        member_size = _number(header[124:136])
        if "size" in pax:
            try:
                member_size = int(pax["size"])
            except ValueError:
                raise TarFormatError(f"bad pax size {pax['size'][:40]!r}") from None
        if member_size < 0:
            raise TarFormatError(f"negative member size at byte {offset}")
        offset += BLOCK
        full = long_name or pax.get("path") or name.decode("utf-8", "replace")
        meta = kind in _META
        member = None if meta else full  # a meta header's own name is no sample's
        what = "an extended header" if meta else full
        if size is not None and member_size > size - offset:
            raise TruncatedShard(
                f"{what}: claims {member_size} bytes, {max(size - offset, 0)} remain in the shard",
                member=member,
            )
        if meta and member_size > MAX_HEADER_BYTES:
            raise TarFormatError(f"a {member_size}-byte extended header at byte {offset - BLOCK}")
        regular = kind in _REGULAR
        too_large = regular and max_member_bytes is not None and member_size > max_member_bytes
        if (meta or regular) and not too_large:
            data = _read_exact(stream, member_size)
            got = len(data)
        else:  # not handed out: read past it, one chunk at a time
            data, got = b"", _skip(stream, member_size)
        if got != member_size:
            raise TruncatedShard(f"{what}: {got} of {member_size} bytes", member=member)
        padding = -member_size % BLOCK
        # The member itself is whole where the archive ends inside its padding: it is handed
        # out, then the cut is reported (the size of the stream known or not).
        cut = padding > 0 and len(_read_exact(stream, padding)) != padding
        offset += member_size + padding
        if cut and meta:
            raise _cut_in_padding(what)  # the member it describes is not there
        if kind == b"x":  # pax header: applies to the next member
            pax = _pax_records(data)
            continue
        if kind == b"g":  # pax global header: nothing a shard reader needs
            continue
        if kind == b"K":  # GNU long link name: links are skipped anyway
            continue
        if kind == b"L":  # GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        long_name, pax = None, {}
        if not regular:
            if skipped:
                yield full, Skipped("not_a_file", _KINDS.get(kind, f"type {kind!r}"))
        elif too_large:
            if skipped:
                yield full, Skipped("member_too_large", f"{member_size} bytes > {max_member_bytes}")
        else:
            yield full, data
        if cut:
            raise _cut_in_padding(what)
    if size is not None and size < offset + 2 * BLOCK:
        raise TruncatedShard(f"no end-of-archive marker after byte {offset} of {size}")
