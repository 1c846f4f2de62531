"""Locks: one run per VM at a time; the repository lock for garbage collection.

flock(2) locks die with their process, so a lock left by a dead run is simply
taken over; an exclusive lock file holds the holder's pid for the error message.

    locks/vm-<vm>.lock     exclusive: one backup, delete or prune of a VM at a time
    locks/repository.lock  shared by every run that reads or writes chunks,
                           exclusive for garbage collection (deleting chunks)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import LockHeld, RepositoryUnusable


@contextlib.contextmanager
def file_lock(path: Path, *, what: str, shared: bool = False, wait: float = 0.0) -> Iterator[None]:
    """Hold the lock for the block; try for up to `wait` seconds, then LockHeld.

    On a read-only filesystem nobody can write, so a shared lock is not needed
    and is skipped; an exclusive one is refused (RepositoryUnusable).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT):  # ENOENT: no locks/ folder could be made
            if shared:
                yield
                return
            raise RepositoryUnusable(f"cannot lock {what}: {path.parent} is {'not writable' if exc.errno != errno.EROFS else 'read-only'}",
                                     hint="this command writes to the repository") from None
        raise
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    raise LockHeld(f"another nbdbackup run (pid {holder}) holds {what}", hint="wait for it to finish") from None
                time.sleep(0.1)
        if not shared:
            try:  # only for the message of a run that waits; a full filesystem must not stop us
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                pass
        yield
    finally:
        os.close(fd)
