"""One disk of one backup point as a random-access image: what `serve` exports.

Every backup's index is complete, so any byte of any backup point is found by
one binary search in one index, without replaying a chain.  Chunks are read
through the Repository API (which checks each against its id), decompressed
once and kept in a small shared cache: NBD clients read in requests much
smaller than a chunk.  Ranges no index entry covers read as zeroes and are
reported as holes, so clients stay sparse.

Where a piece of a chunk can be read alone (Repository.reads_pieces: format 3,
unencrypted), a small read loads only the 256 KiB piece it needs: a random
4 KiB read, as a booting guest or a file restore makes, then decodes 256 KiB
instead of a 4 MiB chunk, and from S3 fetches the chunk file's header and one
frame (two ranged GETs) instead of all of it (scripts/bench --serve-only).
Reads of a piece or more (nbdcopy, QEMU's block jobs), and a read that starts
where the last one ended (a reader going through the disk in small steps),
load whole chunks: cheaper per byte for a reader that wants all of them, and
what read-ahead builds on.  Encrypted chunks are authenticated whole, so
every load is a whole chunk there.  The cache is bounded in bytes, whatever
it holds.

Read-ahead (repositories that are not local directories, such as S3, where
each chunk costs a round trip): a reader that moves on to the next chunk
(the previous entry's chunk is still cached) gets the following READ_AHEAD
chunks loaded in the background; reaching one of those continues the window,
like the kernel's read-ahead marker.  Clients with one request in flight
(QEMU's block-stream, a booting guest) then wait for S3 once, not per chunk.
Memory stays bounded: read-ahead fills the same cache, within its limit,
and at most LOADS chunks are loaded at once, whatever the number of server
threads: CACHE_BYTES + 3 x LOADS x chunk size at most.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from .errors import RepositoryDamaged
from .records import IndexEntry, Manifest
from .repository import Repository

CHUNK = 4 * 1024 * 1024  # the largest chunk (capture.Capture.chunk_size)
CACHE_BYTES = 32 * CHUNK  # decompressed content kept (read-ahead included)
READ_AHEAD = 4  # chunks loaded ahead of a reader moving forward (remote repositories)
LOADS = 8  # chunks loaded at once (each holds its stored and its decoded form: memory)

Unit = tuple[bytes, "int | None"]  # what the cache holds: (chunk id, piece index), or (chunk id, None) the whole chunk


class BackupImage:
    """Thread-safe reads of disk `disk_id` of backup `manifest`."""

    def __init__(self, repo: Repository, manifest: Manifest, disk_id: str, cache_bytes: int = CACHE_BYTES,
                 read_ahead: int | None = None) -> None:
        """read_ahead: chunks to load ahead (None: READ_AHEAD for a remote repository, 0 for a directory)."""
        self.repo = repo
        self.manifest = manifest
        self.disk_id = disk_id
        self.size, self.entries = repo.read_index(manifest, disk_id)
        self._starts = [e.offset for e in self.entries]
        self._cache: OrderedDict[Unit, bytes | bytearray | memoryview] = OrderedDict()
        self._loading: dict[Unit, threading.Event] = {}
        self._lock = threading.Lock()
        self._load_slots = threading.BoundedSemaphore(LOADS)
        ahead = (READ_AHEAD if repo.root is None else 0) if read_ahead is None else read_ahead
        self._ahead = max(0, min(ahead, cache_bytes // CHUNK // 4))  # never so much that it evicts what readers use
        self._piece = repo.chunk_id.piece if repo.reads_pieces else 0  # 0: whole chunks only
        self._last_end = -1  # where the last read ended (any thread's: a hint, races are harmless)
        self._limit = cache_bytes
        self._held = 0  # bytes in the cache
        self._marks: set[bytes] = set()  # read-ahead chunks no reader has used yet
        self._queued = 0  # read-ahead loads not yet done
        self._pool = ThreadPoolExecutor(self._ahead, f"read-ahead-{disk_id}") if self._ahead else None
        self.loads = 0  # units (chunks, or pieces) loaded from the repository (tests, statistics)

    def entries_in(self, offset: int, length: int) -> Iterator[IndexEntry]:
        """The index entries overlapping [offset, offset+length), in order."""
        for _, e in self._numbered_entries_in(offset, length):
            yield e

    def _numbered_entries_in(self, offset: int, length: int) -> Iterator[tuple[int, IndexEntry]]:
        end = offset + length
        i = max(bisect.bisect_right(self._starts, offset) - 1, 0)
        while i < len(self.entries) and self.entries[i].offset < end:
            e = self.entries[i]
            if e.end > offset:
                yield i, e
            i += 1

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill buf with the disk's bytes from offset."""
        buf = memoryview(buf).cast("B")
        length = len(buf)
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"read of {length} bytes at {offset} lies outside the disk ({self.size} bytes)")
        small = length < self._piece and offset != self._last_end  # not a read going on from the last
        self._last_end = offset + length
        pos = offset
        for i, e in self._numbered_entries_in(offset, length):
            if e.offset > pos:
                buf[pos - offset:e.offset - offset] = bytes(e.offset - pos)
                pos = e.offset
            stop = min(e.end, offset + length)
            dest = buf[pos - offset:stop - offset]
            at = e.chunk_offset + (pos - e.offset)  # in the chunk's content
            pieces = small and (e.chunk, None) not in self._cache
            done = 0
            while done < len(dest):  # a piece at a time, or all from the chunk
                if pieces:
                    index, inner = divmod(at + done, self._piece)
                    want = min(self._piece - inner, len(dest) - done)
                else:
                    index, inner, want = None, at, len(dest)
                part = memoryview(self._unit((e.chunk, index), pos + done))[inner:inner + want]
                if len(part) != want:
                    raise RepositoryDamaged(f"chunk {e.chunk.hex()} is shorter than its index says ({self._where(pos)})")
                dest[done:done + want] = part
                done += want
            if self._pool is not None:
                self._read_ahead(i)
            pos = stop
        if pos < offset + length:
            buf[pos - offset:] = bytes(offset + length - pos)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(memoryview(buf), offset)
        return bytes(buf)

    def extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """(offset, length, has_data) runs covering [offset, offset+length): data, or a hole that reads as zeroes."""
        end = min(offset + length, self.size)
        runs: list[list] = []

        def add(start: int, stop: int, data: bool) -> None:
            if stop <= start:
                return
            if runs and runs[-1][2] == data and runs[-1][1] == start:
                runs[-1][1] = stop
            else:
                runs.append([start, stop, data])

        pos = offset
        for e in self.entries_in(offset, end - offset):
            add(pos, e.offset, False)
            pos = max(pos, e.offset)
            add(pos, min(e.end, end), True)
            pos = min(e.end, end)
        add(pos, end, False)
        for start, stop, data in runs:
            yield start, stop - start, data

    def close(self) -> None:
        """Stop reading ahead (loads under way finish; nothing new starts)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    # -- read-ahead ------------------------------------------------------

    def _read_ahead(self, i: int) -> None:
        """Entry i was just read: load the chunks after it if the reader moves forward."""
        cid, pool = self.entries[i].chunk, self._pool
        if pool is None:
            return
        with self._lock:
            if cid in self._marks:
                self._marks.discard(cid)  # a reader reached the window: move it on
            elif not (i > 0 and (self.entries[i - 1].chunk, None) in self._cache and self.entries[i - 1].chunk != cid):
                return  # not a reader moving on from the previous chunk: random access, no read-ahead
            wanted: list[tuple[bytes, int]] = []
            seen = {cid}
            j = i + 1
            while j < len(self.entries) and len(seen) <= self._ahead:
                e = self.entries[j]
                if e.chunk not in seen:
                    seen.add(e.chunk)
                    if (e.chunk, None) not in self._cache and (e.chunk, None) not in self._loading and self._queued < 2 * self._ahead:
                        wanted.append((e.chunk, e.offset))
                        self._marks.add(e.chunk)
                        self._queued += 1
                j += 1
        for chunk, at in wanted:
            try:
                pool.submit(self._load_ahead, chunk, at)
            except RuntimeError:  # closed
                with self._lock:
                    self._queued -= 1

    def _load_ahead(self, cid: bytes, offset: int) -> None:
        try:
            self._unit((cid, None), offset)
        except Exception:  # noqa: BLE001 - a reader that needs it loads it again and reports the error
            with self._lock:
                self._marks.discard(cid)
        finally:
            with self._lock:
                self._queued -= 1

    def _where(self, offset: int) -> str:
        return f"backup {self.manifest.checkpoint}, disk {self.disk_id}, offset {offset}"

    def _unit(self, unit: Unit, offset: int) -> bytes | bytearray | memoryview:
        """The decompressed chunk (unit (cid, None)) or piece (cid, index); concurrent readers of
        one unit wait for a single load."""
        while True:
            with self._lock:
                data = self._cache.get(unit)
                if data is not None:
                    self._cache.move_to_end(unit)
                    return data
                pending = self._loading.get(unit)
                if pending is None:
                    pending = self._loading[unit] = threading.Event()
                    break
            pending.wait()  # another thread loads it; if that failed, try ourselves
        try:
            cid, index = unit
            with self._load_slots:
                data = self.repo.get_chunk(cid, self._where(offset)) if index is None else \
                    self.repo.read_chunk_piece(cid, self._where(offset), index)
            with self._lock:
                self.loads += 1
                self._cache[unit] = data
                self._held += len(data)
                while self._held > self._limit and len(self._cache) > 1:
                    (old, _), gone = self._cache.popitem(last=False)
                    self._held -= len(gone)
                    self._marks.discard(old)
            return data
        finally:
            with self._lock:
                del self._loading[unit]
            pending.set()
