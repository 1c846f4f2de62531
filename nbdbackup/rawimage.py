"""A new local raw image written by restore itself: pwrite(2), no NBD server in between.

A raw image is a plain sparse file, so restore creates it (ftruncate: all holes) and
writes the non-zero data straight into it from the worker threads.  Where the
filesystem allows it, aligned pieces go with O_DIRECT: the page-cache copy of every
byte was the largest CPU cost of a restore to raw (issue 11), and the data must reach
the disk before the image is renamed into place anyway.  Pieces that are not aligned
(rare: index entries on 512-byte boundaries, memory not page-aligned) and filesystems
without O_DIRECT (tmpfs on older kernels) use ordinary buffered writes; flush()
makes both durable.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

from .errors import RestoreTargetError

ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and memory (covers 512- and 4096-byte sectors)


def create_raw(path: Path, size: int) -> None:
    """A new sparse file of size bytes (mode 0600); RestoreTargetError if that fails."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    except OSError as exc:
        raise RestoreTargetError(f"cannot create {path}: {exc.strerror}") from None


def direct_io_works(path: Path) -> bool:
    """Whether the file's filesystem takes O_DIRECT (tmpfs before Linux 6.6 does not)."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT))
        return True
    except (OSError, AttributeError):
        return False


def aligned_buffer(size: int) -> memoryview:
    """A writable, page-aligned buffer (anonymous memory) of at least size bytes."""
    return memoryview(mmap.mmap(-1, max(size, 1)))


class RawImage:
    """Writes into an existing raw image; thread-safe (pwrite).  A context manager."""

    def __init__(self, path: Path, label: str, *, direct: bool = True) -> None:
        self.path = path
        self.label = label  # for messages: "disk vda"
        self._fd = self._open(os.O_WRONLY | os.O_CLOEXEC)
        self._direct_fd: int | None = None
        self._direct_ok = False  # cleared (never reset) if the filesystem refuses a direct write
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
                self._direct_ok = True
            except OSError:  # EINVAL: the filesystem does not do direct I/O
                self._direct_fd = None

    def _open(self, flags: int) -> int:
        try:
            return os.open(self.path, flags)
        except OSError as exc:
            raise RestoreTargetError(f"cannot open {self.path}: {exc.strerror}") from None

    @property
    def direct(self) -> bool:
        """Whether aligned writes bypass the page cache."""
        return self._direct_ok

    def write(self, data: memoryview, offset: int, *, memory_aligned: bool) -> None:
        """Write data at offset.  memory_aligned: data starts at an ALIGN boundary in memory
        (a view of an aligned_buffer() at an offset that is a multiple of ALIGN)."""
        fd = self._direct_fd
        if fd is None or not self._direct_ok or not memory_aligned or offset % ALIGN or len(data) < ALIGN:
            self._pwrite_all(self._fd, data, offset)
            return
        body = len(data) - len(data) % ALIGN
        try:
            self._pwrite_all(fd, data[:body], offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._direct_ok = False  # the filesystem refused after all: buffered from now on
            self._pwrite_all(self._fd, data[:body], offset)
        if body < len(data):
            self._pwrite_all(self._fd, data[body:], offset + body)

    def _pwrite_all(self, fd: int, data: memoryview, offset: int) -> None:
        try:
            while len(data):
                n = os.pwrite(fd, data, offset)
                data, offset = data[n:], offset + n
        except OSError as exc:
            if exc.errno == errno.EINVAL and fd == self._direct_fd:
                raise
            raise RestoreTargetError(f"writing {self.label} to {self.path}: {exc.strerror}") from None

    def flush(self) -> None:
        """Make every write durable (the buffered ones and the file's extents)."""
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise RestoreTargetError(f"writing {self.label} to {self.path}: {exc.strerror}") from None

    def close(self) -> None:
        """After the last write (the workers are done)."""
        fds = (self._fd, self._direct_fd)
        self._fd, self._direct_fd, self._direct_ok = -1, None, False
        for fd in fds:
            if fd is not None and fd >= 0:
                os.close(fd)

    def __enter__(self) -> RawImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
