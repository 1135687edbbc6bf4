"""A streaming reader of tar archives' regular files, for WebDataset shards.

Python's `tarfile` builds header objects, parses pax and wraps the stream for every
member in pure Python, a real share of decoding a small face crop. This reader does
only what reading a shard needs: walk the 512-byte headers in order and hand out each
regular file's name and bytes.

Formats: ustar (with its name prefix), POSIX pax (``x`` headers: ``path``,
``size``; ``g`` global headers are skipped) and GNU long names (``L``).
Directories, links and other entries are skipped, as are their data blocks.

Failures are explicit, never a silent short read:

- `TarFormatError` for a header whose checksum does not match (not a tar,
  or a damaged one) or whose fields cannot be parsed;
- `TruncatedShard` when a member's data is shorter than its header says, or
  when the archive ends without its end-of-archive marker (two zero blocks),
  which is how a shard cut short at a header boundary shows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
_ZERO = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file


class TarFormatError(Exception):
    """A header that is not a valid tar header."""


class TruncatedShard(Exception):
    """The archive ends inside a member (``member``), or without its end-of-archive marker."""

    def __init__(self, message: str, member: str | None = None):
        super().__init__(message)
        self.member = member


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes; fewer only at the end of the stream."""
    chunks, left = [], n
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


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


def iter_tar(stream: BinaryIO, size: int | None = None) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` for each regular file of the tar read from ``stream``.

    ``size``, the archive's length in bytes when known, lets the end-of-archive
    check tell an archive cut short at a header boundary from a complete one.
    """
    offset = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = _read_exact(stream, BLOCK)
        if len(header) < BLOCK or header == _ZERO:
            break  # the end-of-archive marker, or the end of the stream (checked below)
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
                raise TarFormatError(f"bad pax size {pax['size']!r}") from None
        if member_size < 0:
            raise TarFormatError(f"negative member size at byte {offset}")
        offset += BLOCK
        data = _read_exact(stream, member_size)
        if len(data) != member_size:
            cut = long_name or pax.get("path") or name.decode("utf-8", "replace")
            raise TruncatedShard(f"{cut}: {len(data)} of {member_size} bytes", member=cut)
        padding = -member_size % BLOCK
        if padding and len(_read_exact(stream, padding)) != padding:
            # The member itself is whole; the archive ends inside its padding, so the
            # end-of-archive check below reports it.
            offset += member_size
            break
        offset += member_size + padding

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
        full = long_name or pax.get("path") or name.decode("utf-8", "replace")
        long_name, pax = None, {}
        if kind in _REGULAR:
            yield full, data
    if size is not None and size < offset + 2 * BLOCK:
        raise TruncatedShard(f"no end-of-archive marker after byte {offset} of {size}")
