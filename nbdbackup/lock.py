"""Locks: one run per VM at a time; the repository lock for garbage collection.

flock(2) locks die with their process, so a lock left by a dead run is simply
taken over; an exclusive lock file holds the holder's pid for the error message.
Repositories that are not local directories (S3) use lock objects instead:
object_lock() below, the same names and modes, shared by many hosts.

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


# -- lock objects: for repositories in object storage, shared by many hosts ---------
#
#    locks/<name>/<random id>   {"host", "pid", "exclusive", "created", "what"}
#
# A run writes its own lock object, then lists the others: an exclusive lock
# conflicts with every other lock, a shared one with exclusive ones.  On a
# conflict it deletes its object and tries again until `wait` runs out.  Two
# runs that race both see each other and both back off (never both win).  The
# holder rewrites its object every REFRESH seconds; an object not rewritten for
# STALE seconds (by the store's clock) belongs to a dead or cut-off run and is
# ignored and removed, as is one from this host whose process is gone.  A holder
# that could not refresh for STALE - REFRESH seconds must not commit anything
# (HeldLock.check), since another run may already have ignored its lock.

LOCK_REFRESH = 120.0
LOCK_STALE = 900.0


def _seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


def host_id() -> str:
    """This host's name in lock objects ($NBDBACKUP_HOST_ID, else the hostname)."""
    import socket

    return os.environ.get("NBDBACKUP_HOST_ID") or socket.gethostname()


class HeldLock:
    """A lock object being held: refreshed by a thread until released."""

    def __init__(self, backend, key: str, body: bytes, what: str, refresh: float, stale: float) -> None:
        import threading

        self.backend, self.key, self.body, self.what = backend, key, body, what
        self.refresh, self.stale = refresh, stale
        self.refreshed = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lock-{key}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.refresh):
            try:
                self.backend.write(self.key, self.body, durable=True)  # durable: now, not queued (S3 uploads)
                self.refreshed = time.monotonic()
            except Exception:  # noqa: BLE001 - the next attempt or check() reports it
                pass

    def check(self) -> None:
        """Raise unless the lock is surely still ours (refreshed recently enough)."""
        if time.monotonic() - self.refreshed > self.stale - self.refresh:
            raise LockHeld(f"lost {self.what}: its lock could not be refreshed for {time.monotonic() - self.refreshed:.0f} s",
                           hint="check the connection to the repository, then run again")

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.backend.delete(self.key)
        except Exception:  # noqa: BLE001 - an unreachable store: the object goes stale and is ignored
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_here(doc: dict) -> bool:
    """A lock object of a process of this host that is gone."""
    return doc.get("host") == host_id() and isinstance(doc.get("pid"), int) and not _pid_alive(doc["pid"])


def remove_dead_holders(backend, name: str) -> None:
    """Delete the lock objects called name that processes of this host left when they died (a
    killed nbdkit of `serve` or `recover`), at once rather than when another run meets them."""
    import json

    for key in list(backend.list(f"locks/{name}")):
        try:
            doc = json.loads(backend.read(key))
        except (FileNotFoundError, ValueError):
            continue
        if isinstance(doc, dict) and _dead_here(doc):
            backend.delete(key)


def _conflict(backend, name: str, mine: str, shared: bool, stale: float) -> dict | None:
    """The first other lock object that conflicts with ours; stale ones are removed."""
    import json

    for key in list(backend.list(f"locks/{name}")):
        if key == mine:
            continue
        try:
            age = backend.age(key)
            blob = backend.read(key)
        except FileNotFoundError:
            continue  # released meanwhile
        try:
            doc = json.loads(blob)
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}  # unreadable: a conflict until it goes stale
        if age > stale or _dead_here(doc):
            backend.delete(key)
            continue
        if not shared or doc.get("exclusive", True):
            return doc
    return None


@contextlib.contextmanager
def object_lock(backend, name: str, *, what: str, shared: bool = False, wait: float = 0.0) -> Iterator[HeldLock]:
    """Hold the lock object called name in backend for the block (see above)."""
    import json
    import random
    import uuid

    refresh, stale = _seconds("NBDBACKUP_LOCK_REFRESH", LOCK_REFRESH), _seconds("NBDBACKUP_LOCK_STALE", LOCK_STALE)
    key = f"locks/{name}/{uuid.uuid4().hex}"
    body = json.dumps({"host": host_id(), "pid": os.getpid(), "exclusive": not shared, "what": what,
                       "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
    deadline = time.monotonic() + wait
    while True:
        backend.write(key, body, exclusive=True)
        try:
            holder = _conflict(backend, name, key, shared, stale)
        except BaseException:
            backend.delete(key)
            raise
        if holder is None:
            break
        backend.delete(key)
        if time.monotonic() >= deadline:
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', 'an unknown host')}"
            raise LockHeld(f"another nbdbackup run ({who}) holds {what}", hint="wait for it to finish")
        time.sleep(min(0.5 + random.random(), max(0.0, deadline - time.monotonic())))
    held = HeldLock(backend, key, body, what, refresh, stale)
    try:
        yield held
    finally:
        held.release()
