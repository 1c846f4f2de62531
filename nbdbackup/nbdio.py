"""NBD endpoints through libnbd: the only module that imports nbd.

An NbdEndpoint is one client connection to one export.  Several endpoints on
the same export (the exports we use advertise multi-conn) give parallel I/O:
libnbd releases the GIL while it waits, so one connection per worker thread
reads or writes truly in parallel.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import NbdIOError, VMUnreachable
from .records import Extent

if TYPE_CHECKING:
    import nbd
else:
    nbd = None  # the bindings, imported by load_bindings() at the first connection: a command's start-up goes without (5-8 ms)


def load_bindings() -> None:
    """Import libnbd's bindings now (a caller with time to spare: while a daemon starts)."""
    global nbd
    if nbd is None:
        import nbd as bindings

        nbd = bindings

log = logging.getLogger(__name__)

MAX_REQUEST = 32 * 1024 * 1024  # QEMU's advertised maximum: a larger pwrite kills the connection
STATUS_STEP = 1024 * 1024 * 1024  # one block-status query covers at most this much
BASE_ALLOCATION = "base:allocation"
STATE_ZERO = 2  # base:allocation's flag for a range that reads as zeros
DIRTY = 1
BATCH_WINDOW = 16  # write_batch: requests in flight on one connection


def dirty_bitmap_context(bitmap: str) -> str:
    return f"qemu:dirty-bitmap:{bitmap}"


class NbdEndpoint:
    """One libnbd connection to a unix-socket export.  A context manager."""

    def __init__(self, socket: Path, export: str, *, contexts: tuple[str, ...] = (), writable: bool = False) -> None:
        self.socket, self.export, self.contexts = socket, export, contexts
        load_bindings()
        self._h = nbd.NBD()
        self._h.set_pread_initialize(False)  # a failed read raises; no need to zero buffers first
        self._h.set_export_name(export)
        for context in contexts:
            self._h.add_meta_context(context)
        try:
            self._h.connect_unix(str(socket))
        except nbd.Error as exc:
            self._h = None  # libnbd closes a handle when it is garbage-collected
            raise VMUnreachable(f"cannot connect to NBD export {export!r}: {exc.string}") from None
        for context in contexts:
            if not self._h.can_meta_context(context):
                self.close()
                raise NbdIOError(f"NBD export {export!r} does not offer {context}")
        if writable and self._h.is_read_only():
            self.close()
            raise NbdIOError(f"NBD export {export!r} is read-only")
        self.size = self._h.get_size()

    def __enter__(self) -> NbdEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        h, self._h = self._h, None
        if h is None:
            return
        try:
            h.shutdown()
        except nbd.Error:
            pass
        del h  # the last reference: libnbd closes the handle

    # -- data ------------------------------------------------------------

    def pread(self, length: int, offset: int) -> bytes:
        """One read of at most MAX_REQUEST bytes."""
        return self._call("read", offset, self._h.pread, length, offset)

    def read_into(self, requests: Sequence[tuple[memoryview, int]]) -> None:
        """Read each (destination, disk offset): len(destination) bytes from that offset, straight
        into the destination (no intermediate bytes object), all requests in flight at once.

        The caller keeps the destinations alive and does not touch them until this returns.
        """
        h = self._h
        cookies = []
        at = 0
        try:
            for dest, offset in requests:
                for start in range(0, len(dest), MAX_REQUEST):
                    at = offset + start
                    cookies.append(h.aio_pread(nbd.Buffer.from_buffer(dest[start:start + MAX_REQUEST]), at))
            for cookie in cookies:
                while not h.aio_command_completed(cookie):
                    h.poll(-1)
        except nbd.Error as exc:
            raise NbdIOError(f"NBD read at offset {at} on export {self.export!r} failed: {exc.string}") from None

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        for start in range(0, len(view), MAX_REQUEST):
            piece = view[start:start + MAX_REQUEST]
            self._call("write", offset + start, self._h.pwrite, piece, offset + start)

    def write_batch(self, requests: Sequence[tuple[int, int, bytes | memoryview | None]]) -> None:
        """Each (offset, length, data) written, each (offset, length, None) made zero (the server
        may punch holes), with up to BATCH_WINDOW requests in flight on this connection; returns
        when all completed.  The caller keeps the data alive and unchanged until then."""
        h = self._h
        pending: deque[tuple[int, int, object]] = deque()  # (offset, cookie, the buffer, kept alive)

        def complete_oldest() -> None:
            at, cookie, _ = pending[0]
            try:
                _wait(h, cookie)
            except nbd.Error as exc:
                raise NbdIOError(f"NBD write at offset {at} on export {self.export!r} failed: {exc.string}") from None
            pending.popleft()

        for start, length, data in requests:
            view = None if data is None else memoryview(data)
            pos, end = start, start + length
            while pos < end:
                if len(pending) >= BATCH_WINDOW:
                    complete_oldest()
                try:
                    if view is None:
                        n = min(STATUS_STEP, end - pos)
                        pending.append((pos, h.aio_zero(n, pos), None))
                    else:
                        n = min(MAX_REQUEST, end - pos)
                        buf = nbd.Buffer.from_buffer(view[pos - start:pos - start + n])
                        pending.append((pos, h.aio_pwrite(buf, pos), buf))
                except nbd.Error as exc:
                    raise NbdIOError(f"NBD write at offset {pos} on export {self.export!r} failed: {exc.string}") from None
                pos += n
        while pending:
            complete_oldest()

    def zero(self, length: int, offset: int) -> None:
        """Make the range read as zeroes; the server may punch holes (the image stays sparse)."""
        end = offset + length
        while offset < end:
            n = min(STATUS_STEP, end - offset)
            self._call("zero", offset, self._h.zero, n, offset)
            offset += n

    def flush(self) -> None:
        self._call("flush", 0, self._h.flush)

    def _call(self, what: str, offset: int, fn, *args):
        try:
            return fn(*args)
        except nbd.Error as exc:
            raise NbdIOError(f"NBD {what} at offset {offset} on export {self.export!r} failed: {exc.string}") from None

    # -- extents ---------------------------------------------------------

    def extents(self, offset: int, length: int) -> Iterator[tuple[str, int, int, int]]:
        """(context, offset, length, flags) for every context, covering [offset, offset+length).

        One block-status request covers at most STATUS_STEP; the server may
        answer less, so we ask again from the shortest context's end.
        """
        end = offset + length
        while offset < end:
            want = min(STATUS_STEP, end - offset)
            replies: dict[str, list[tuple[int, int, int]]] = {c: [] for c in self.contexts}

            def collect(context: str, start: int, entries: list[int], err: list[int], replies=replies) -> int:
                pos, ext = start, replies.setdefault(context, [])
                for i in range(0, len(entries), 2):
                    ext.append((pos, entries[i], entries[i + 1]))
                    pos += entries[i]
                return 0

            self._call("block-status", offset, self._h.block_status, want, offset, collect)
            covered = min((e[-1][0] + e[-1][1] if e else offset) for e in replies.values())
            covered = min(covered, offset + want)
            if covered <= offset:
                raise NbdIOError(f"NBD block-status at offset {offset} on export {self.export!r} made no progress")
            for context, ext in replies.items():
                for start, n, flags in ext:
                    stop = min(start + n, covered)
                    if start < stop:
                        yield context, start, stop - start, flags
            offset = covered


def _wait(h: nbd.NBD, cookie: int) -> None:
    """Until the request completes (nbd.Error if it failed)."""
    while not h.aio_command_completed(cookie):
        h.poll(-1)


def is_zero(buf: bytes | bytearray | memoryview) -> bool:
    """True if buf holds only zero bytes (libnbd's check: no zero buffer to compare with)."""
    load_bindings()
    return nbd.Buffer.from_buffer(buf).is_zero()


ZERO_BLOCK = 64 * 1024  # the steps in which data_runs looks for zeroes


def data_runs(offset: int, data: memoryview) -> Iterator[tuple[int, int, bool]]:
    """(start, stop, all zero) disk ranges of data (which starts at disk offset ``offset``),
    in ZERO_BLOCK-aligned steps, each at most MAX_REQUEST long: what to write and what to zero."""
    end = offset + len(data)
    run_start, run_zero = None, False
    pos = offset
    while pos < end:
        stop = min(end, (pos // ZERO_BLOCK + 1) * ZERO_BLOCK)
        zero = is_zero(data[pos - offset:stop - offset])
        if run_start is not None and (zero != run_zero or pos - run_start >= MAX_REQUEST):
            yield run_start, pos, run_zero
            run_start = None
        if run_start is None:
            run_start, run_zero = pos, zero
        pos = stop
    if run_start is not None:
        yield run_start, end, run_zero


def data_extents(endpoint: NbdEndpoint, region: Extent) -> list[Extent]:
    """Parts of region that must be read: base:allocation says they may hold data."""
    return _merge(Extent(o, n) for c, o, n, f in endpoint.extents(region.offset, region.length) if c == BASE_ALLOCATION and not f & STATE_ZERO)


def dirty_extents(endpoint: NbdEndpoint, bitmap: str, size: int) -> list[Extent]:
    """Ranges the export's dirty bitmap marks as changed."""
    ctx = dirty_bitmap_context(bitmap)
    return _merge(Extent(o, n) for c, o, n, f in endpoint.extents(0, size) if c == ctx and f & DIRTY)


def _merge(extents) -> list[Extent]:
    out: list[Extent] = []
    for e in extents:
        if out and out[-1].end == e.offset:
            out[-1] = Extent(out[-1].offset, out[-1].length + e.length)
        else:
            out.append(e)
    return out
