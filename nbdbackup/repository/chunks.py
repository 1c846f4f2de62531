"""Chunk files: the content of a disk range, named by its chunk id (chunkid.py).

Version 1 (repositories of format 1 and 2, whose ids hash the content whole):

    offset  size  field
    0       4     magic b"NBDC"
    4       1     chunk file version (1)
    5       1     encoding: 0 stored as is, 1 zstd frame (with its content checksum)
    6       2     reserved, zero
    8       4     uncompressed length, little-endian
    12      ...   payload

Version 2 (format 3: tree ids, chunkid.ChunkIds.tree): the content in pieces of
2**shift bytes, each piece's hash in the header, each piece its own zstd frame,
so that a reader can check and decode any piece without the others:

    0       4     magic b"NBDC"
    4       1     chunk file version (2)
    5       1     encoding: 0 stored as is, 1 one zstd frame per piece
    6       1     shift: the piece size is 2**shift bytes
    7       1     reserved, zero
    8       4     uncompressed length, little-endian
    12      32n   the n pieces' hashes (n = length / piece size, rounded up)
    ..      4n    encoding 1 only: each frame's length, little-endian
    ..      ...   payload: the content, or the n frames one after another
"""

from __future__ import annotations

import itertools
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, cast

import zstandard

from ..errors import RepositoryDamaged
from .chunkid import ChunkIds


class ChunkFile(Protocol):
    """A chunk file read in part: a file open for reading, or backend.RangedReader (an object store)."""

    def read(self, n: int, /) -> bytes: ...

    def seek(self, pos: int, /) -> object: ...


MAGIC = b"NBDC"
VERSION = 1
VERSION_PIECES = 2
STORED, ZSTD = 0, 1
_HEADER = struct.Struct("<4sBBHI")
_HEADER_PIECES = struct.Struct("<4sBBBBI")
HEADER_SIZE = _HEADER.size  # both versions' fixed part
HASH_SIZE = 32

_local = threading.local()


def _compressor(level: int, checksum: bool = True) -> zstandard.ZstdCompressor:
    """This thread's compressor; without checksum for pieces, which their hashes check."""
    cache = _local.__dict__.setdefault("compressors", {})
    if (level, checksum) not in cache:
        cache[level, checksum] = zstandard.ZstdCompressor(level=level, write_checksum=checksum, write_content_size=True)
    return cache[level, checksum]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


PROBES = 4  # samples of a chunk tried before compressing it whole
SAMPLE = 16 * 1024  # bytes per sample


def encode(data: bytes | bytearray | memoryview, level: int, hashes: Sequence[bytes] = (), piece: int = 0
           ) -> list[bytes | bytearray | memoryview]:
    """The chunk file for data, as parts to write in order (header, payload...): version 1, or
    with piece (the repository's ChunkIds.piece) version 2, hashes being data's piece hashes."""
    view = memoryview(data)
    length = len(view)
    if piece and (len(hashes) != -(-length // piece) or any(len(h) != HASH_SIZE for h in hashes)):
        raise ValueError(f"{len(hashes)} piece hashes for {length} bytes in pieces of {piece}")
    frames = _compressed(view, level, piece)
    encoding = STORED if frames is None else ZSTD
    if not piece:
        return [_HEADER.pack(MAGIC, VERSION, encoding, 0, length), data if frames is None else frames[0]]
    header = _HEADER_PIECES.pack(MAGIC, VERSION_PIECES, encoding, piece.bit_length() - 1, 0, length) + b"".join(hashes)
    if frames is None:
        return [header, view]
    return [header + struct.pack(f"<{len(frames)}I", *(len(f) for f in frames)), *frames]


def _compressed(view: memoryview, level: int, piece: int) -> list[bytes] | None:
    """The content as zstd frames (one, or with piece one per piece), or None: store it as is.

    Data is stored as is when compression does not pay: when none of PROBES
    samples spread over it (the middle of each quarter) compresses at level 1
    (random or encrypted data: skipping the attempt saves a full zstd pass), or
    when the result would save less than 1/64.  One compressible sample is
    enough to compress the whole chunk: a chunk that mixes incompressible and
    compressible data (a disk's neighbouring files) is compressed, zstd passing
    over the incompressible parts quickly.
    """
    length = len(view)
    if length >= 4 * PROBES * SAMPLE and incompressible(view):
        return None
    if piece:  # each piece alone (its hash checks it: no zstd checksum)
        compressor = _compressor(level, checksum=False)
        frames = [compressor.compress(view[at:at + piece]) for at in range(0, length, piece)]
    else:
        frames = [_compressor(level).compress(view)]
    return frames if sum(len(f) for f in frames) < length - length // 64 else None


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


def decode(blob: bytes | memoryview, expected_id: bytes, where: str, chunk_id: ChunkIds) -> bytes | bytearray:
    """The chunk's content, checked against its name, in memory of its own (blob may be a buffer
    its caller reuses); RepositoryDamaged otherwise."""
    if chunk_id.piece:  # decoded into a bytearray of exactly its length, returned as is: no second copy
        return cast(bytearray, decode_into(blob, expected_id, where, chunk_id, lambda n: memoryview(bytearray(n))).obj)
    encoding, length, payload = _parse(blob, expected_id, where, chunk_id)
    if encoding == ZSTD:
        try:
            data = _decompressor().decompress(payload, max_output_size=length)
        except zstandard.ZstdError as exc:
            raise _undecompressable(expected_id, exc, where) from None
    else:
        data = bytes(payload)
    if len(data) != length or chunk_id(data) != expected_id:
        raise _damaged(expected_id, where)
    return data


def decode_into(blob: bytes | memoryview, expected_id: bytes, where: str, chunk_id: ChunkIds,
                buffer: Callable[[int], memoryview]) -> memoryview:
    """decode() into a caller's buffer: buffer(length) returns one of at least the content's
    length; the result is the view of it that holds the checked content.  Restore reuses its
    (page-aligned) buffers this way: no new 4 MiB object per chunk, and the content can go to
    disk with O_DIRECT."""
    encoding, length, payload = _parse(blob, expected_id, where, chunk_id)
    out = buffer(length)
    if len(out) < length:
        raise ValueError(f"buffer of {len(out)} bytes for a chunk of {length}")
    view = out[:length]
    pieces = _Pieces(blob, encoding, length, chunk_id, expected_id, where) if chunk_id.piece else None
    if encoding == ZSTD:  # one frame, or one per piece read as one stream
        for _ in _stream(payload, True, length, lambda done: out[done:length], expected_id, where, across=pieces is not None):
            pass  # each part lands in out where it belongs
    else:
        if len(payload) != length:
            raise _damaged(expected_id, where)
        view[:] = payload
    if not (pieces.match(view) if pieces is not None else chunk_id(view) == expected_id):
        raise _damaged(expected_id, where)
    return view


STEP = 256 * 1024  # read_ranges' parts (before version 3): each hashed (and copied from) while in the CPU's cache


def read_ranges(source: ChunkFile | bytes | memoryview, expected_id: bytes, where: str, chunk_id: ChunkIds,
                ranges: Sequence[tuple[int, int]], out: memoryview, step: memoryview) -> None:
    """Copy the ranges (content offset, length) of a chunk's content into out, one after another,
    each byte checked as decode() checks it.  A chunk of tree ids (file version 2): only the pieces
    the ranges touch are read, decoded and checked (each against its hash in the header, checked
    against the chunk id first).  Otherwise the chunk is checked whole (header, length, id), its
    content decoded in parts through step.  step: a buffer the caller reuses, of STEP bytes (or the
    piece size, if larger): no memory for the whole content nor the whole chunk file, each part
    hashed while it is in the CPU's cache.  Rollback's writers need a few ranges of each chunk.
    source: the chunk file, open and at its start, or its bytes.  out holds the ranges only once
    this returns; on damage (RepositoryDamaged) what it holds must not be used."""
    file, head, encoding, length, payload = _head(source, expected_id, where, chunk_id)
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

    def take(pos: int, part: memoryview) -> None:
        """Copy what the ranges want of the content's bytes pos.. (part) into out."""
        end = pos + len(part)
        for at, n, dest in spans:
            lo, hi = max(at, pos), min(at + n, end)
            if lo < hi:
                out[dest + lo - at:dest + hi - at] = part[lo - pos:hi - pos]

    if chunk_id.piece:
        pieces = _Pieces(head, encoding, length, chunk_id, expected_id, where)
        size = pieces.size
        if len(step) < size:
            step = memoryview(bytearray(size))
        wanted = sorted({i for at, n, _ in spans if n for i in range(at // size, (at + n - 1) // size + 1)})
        for i in wanted:
            take(i * size, pieces.read(i, payload if file is None else file, step[:size]))
        return
    hasher = chunk_id.hasher()
    if encoding == STORED and file is None:
        if len(payload) != length:
            raise _damaged(expected_id, where)
        hasher.update(payload)
        take(0, payload)
    else:  # the file's content as it is, or a zstd frame from the file or the bytes: in parts
        done = 0
        for part in _stream(payload if file is None else file, encoding == ZSTD, length,
                            lambda n: step[:min(len(step), length - n)], expected_id, where):
            hasher.update(part)
            take(done, part)
            done += len(part)
    if hasher.digest() != expected_id:
        raise _damaged(expected_id, where)


def read_piece(source: ChunkFile | bytes | memoryview, expected_id: bytes, where: str, chunk_id: ChunkIds, i: int) -> memoryview:
    """Piece i of a version 2 chunk file's content (chunk_id.piece bytes, the last piece shorter),
    checked as read_ranges checks it, in a buffer of its own: what a random reader of a served
    backup needs, without decoding the other pieces.  source: as for read_ranges."""
    file, head, encoding, length, payload = _head(source, expected_id, where, chunk_id)
    pieces = _Pieces(head, encoding, length, chunk_id, expected_id, where)
    if not 0 <= i < pieces.count:
        raise RepositoryDamaged(f"chunk {expected_id.hex()} is shorter than its index says ({where})")
    dest = memoryview(bytearray(chunk_id.piece))
    content = pieces.read(i, payload if file is None else file, dest)
    if content.obj is not dest.obj:  # stored as is, a view of source: copied, source may be reused
        dest[:len(content)] = content
        content = dest[:len(content)]
    return content


def _head(source: ChunkFile | bytes | memoryview, expected_id: bytes, where: str, chunk_id: ChunkIds
          ) -> tuple[ChunkFile | None, Any, int, int, memoryview]:
    """(the file or None, the header with its piece table, encoding, content length, the payload
    when source is bytes) of a chunk file given as bytes or as a file open at its start."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        encoding, length, payload = _parse(source, expected_id, where, chunk_id)
        return None, source, encoding, length, payload
    head = source.read(HEADER_SIZE)
    encoding, length, payload = _parse(head, expected_id, where, chunk_id)
    if chunk_id.piece:
        head += source.read(_table_size(encoding, length, chunk_id.piece))
    return source, head, encoding, length, payload


class _Pieces:
    """A version 2 chunk file's pieces: its header's table, checked against the chunk id at once,
    then read(i) gives piece i's content, decoded and checked against its hash."""

    def __init__(self, head: bytes | memoryview, encoding: int, length: int, chunk_id: ChunkIds, expected_id: bytes,
                 where: str) -> None:
        self.size, self.encoding, self.length = chunk_id.piece, encoding, length
        self.count = -(-length // self.size)
        self.chunk_id, self.expected_id, self.where = chunk_id, expected_id, where
        table_size = _table_size(encoding, length, self.size)
        table = memoryview(head)[HEADER_SIZE:HEADER_SIZE + table_size]
        if len(table) < table_size:
            raise _truncated(expected_id, where)
        self.hashes = table[:self.count * HASH_SIZE]
        if chunk_id.root(length, self.hashes) != expected_id:
            raise _damaged(expected_id, where)
        self.start = HEADER_SIZE + len(table)  # where the payload starts in the file
        if encoding == ZSTD:
            sizes = struct.unpack_from(f"<{self.count}I", table, self.count * HASH_SIZE)
            self.offsets = list(itertools.accumulate(sizes, initial=0))
        else:
            self.offsets = [min(i * self.size, length) for i in range(self.count + 1)]

    def match(self, content: memoryview) -> bool:
        """Whether the whole content has the pieces' hashes."""
        return b"".join(self.chunk_id.piece_hashes(content)) == self.hashes

    def read(self, i: int, source: ChunkFile | memoryview, dest: memoryview) -> memoryview:
        """Piece i's checked content, from source (the payload's bytes, or the chunk file):
        decoded into dest, or (stored as is, from bytes) the payload's own view."""
        n = min(self.size, self.length - i * self.size)
        lo, hi = self.offsets[i], self.offsets[i + 1]
        if isinstance(source, memoryview):
            if hi > len(source) or (i == self.count - 1 and hi != len(source)):
                raise _damaged(self.expected_id, self.where)
            raw: memoryview | bytes = source[lo:hi]
        else:
            source.seek(self.start + lo)
            raw = source.read(hi - lo)
            if len(raw) != hi - lo:
                raise _truncated(self.expected_id, self.where)
        if self.encoding == ZSTD:
            content = dest[:n]
            for _ in _stream(raw, True, n, lambda done: content[done:], self.expected_id, self.where):
                pass
        elif isinstance(raw, memoryview):
            content = raw
        else:
            content = dest[:n]
            content[:] = raw
        if len(content) != n or self.chunk_id.piece_hash(content) != self.hashes[i * HASH_SIZE:(i + 1) * HASH_SIZE]:
            raise _damaged(self.expected_id, self.where)
        return content


def _table_size(encoding: int, length: int, piece: int) -> int:
    """The bytes between a version 2 header's fixed part and its payload."""
    count = -(-length // piece)
    return count * HASH_SIZE + (count * 4 if encoding == ZSTD else 0)


def _stream(source: Any, compressed: bool, length: int, into: Callable[[int], memoryview], expected_id: bytes,
            where: str, across: bool = False) -> Iterator[memoryview]:
    """A chunk's content (or a piece's), read from source (a zstd frame, or with across several one
    after another, as bytes or the chunk file, when compressed; else the chunk file, open at the
    content) into the views into(bytes done so far) gives, each yielded once filled;
    RepositoryDamaged unless there are exactly length bytes."""
    done = 0
    try:
        reader = _decompressor().stream_reader(source, closefd=False, read_across_frames=across) if compressed else source
        while done < length and (got := reader.readinto(view := into(done))):
            yield view[:got]
            done += got
        overrun = reader.read(1)
    except zstandard.ZstdError as exc:
        raise _undecompressable(expected_id, exc, where) from None
    if done != length or overrun:
        raise _damaged(expected_id, where)


def _parse(blob: bytes | memoryview, expected_id: bytes, where: str, chunk_id: ChunkIds) -> tuple[int, int, memoryview]:
    """(encoding, content length, payload) from a chunk file's header: the version chunk_id's
    repository writes (1, or 2 for tree ids, whose payload starts after the table)."""
    if len(blob) < HEADER_SIZE:
        raise _truncated(expected_id, where)
    magic, version, encoding, shift, _reserved, length = _HEADER_PIECES.unpack_from(blob)
    if magic != MAGIC or version != (VERSION_PIECES if chunk_id.piece else VERSION) or (
            chunk_id.piece and 1 << min(shift, 63) != chunk_id.piece):
        raise RepositoryDamaged(f"chunk {expected_id.hex()} has a bad header ({where})")
    if encoding not in (STORED, ZSTD):
        raise RepositoryDamaged(f"chunk {expected_id.hex()} has unknown encoding {encoding} ({where})")
    start = HEADER_SIZE + (_table_size(encoding, length, chunk_id.piece) if chunk_id.piece else 0)
    return encoding, length, memoryview(blob)[start:]


def _truncated(expected_id: bytes, where: str) -> RepositoryDamaged:
    return RepositoryDamaged(f"chunk {expected_id.hex()} is truncated ({where})")


def _damaged(expected_id: bytes, where: str) -> RepositoryDamaged:
    return RepositoryDamaged(f"chunk {expected_id.hex()} fails its checksum ({where})")


def _undecompressable(expected_id: bytes, exc: Exception, where: str) -> RepositoryDamaged:
    return RepositoryDamaged(f"chunk {expected_id.hex()} is damaged: it does not decompress ({exc}) ({where})")
