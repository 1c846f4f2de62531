"""The backup data path: regions of one exported disk -> chunks + index entries.

    main thread                         worker threads (one NBD connection each)
    -----------                         -----------------------------------------
    cut regions at chunk boundaries     read the data extents of one piece
    map base:allocation (<=1 GiB asks)  drop it if all zero, else hash it,
    submit pieces holding data  ----->  compress and store it (GIL released in
    (at most `depth` in flight)         libnbd, zstd and hashlib)

Memory is bounded by depth x chunk size; extent mapping is pipelined with the
reads, never a whole-disk map first.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import Interrupted
from .nbdio import BASE_ALLOCATION, NbdEndpoint, data_extents
from .records import Extent, IndexEntry
from .repository import Repository
from .repository.chunks import chunk_id

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Tuning:
    chunk_size: int = 4 * 1024 * 1024
    workers: int = 4
    depth: int = 8  # pieces in flight (memory: depth x chunk_size)
    level: int = 3  # zstd level


@dataclass
class CaptureResult:
    entries: list[IndexEntry]
    read_bytes: int = 0
    stored_bytes: int = 0
    data_bytes: int = 0


class CancelToken:
    """Set by a signal handler; checked at safe points."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def set(self, signum: int) -> None:
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


def pieces(regions: Iterable[Extent], chunk_size: int) -> Iterator[Extent]:
    """Regions cut at multiples of chunk_size, so equal data at equal alignment dedups."""
    for r in regions:
        pos = r.offset
        while pos < r.end:
            stop = min(r.end, (pos // chunk_size + 1) * chunk_size)
            yield Extent(pos, stop - pos)
            pos = stop


def capture(
    repo: Repository,
    connect: Callable[..., NbdEndpoint],
    regions: list[Extent],
    *,
    tuning: Tuning,
    cancel: CancelToken,
    progress: Progress = lambda n: None,
) -> CaptureResult:
    """Read `regions` of the export and store them; returns entries covering their data."""
    result = CaptureResult(entries=[])
    local = threading.local()
    endpoints: list[NbdEndpoint] = []
    lock = threading.Lock()

    def endpoint() -> NbdEndpoint:
        if not hasattr(local, "ep"):
            local.ep = connect()
            with lock:
                endpoints.append(local.ep)
        return local.ep

    def work(piece: Extent, reads: list[Extent]) -> tuple[IndexEntry | None, int, int]:
        if cancel.signum is not None:
            return None, 0, 0
        span = Extent(reads[0].offset, reads[-1].end - reads[0].offset)
        buf = bytearray(span.length)
        view = memoryview(buf)
        ep = endpoint()
        nread = 0
        for r in reads:
            ep.pread_into(view[r.offset - span.offset:r.end - span.offset], r.offset)
            nread += r.length
        if not any_nonzero(buf):
            return None, nread, 0
        cid = chunk_id(buf)
        stored = repo.put_chunk(cid, buf, tuning.level)
        return IndexEntry(span.offset, span.length, cid, 0), nread, stored

    def collect(fut: cf.Future, piece_length: int) -> None:
        entry, nread, stored = fut.result()
        if entry is not None:
            result.entries.append(entry)
            result.data_bytes += entry.length
        result.read_bytes += nread
        result.stored_bytes += stored
        progress(piece_length)

    try:
        with connect(contexts=(BASE_ALLOCATION,)) as mapper, cf.ThreadPoolExecutor(tuning.workers, "capture") as pool:
            inflight: dict[cf.Future, int] = {}
            for piece in pieces(regions, tuning.chunk_size):
                cancel.check()
                reads = data_extents(mapper, piece)
                if not reads:
                    progress(piece.length)
                    continue
                while len(inflight) >= tuning.depth:
                    done, _ = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
                    for fut in done:
                        collect(fut, inflight.pop(fut))
                inflight[pool.submit(work, piece, reads)] = piece.length
            for fut in cf.as_completed(list(inflight)):
                collect(fut, inflight.pop(fut))
            cancel.check()
    finally:
        for ep in endpoints:
            ep.close()
    result.entries.sort(key=lambda e: e.offset)
    return result


_ZERO = bytes(1024 * 1024)


def any_nonzero(buf: bytes | bytearray | memoryview) -> bool:
    view = memoryview(buf)
    for start in range(0, len(view), len(_ZERO)):
        piece = view[start:start + len(_ZERO)]
        if piece != _ZERO[:len(piece)]:
            return True
    return False
