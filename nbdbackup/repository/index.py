"""Disk indexes: which chunk holds each byte range of one disk in one backup.

Little-endian, specified in docs/FORMAT.md:

    header   magic b"NBDBIDX\\0" | u32 version | u32 entry size (48) | u64 disk size | u64 entry count
    entries  u64 offset | u32 length | u32 chunk offset | 32-byte chunk id     (sorted, disjoint)
    trailer  SHA-256 of header and entries

Ranges of the disk that no entry covers read as zeroes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence

from ..errors import RepositoryDamaged
from ..records import Extent, IndexEntry

MAGIC = b"NBDBIDX\0"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")
_ENTRY = struct.Struct("<QII32s")
_DIGEST = 32


def encode(disk_size: int, entries: Sequence[IndexEntry]) -> bytes:
    check(disk_size, entries)
    parts = [_HEADER.pack(MAGIC, VERSION, _ENTRY.size, disk_size, len(entries))]
    parts.extend(_ENTRY.pack(e.offset, e.length, e.chunk_offset, e.chunk) for e in entries)
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def decode(blob: bytes, where: str) -> tuple[int, list[IndexEntry]]:
    """(disk size, entries); RepositoryDamaged when anything is off."""
    if len(blob) < _HEADER.size + _DIGEST:
        raise RepositoryDamaged(f"index {where} is truncated")
    body, digest = blob[:-_DIGEST], blob[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise RepositoryDamaged(f"index {where} fails its checksum (truncated or modified)")
    magic, version, entry_size, disk_size, count = _HEADER.unpack_from(body)
    if magic != MAGIC or version != VERSION or entry_size != _ENTRY.size:
        raise RepositoryDamaged(f"index {where} has an unknown header")
    if len(body) != _HEADER.size + count * _ENTRY.size:
        raise RepositoryDamaged(f"index {where} has a wrong length")
    entries = [IndexEntry(o, n, c, co) for o, n, co, c in _ENTRY.iter_unpack(body[_HEADER.size:])]
    try:
        check(disk_size, entries)
    except ValueError as exc:
        raise RepositoryDamaged(f"index {where} is inconsistent: {exc}") from None
    return disk_size, entries


def check(disk_size: int, entries: Sequence[IndexEntry]) -> None:
    end = 0
    for e in entries:
        if e.length <= 0 or e.offset < end or e.end > disk_size:
            raise ValueError(f"entry at {e.offset} (+{e.length}) overlaps, is empty or lies past the disk end")
        end = e.end


def overlay(old: Iterable[IndexEntry], regions: Sequence[Extent], new: Iterable[IndexEntry], disk_size: int) -> list[IndexEntry]:
    """old with every byte in regions replaced by new (new lies inside regions).

    Old entries that straddle a region's edge keep their outside parts, pointing
    into the same chunk at the shifted chunk offset.  Everything past disk_size
    is dropped, so a shrunk disk needs no special case.
    """
    kept: list[IndexEntry] = []
    cut = sorted(regions, key=lambda r: r.offset)
    i = 0
    for e in old:
        start, stop = e.offset, min(e.end, disk_size)
        while start < stop:
            while i < len(cut) and cut[i].end <= start:
                i += 1
            if i == len(cut) or cut[i].offset >= stop:
                kept.append(_piece(e, start, stop))
                break
            region = cut[i]
            if region.offset > start:
                kept.append(_piece(e, start, region.offset))
            start = region.end
    merged = sorted([*kept, *new], key=lambda e: e.offset)
    check(disk_size, merged)
    return merged


def _piece(e: IndexEntry, start: int, stop: int) -> IndexEntry:
    if start == e.offset and stop == e.end:
        return e
    return IndexEntry(start, stop - start, e.chunk, e.chunk_offset + (start - e.offset))
