"""Where repository objects live.  Keys are '/'-separated relative paths."""

from __future__ import annotations

import concurrent.futures as cf
import errno
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

from ..errors import RepositoryUnusable


class Backend(Protocol):
    """What the repository needs from storage: LocalBackend (a directory), MemoryBackend
    (memory.py, for tests), S3Backend (s3.py).  tests/test_backends.py runs one suite
    against every implementation: a backend is correct when it passes that suite.

    Keys are '/'-separated relative paths without '..'.  Errors other than the
    ones named here are NbdBackupError subclasses (RepositoryUnusable and its
    S3 subclasses), never a client library's own exception.
    """

    location: str  # for messages: a path or s3://bucket/prefix, never a credential

    # True when write(exclusive=True) is decided atomically by the store (O_EXCL/link,
    # If-None-Match: *); False when it is a check followed by a write (a race window).
    atomic_exclusive: bool

    def read(self, key: str) -> bytes:
        """The object's content; FileNotFoundError when there is none."""

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """length bytes of the object from offset, fewer where it ends first (none from its end
        on); FileNotFoundError when there is none.  One request to an object store."""

    def write(self, key: str, data: Buffers, *, durable: bool = False, exclusive: bool = False) -> None:
        """Create or replace the object atomically: readers see old or new, never a part.
        data is one buffer or a list of buffers to concatenate.
        durable=True returns only once the object survives a crash.
        exclusive=True raises FileExistsError instead of replacing an existing object."""

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[str]:
        """Keys of objects below prefix (a folder), in no particular order."""

    def delete(self, key: str) -> None:
        """Remove the object; no error if it is already gone."""

    def size(self, key: str) -> int:
        """Stored size of the object in bytes; FileNotFoundError when there is none."""

    def age(self, key: str) -> float:
        """Seconds since the object was last written, by the store's clock where it has one
        (so that hosts with skewed clocks agree); FileNotFoundError when there is none."""

    def remove_folder(self, prefix: str) -> None:
        """Forget the folder prefix once no object is below it (object stores need nothing)."""

    def delete_partial_writes(self) -> None:
        """Remove what interrupted writes left (only while nobody writes)."""

    def sync(self) -> None:
        """Make every write so far durable."""


Buffers = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]
DIR_MODE = 0o700
FILE_MODE = 0o600
SYNC_THREADS = 16  # fsyncs in flight at once: the device sees several, each waits only for its own file


class RangedReader:
    """An object read in ranges, one request each, as a file opened for reading is (read(n) from
    the position, seek(pos)): what chunks.read_piece needs of a chunk in an object store.  The
    first read fetches at least FIRST bytes, so that a chunk file's header and the table behind
    it come in one request."""

    FIRST = 4096

    def __init__(self, backend: Backend, key: str) -> None:
        self.backend, self.key = backend, key
        self.pos = 0
        self._window, self._window_at = b"", 0  # the last range fetched

    def read(self, n: int) -> bytes:
        start = self.pos - self._window_at
        if not (0 <= start and start + n <= len(self._window)):
            self._window, self._window_at = self.backend.read_range(self.key, self.pos, max(n, self.FIRST if self.pos == 0 else 0)), self.pos
            start = 0
        data = self._window[start:start + n]
        self.pos += len(data)
        return data

    def seek(self, pos: int) -> None:
        self.pos = pos


class LocalBackend:
    """A directory tree on a local filesystem.  Directories 0700, files 0600."""

    atomic_exclusive = True

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.location = str(root)
        self._dirty_files: set[Path] = set()  # written without fsync (or found present) since the last sync()
        self._dirty_dirs: set[Path] = set()  # entries added or removed since the last sync()
        self._dirty_lock = threading.Lock()  # chunks are written by several threads

    def path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad repository key {key!r}")
        return self.root / key

    def read(self, key: str) -> bytes:
        with open(self.path(key), "rb") as f:
            return f.read()

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        with open(self.path(key), "rb", buffering=0) as f:
            return os.pread(f.fileno(), length, offset)

    def open(self, key: str) -> BinaryIO:
        """The object's file, open for reading (unbuffered): to read it in pieces."""
        return open(self.path(key), "rb", buffering=0)

    def read_into(self, key: str, buffer: Callable[[int], memoryview]) -> memoryview:
        """read(), into buffer(size) (a buffer the caller reuses: no allocation per object);
        the view of what was read."""
        with open(self.path(key), "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size  # objects are replaced whole, never changed in place
            view = buffer(size)[:size]
            done = 0
            while done < size and (n := f.readinto(view[done:])):
                done += n
        return view[:done]

    def write(self, key: str, data: Buffers | Iterator[bytes | bytearray | memoryview], *, durable: bool = False,
              exclusive: bool = False) -> None:
        """Backend.write; data may also be an iterator of buffers, each written before the next is
        asked for (so its producer may reuse one buffer: EncryptedBackend's encryption)."""
        target = self.path(key)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}-{next(_serial)}")
        self._makedirs(target.parent)
        stream = data if isinstance(data, Iterator) else None  # EncryptedBackend: parts made while written
        parts = [] if stream is not None else [memoryview(data).cast("B")] if isinstance(data, (bytes, bytearray, memoryview)) \
            else [memoryview(p).cast("B") for p in data]
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            try:
                for part in stream or ():  # each written before the next is made (it may reuse the buffer)
                    view = memoryview(part).cast("B")
                    while view:
                        view = view[os.write(fd, view):]
                while parts:
                    written = os.writev(fd, parts)
                    while parts and written >= len(parts[0]):
                        written -= len(parts[0])
                        parts.pop(0)
                    if parts and written:
                        parts[0] = parts[0][written:]
                if durable:
                    os.fsync(fd)
                else:
                    _start_writeback(fd)
            finally:
                os.close(fd)
            if exclusive:
                os.link(tmp, target)  # fails if target exists
                os.unlink(tmp)
            else:
                os.replace(tmp, target)
        except FileExistsError:
            _unlink_quietly(tmp)
            raise
        except OSError as exc:
            _unlink_quietly(tmp)
            raise _storage_error(exc, target) from None
        if durable:
            _fsync_dir(target.parent)
            with self._dirty_lock:  # folders created for it: their entries in their parents
                created = sorted((d for d in self._dirty_dirs if d in target.parent.parents), reverse=True)
                self._dirty_dirs.difference_update(created)
            for d in created:
                _fsync_dir(d)
        else:
            with self._dirty_lock:
                self._dirty_files.add(target)
                self._dirty_dirs.add(target.parent)

    def exists(self, key: str) -> bool:
        """True if the object is there.  A caller relies on an object it finds (a chunk it then
        does not write again), which may be another process's write not yet durable (syncfs()
        used to cover it): the next sync() makes it durable too."""
        path = self.path(key)
        if not path.exists():
            return False
        with self._dirty_lock:
            self._dirty_files.add(path)
            self._dirty_dirs.add(path.parent)
        return True

    def list(self, prefix: str) -> Iterator[str]:
        base = self.path(prefix)
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if not name.startswith("."):
                    yield name if rel == "." else f"{rel}/{name}"

    def delete(self, key: str) -> None:
        path = self.path(key)
        _unlink_quietly(path)
        with self._dirty_lock:
            self._dirty_files.discard(path)
            self._dirty_dirs.add(path.parent)

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def age(self, key: str) -> float:
        return max(0.0, time.time() - self.path(key).stat().st_mtime)

    def remove_folder(self, prefix: str) -> None:
        path = self.path(prefix)
        try:
            path.rmdir()
        except OSError:
            return  # not empty or already gone
        with self._dirty_lock:
            self._dirty_dirs.discard(path)
            self._dirty_dirs.add(path.parent)

    def delete_partial_writes(self) -> None:
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith(".") and ".tmp-" in name:
                    _unlink_quietly(Path(dirpath) / name)

    def sync(self) -> None:
        """fsync every file written since the last sync (in parallel), then the directories
        that gained or lost entries.  Unlike syncfs(), this never waits for other programs'
        dirty data on the same filesystem (a host's VM images, say)."""
        with self._dirty_lock:
            files, self._dirty_files = self._dirty_files, set()
            dirs, self._dirty_dirs = self._dirty_dirs, set()
        try:
            if files or dirs:
                with cf.ThreadPoolExecutor(min(SYNC_THREADS, max(len(files), len(dirs))), "nbdbackup-fsync") as pool:
                    list(pool.map(_fsync_file, files))  # the files first: their data, then their names
                    list(pool.map(_fsync_dir_if_any, dirs))
        except OSError as exc:
            with self._dirty_lock:  # not durable: the next sync tries again
                self._dirty_files |= files
                self._dirty_dirs |= dirs
            raise _storage_error(exc, self.root) from None

    def _makedirs(self, path: Path) -> None:
        if path.is_dir():
            return
        try:
            missing = []
            while not path.is_dir():
                missing.append(path)
                path = path.parent
            for d in reversed(missing):  # each level 0700: mkdir(parents=True) would use the umask
                d.mkdir(mode=DIR_MODE, exist_ok=True)
                with self._dirty_lock:  # the new folder's entry in its parent must be made durable too
                    self._dirty_dirs.add(d.parent)
        except OSError as exc:
            raise _storage_error(exc, path) from None


_serial = itertools.count()
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


def _start_writeback(fd: int) -> None:
    """Have the kernel start writing the file's data to the device now, without waiting
    (sync_file_range(SYNC_FILE_RANGE_WRITE)): sync()'s fsync at the backup's commit then finds
    most of it written while the backup read on, instead of waiting for all of it at the end.
    Advisory only (sync() is what makes data durable): a no-op where the call is missing."""
    global _sync_file_range
    if _sync_file_range is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            call = libc.sync_file_range
            call.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
            _sync_file_range = lambda fd: call(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # noqa: E731
        except (OSError, AttributeError):
            _sync_file_range = lambda fd: 0  # noqa: E731
    _sync_file_range(fd)


_sync_file_range: Callable[[int], int] | None = None


def _fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return  # deleted since it was written: nothing to make durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir_if_any(path: Path) -> None:
    try:
        _fsync_dir(path)
    except FileNotFoundError:
        pass  # removed since (an empty backup folder): nothing in it to keep


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _storage_error(exc: OSError, path: Path) -> RepositoryUnusable:
    reasons = {
        errno.ENOSPC: "the repository's filesystem is full",
        errno.EDQUOT: "the repository's disk quota is exhausted",
        errno.EROFS: "the repository's filesystem is read-only",
        errno.EACCES: "no permission to write to the repository",
    }
    reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return RepositoryUnusable(f"cannot write {path}: {reason}", hint="free space or fix the repository path; older backups are untouched")
