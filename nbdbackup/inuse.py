"""Is a file in use for writing by a running process?  (restore --force asks before replacing.)

Two independent looks, either one is enough to refuse:

* /proc/<pid>/fd: every process that has the file open with write access
  (O_WRONLY or O_RDWR in /proc/<pid>/fdinfo), named by pid and command;
* QEMU's image lock: QEMU holds an OFD read lock on byte 100 + log2(perm) of
  each image for each block permission it uses (raw-posix "perm" bytes); a
  VM that may write its image holds byte 101 (BLK_PERM_WRITE).  A write-lock
  test of that byte (F_OFD_GETLK) finds it even where /proc hides the process
  (another user's QEMU, another PID namespace).
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

QEMU_WRITE_LOCK_BYTE = 100 + 1  # RAW_LOCK_PERM_BASE + bit of BLK_PERM_WRITE (QEMU block/file-posix.c)
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_FLOCK = "hhqqi4x"  # struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid


@dataclass(frozen=True)
class Writer:
    pid: int
    command: str

    def __str__(self) -> str:
        return f"process {self.pid} ({self.command})"


@dataclass(frozen=True)
class Usage:
    path: Path
    writers: tuple[Writer, ...]
    qemu_lock: bool  # QEMU's write-permission lock byte is held

    def describe(self) -> str:
        if self.writers:
            who = ", ".join(map(str, self.writers))
            return f"{self.path} is open for writing by {who}"
        return f"{self.path} is locked for writing by a QEMU process (its image lock; the process is not visible here)"


def writers(path: Path, *, proc: Path = Path("/proc")) -> list[Writer]:
    """Processes other than this one holding path open with write access."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    target = (st.st_dev, st.st_ino)
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue  # gone, or another user's process (then the lock test still sees QEMU)
        for fd in fds:
            try:
                fst = os.stat(fd)
                if (fst.st_dev, fst.st_ino) != target:
                    continue
                flags = _fd_flags(entry / "fdinfo" / fd.name)
            except OSError:
                continue
            if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                found.append(Writer(int(entry.name), _command(entry)))
                break
    return found


def qemu_write_locked(path: Path) -> bool:
    """True if some process holds QEMU's lock for write permission on path (as QEMU tests it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, QEMU_WRITE_LOCK_BYTE, 1, 0)
        answer = fcntl.fcntl(fd, _F_OFD_GETLK, query)
        return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK
    except OSError:  # no OFD locks here (old kernel, some network filesystems): /proc is the only look
        return False
    finally:
        os.close(fd)


def in_use(path: Path) -> Usage | None:
    """How path is in use for writing, or None if no one writes it."""
    found = writers(path)
    locked = qemu_write_locked(path)
    if not found and not locked:
        return None
    return Usage(Path(path), tuple(found), locked)


def _fd_flags(fdinfo: Path) -> int:
    for line in fdinfo.read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    return 0


def _command(entry: Path) -> str:
    try:
        argv = (entry / "cmdline").read_bytes().split(b"\0")
        if argv and argv[0]:
            return os.path.basename(argv[0].decode(errors="replace"))
        return (entry / "comm").read_text().strip()
    except OSError:
        return "?"
