"""One disk of one backup point as a random-access image: what `serve` exports.

Every backup's index is complete, so any byte of any backup point is found by
one binary search in one index, without replaying a chain.  Chunks are read
through the Repository API (which checks each against its id), decompressed
once and kept in a small shared cache: NBD clients read in requests much
smaller than a chunk.  Ranges no index entry covers read as zeroes and are
reported as holes, so clients stay sparse.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Iterator

from .errors import RepositoryDamaged
from .records import IndexEntry, Manifest
from .repository import Repository

CACHE_CHUNKS = 32  # decompressed chunks kept (at most 32 x chunk size of memory)


class BackupImage:
    """Thread-safe reads of disk `disk_id` of backup `manifest`."""

    def __init__(self, repo: Repository, manifest: Manifest, disk_id: str, cache_chunks: int = CACHE_CHUNKS) -> None:
        self.repo = repo
        self.manifest = manifest
        self.disk_id = disk_id
        self.size, self.entries = repo.read_index(manifest, disk_id)
        self._starts = [e.offset for e in self.entries]
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._loading: dict[bytes, threading.Event] = {}
        self._lock = threading.Lock()
        self._limit = cache_chunks

    def entries_in(self, offset: int, length: int) -> Iterator[IndexEntry]:
        """The index entries overlapping [offset, offset+length), in order."""
        end = offset + length
        i = max(bisect.bisect_right(self._starts, offset) - 1, 0)
        while i < len(self.entries) and self.entries[i].offset < end:
            e = self.entries[i]
            if e.end > offset:
                yield e
            i += 1

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill buf with the disk's bytes from offset."""
        buf = memoryview(buf).cast("B")
        length = len(buf)
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"read of {length} bytes at {offset} lies outside the disk ({self.size} bytes)")
        pos = offset
        for e in self.entries_in(offset, length):
            if e.offset > pos:
                buf[pos - offset:e.offset - offset] = bytes(e.offset - pos)
                pos = e.offset
            stop = min(e.end, offset + length)
            data = self._chunk(e.chunk, pos)
            start_in_chunk = e.chunk_offset + (pos - e.offset)
            piece = memoryview(data)[start_in_chunk:start_in_chunk + (stop - pos)]
            if len(piece) != stop - pos:
                raise RepositoryDamaged(f"chunk {e.chunk.hex()} is shorter than its index says ({self._where(pos)})")
            buf[pos - offset:stop - offset] = piece
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

    def _where(self, offset: int) -> str:
        return f"backup {self.manifest.checkpoint}, disk {self.disk_id}, offset {offset}"

    def _chunk(self, cid: bytes, offset: int) -> bytes:
        """The decompressed chunk; concurrent readers of one chunk wait for a single load."""
        while True:
            with self._lock:
                data = self._cache.get(cid)
                if data is not None:
                    self._cache.move_to_end(cid)
                    return data
                pending = self._loading.get(cid)
                if pending is None:
                    pending = self._loading[cid] = threading.Event()
                    break
            pending.wait()  # another thread loads it; if that failed, try ourselves
        try:
            data = self.repo.get_chunk(cid, self._where(offset))
            with self._lock:
                self._cache[cid] = data
                while len(self._cache) > self._limit:
                    self._cache.popitem(last=False)
            return data
        finally:
            with self._lock:
                del self._loading[cid]
            pending.set()
