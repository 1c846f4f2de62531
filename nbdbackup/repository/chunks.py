"""Chunk files: the content of a disk range, named by its chunk id (chunkid.py).

    offset  size  field
    0       4     magic b"NBDC"
    4       1     format version (1)
    5       1     encoding: 0 stored as is, 1 zstd frame (with its content checksum)
    6       2     reserved, zero
    8       4     uncompressed length, little-endian
    12      ...   payload
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

import zstandard

from ..errors import RepositoryDamaged
from .chunkid import ChunkIds

MAGIC = b"NBDC"
VERSION = 1
STORED, ZSTD = 0, 1
_HEADER = struct.Struct("<4sBBHI")
HEADER_SIZE = _HEADER.size

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


PROBES = 4  # samples of a chunk tried before compressing it whole
SAMPLE = 16 * 1024  # bytes per sample


def encode(data: bytes | bytearray | memoryview, level: int) -> list[bytes | bytearray | memoryview]:
    """The chunk file for data, as parts to write in order (header, payload).

    Data is stored as is when compression does not pay: when none of PROBES
    samples spread over it (the middle of each quarter) compresses at level 1
    (random or encrypted data: skipping the attempt saves a full zstd pass), or
    when the result would save less than 1/64.  One compressible sample is
    enough to compress the whole chunk: a chunk that mixes incompressible and
    compressible data (a disk's neighbouring files) is compressed, zstd passing
    over the incompressible parts quickly.
    """
    if len(data) >= 4 * PROBES * SAMPLE and incompressible(memoryview(data)):
        return [_HEADER.pack(MAGIC, VERSION, STORED, 0, len(data)), data]
    packed = _compressor(level).compress(data)
    if len(packed) < len(data) - len(data) // 64:
        return [_HEADER.pack(MAGIC, VERSION, ZSTD, 0, len(data)), packed]
    return [_HEADER.pack(MAGIC, VERSION, STORED, 0, len(data)), data]


def incompressible(view: memoryview) -> bool:
    """True if no sample of view (one from the middle of each of PROBES equal parts) shrinks by
    1/64 at zstd level 1."""
    probe = _compressor(1)
    n = len(view)
    for i in range(PROBES):
        at = (2 * i + 1) * n // (2 * PROBES) - SAMPLE // 2
        if len(probe.compress(view[at:at + SAMPLE])) < SAMPLE - SAMPLE // 64:
            return False
    return True


def decode(blob: bytes | memoryview, expected_id: bytes, where: str, chunk_id: ChunkIds) -> bytes:
    """The chunk's content, checked against its name; RepositoryDamaged otherwise."""
    encoding, length, payload = _parse(blob, expected_id, where)
    if encoding == ZSTD:
        try:
            data = _decompressor().decompress(payload, max_output_size=length)
        except zstandard.ZstdError as exc:
            raise _undecompressable(expected_id, exc, where) from None
    else:
        data = bytes(payload)
    if len(data) != length or chunk_id(data) != expected_id:
        raise RepositoryDamaged(f"chunk {expected_id.hex()} fails its checksum ({where})")
    return data


def decode_into(blob: bytes | memoryview, expected_id: bytes, where: str, chunk_id: ChunkIds,
                buffer: Callable[[int], memoryview]) -> memoryview:
    """decode() into a caller's buffer: buffer(length) returns one of at least the content's
    length; the result is the view of it that holds the checked content.  Restore reuses its
    (page-aligned) buffers this way: no new 4 MiB object per chunk, and the content can go to
    disk with O_DIRECT."""
    encoding, length, payload = _parse(blob, expected_id, where)
    out = buffer(length)
    if len(out) < length:
        raise ValueError(f"buffer of {len(out)} bytes for a chunk of {length}")
    view = out[:length]
    if encoding == ZSTD:
        for _ in _pieces(payload, True, length, lambda done: out[done:length], expected_id, where):
            pass  # each piece lands in out where it belongs
    else:
        if len(payload) != length:
            raise RepositoryDamaged(f"chunk {expected_id.hex()} fails its checksum ({where})")
        view[:] = payload
    if chunk_id(view) != expected_id:
        raise RepositoryDamaged(f"chunk {expected_id.hex()} fails its checksum ({where})")
    return view


STEP = 256 * 1024  # read_ranges' pieces: each hashed (and copied from) while in the CPU's cache


def read_ranges(source: BinaryIO | bytes | memoryview, expected_id: bytes, where: str, chunk_id: ChunkIds,
                ranges: Sequence[tuple[int, int]], out: memoryview, step: memoryview) -> None:
    """Check a chunk whole, as decode() does (header, length, id), and copy the ranges (content
    offset, length) of its content into out, one after another.  The content is decoded in pieces
    through step (a small buffer the caller reuses, STEP bytes suit): no memory for the whole
    content nor the whole chunk file, and each piece is hashed while it is in the CPU's cache.
    Rollback's writers need a few ranges of each chunk.  source: the chunk file, open and at its
    start, or its bytes.  out holds the ranges only once this returns; on damage (RepositoryDamaged)
    what it holds must not be used."""
    file: BinaryIO | None = None
    if isinstance(source, (bytes, bytearray, memoryview)):
        encoding, length, payload = _parse(source, expected_id, where)
    else:
        file = source
        encoding, length, payload = _parse(file.read(HEADER_SIZE), expected_id, where)
    for at, n in ranges:
        if at < 0 or n < 0 or at + n > length:
            raise RepositoryDamaged(f"chunk {expected_id.hex()} is shorter than its index says ({where})")
    spans = []  # (content offset, length, where in out)
    total = 0
    for at, n in ranges:
        spans.append((at, n, total))
        total += n
    if len(out) < total:
        raise ValueError(f"buffer of {len(out)} bytes for {total} bytes of ranges")
    hasher = chunk_id.hasher()

    def take(pos: int, piece: memoryview) -> None:
        hasher.update(piece)
        end = pos + len(piece)
        for at, n, dest in spans:
            lo, hi = max(at, pos), min(at + n, end)
            if lo < hi:
                out[dest + lo - at:dest + hi - at] = piece[lo - pos:hi - pos]

    if encoding == STORED and file is None:
        if len(payload) != length:
            raise RepositoryDamaged(f"chunk {expected_id.hex()} fails its checksum ({where})")
        take(0, payload)
    else:  # the file's content as it is, or a zstd frame from the file or the bytes: in pieces
        done = 0
        for piece in _pieces(payload if file is None else file, encoding == ZSTD, length,
                             lambda n: step[:min(len(step), length - n)], expected_id, where):
            take(done, piece)
            done += len(piece)
    if hasher.digest() != expected_id:
        raise RepositoryDamaged(f"chunk {expected_id.hex()} fails its checksum ({where})")


def _pieces(source: Any, compressed: bool, length: int, into: Callable[[int], memoryview], expected_id: bytes,
            where: str) -> Iterator[memoryview]:
    """A chunk's content, read from source (a zstd frame, as bytes or the chunk file, when compressed;
    else the chunk file, open at the content) into the views into(bytes done so far) gives, each
    yielded once filled; RepositoryDamaged unless there are exactly length bytes."""
    done = 0
    try:
        reader = _decompressor().stream_reader(source, closefd=False) if compressed else source
        while done < length and (got := reader.readinto(view := into(done))):
            yield view[:got]
            done += got
        overrun = reader.read(1)
    except zstandard.ZstdError as exc:
        raise _undecompressable(expected_id, exc, where) from None
    if done != length or overrun:
        raise RepositoryDamaged(f"chunk {expected_id.hex()} fails its checksum ({where})")


def _parse(blob: bytes | memoryview, expected_id: bytes, where: str) -> tuple[int, int, memoryview]:
    """(encoding, content length, payload) from a chunk file's header."""
    if len(blob) < HEADER_SIZE:
        raise RepositoryDamaged(f"chunk {expected_id.hex()} is truncated ({where})")
    magic, version, encoding, _reserved, length = _HEADER.unpack_from(blob)
    if magic != MAGIC or version != VERSION:
        raise RepositoryDamaged(f"chunk {expected_id.hex()} has a bad header ({where})")
    if encoding not in (STORED, ZSTD):
        raise RepositoryDamaged(f"chunk {expected_id.hex()} has unknown encoding {encoding} ({where})")
    return encoding, length, memoryview(blob)[HEADER_SIZE:]


def _undecompressable(expected_id: bytes, exc: Exception, where: str) -> RepositoryDamaged:
    return RepositoryDamaged(f"chunk {expected_id.hex()} is damaged: it does not decompress ({exc}) ({where})")
