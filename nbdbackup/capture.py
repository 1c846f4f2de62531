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

import bisect
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .errors import Interrupted
from .nbdio import BASE_ALLOCATION, STATUS_STEP, NbdEndpoint, data_extents, is_zero
from .pipeline import Pipeline
from .records import Extent, IndexEntry
from .repository import Repository

Progress = Callable[[int], None]


def default_workers() -> int:
    """One thread per CPU this process may run on, 2..8 (each keeps all reads of its chunk in flight)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 2
    return max(2, min(8, cpus))


@dataclass(frozen=True)
class Tuning:
    """Data-path settings.  Measured on 2 vCPUs (4 GiB disk, 1.8 GiB mixed data): chunk sizes
    1-8 MiB, 2-4 workers and depths 4-16 all took 3.5-4.4 s, within the run-to-run noise.
    zstd level (scripts/bench --full-only --repeat 3, CPU of nbdbackup + QEMU as a share of the
    `nbdcopy | zstd -3 -T2` reference's in the same run; stored bytes): level 3 0.72 / 897.6 MiB,
    level 2 0.57 / 925 MiB, level 1 0.51 / 955 MiB.  Level 2 was the default: a fifth less CPU
    than level 3 for 3% more stored; level 1 saves another tenth of the CPU for 3% more again.
    Workers at level 2 on 2 CPUs: 4 threads 0.57 (peak RSS 67 MiB), 2 threads 0.47 (51 MiB) and
    no slower: one per CPU.
    Issue 11's mixed disk (1 MiB pieces of random, text and binary data scattered over 4 GiB, most
    chunks mixing kinds), once chunks.encode no longer stored a chunk as is on one incompressible
    sample: zstd CPU seconds over all chunks / stored MiB: level 2 4.6 / 783, level 1 3.8 / 799,
    -1 3.5 / 847, -2 3.4 / 862, -3 3.0 / 883 (the old sample rule at level 2: 4.1 / 878; the
    peer virtnbdbackup -z stores 932).  Level 1 is the default: a sixth less CPU than level 2 for
    2% more stored; the fast levels save little more CPU for 6-10% more stored."""

    chunk_size: int = 4 * 1024 * 1024
    workers: int = 4  # restores; backups take default_workers() unless configured (engine.tuning_for)
    depth: int = 8  # pieces in flight (memory: depth x chunk_size)
    level: int = 1  # zstd level (negative: zstd's fast levels)


@dataclass
class CaptureResult:
    entries: list[IndexEntry]
    read_bytes: int = 0
    stored_bytes: int = 0


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


class AllocationMap:
    """Where an export may hold data (base:allocation), asked one STATUS_STEP at a time.

    Queries must come in increasing offset order; each window is asked once,
    so mapping costs grow with the number of extents, not with the disk size.
    """

    def __init__(self, endpoint: NbdEndpoint) -> None:
        self.endpoint = endpoint
        self.window: int | None = None
        self.data: list[Extent] = []
        self.starts: list[int] = []

    def data_in(self, region: Extent) -> list[Extent]:
        found: list[Extent] = []
        for part in pieces([region], STATUS_STEP):
            start = part.offset - part.offset % STATUS_STEP
            if self.window != start:
                self.window = start
                size = min(STATUS_STEP, self.endpoint.size - start)
                self.data = data_extents(self.endpoint, Extent(start, size))
                self.starts = [e.offset for e in self.data]
            i = max(bisect.bisect_right(self.starts, part.offset) - 1, 0)
            while i < len(self.data) and self.data[i].offset < part.end:
                e = self.data[i]
                lo, hi = max(e.offset, part.offset), min(e.end, part.end)
                if lo < hi:
                    found.append(Extent(lo, hi - lo))
                i += 1
        return found


def _region_items(amap: AllocationMap, region: Extent, chunk_size: int) -> Iterator[tuple[int, list[Extent]]]:
    """(bytes advanced, data extents of one chunk-aligned window) over one region; an item with no
    extents only reports progress over holes and zeroes."""
    pos = region.offset
    group: list[Extent] = []
    for piece in pieces(amap.data_in(region), chunk_size):
        if group and piece.offset // chunk_size != group[0].offset // chunk_size:
            yield group[-1].end - pos, group
            pos, group = group[-1].end, []
        group.append(piece)
    if group:
        yield group[-1].end - pos, group
        pos = group[-1].end
    yield region.end - pos, []


def work_items(amap: AllocationMap, regions: Iterable[Extent], chunk_size: int) -> Iterator[tuple[int, list[list[Extent]]]]:
    """(bytes advanced, groups to store in one chunk) over the regions.

    A group is the data extents of one chunk-aligned window of one region; its span (holes
    inside it zeroed) becomes one index entry.  A region's windows go to chunks of their own,
    so a full backup (one region: the disk) cuts its chunks at multiples of chunk_size and equal
    data at equal alignment dedups.  The groups of different regions (an incremental's scattered
    dirty ranges) are packed one after another into one chunk of at most chunk_size, each at its
    own chunk offset: 655 scattered 64 KiB ranges make about 11 chunks, not 655 small ones.  An item
    with no groups only reports progress over holes and zeroes.
    """
    packed: list[list[Extent]] = []
    packed_length = advance = 0
    for region in regions:
        first = True
        for step, group in _region_items(amap, region, chunk_size):
            if not group:
                if packed:
                    advance += step
                else:
                    yield step, []
                continue
            span = group[-1].end - group[0].offset
            if packed and (not first or packed_length + span > chunk_size):
                yield advance, packed
                packed, packed_length, advance = [], 0, 0
            packed.append(group)
            packed_length += span
            advance += step
            first = False
    if packed:
        yield advance, packed


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

    def work(groups: list[list[Extent]]) -> tuple[list[IndexEntry], int, int]:
        if cancel.signum is not None:
            return [], 0, 0
        spans = [Extent(g[0].offset, g[-1].end - g[0].offset) for g in groups]
        total = sum(s.length for s in spans)
        ep = pipe.endpoint()
        local = pipe.local()
        if getattr(local, "buffer", None) is None or len(local.buffer) < total:
            local.buffer = memoryview(bytearray(max(total, tuning.chunk_size)))  # one per thread, reused
        buf = local.buffer[:total]
        reads: list[tuple[memoryview, int]] = []
        placed: list[tuple[Extent, int]] = []  # each group's span and where it starts in the chunk
        at = 0
        for group, span in zip(groups, spans, strict=True):
            part = buf[at:at + span.length]
            pos = span.offset
            for r in group:  # the gaps between reads are holes: zero them in the reused buffer
                if r.offset > pos:
                    part[pos - span.offset:r.offset - span.offset] = _zeros(r.offset - pos)
                reads.append((part[r.offset - span.offset:r.end - span.offset], r.offset))
                pos = r.end
            placed.append((span, at))
            at += span.length
        ep.read_into(reads)
        nread = sum(len(dest) for dest, _ in reads)
        kept = [(span, at) for span, at in placed if not is_zero(buf[at:at + span.length])]
        if not kept:
            return [], nread, 0
        cid, hashes = repo.chunk_id.with_pieces(buf)
        stored = repo.put_chunk(cid, buf, tuning.level, hashes)  # stored before this thread reuses buf
        return [IndexEntry(span.offset, span.length, cid, at) for span, at in kept], nread, stored

    def collect(done: tuple[list[IndexEntry], int, int], advance: int) -> None:
        entries, nread, stored = done
        result.entries.extend(entries)
        result.read_bytes += nread
        result.stored_bytes += stored
        progress(advance)

    with connect(contexts=(BASE_ALLOCATION,)) as mapper, Pipeline(tuning.workers, tuning.depth, connect, collect, "capture") as pipe:
        for advance, groups in work_items(AllocationMap(mapper), regions, tuning.chunk_size):
            cancel.check()
            if groups:
                pipe.submit(work, groups, advance)
            else:
                progress(advance)
        pipe.drain()
        cancel.check()
    result.entries.sort(key=lambda e: e.offset)
    return result


_ZEROS = memoryview(bytes(1024 * 1024))


def _zeros(length: int) -> memoryview | bytes:
    """length zero bytes, for the (rare) holes inside one chunk's span."""
    return _ZEROS[:length] if length <= len(_ZEROS) else bytes(length)
