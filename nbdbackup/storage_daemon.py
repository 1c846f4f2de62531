"""qemu-storage-daemon serving images as NBD exports: new restore targets, or a shut-down
VM's own images for a rollback (which also loads their persistent bitmaps)."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from .errors import ImageInUse, NbdBackupError, RestoreTargetError

if TYPE_CHECKING:
    from .qmp import QMPSession

log = logging.getLogger(__name__)

READY_POLL = 0.002  # seconds between checks whether the starting daemon serves (it takes 10-30 ms)


@dataclass(frozen=True)
class TargetImage:
    export: str  # export name (the disk id)
    path: Path
    format: str  # qcow2 | raw
    size: int
    direct: bool = False  # the daemon opens the file with O_DIRECT (cache.direct=on): no page-cache copy


def create_image(image: TargetImage) -> None:
    cmd = ["qemu-img", "create", "-q", "-f", image.format]
    if image.format == "qcow2":
        cmd += ["-o", "cluster_size=65536"]
    proc = subprocess.run([*cmd, str(image.path), str(image.size)], capture_output=True, text=True, start_new_session=True)
    if proc.returncode != 0:
        raise RestoreTargetError(f"cannot create {image.path}: {proc.stderr.strip()}")
    image.path.chmod(0o600)


class StorageDaemon:
    """Start qemu-storage-daemon with one writable export per image; stop it on exit.

    exports=False: only the nodes (`node(i)`) and the NBD server; the caller adds exports over
    QMP (`session()`).  read_only: open the images read-only (nothing can change them).
    wait=False: entering only starts the daemon, which takes 20-30 ms to serve; the caller does
    other work meanwhile, and `ready()` (or `session()`) waits for it."""

    def __init__(self, images: Sequence[TargetImage], socket_dir: Path, *, exports: bool = True, read_only: bool = False,
                 wait: bool = True) -> None:
        self.images = list(images)
        self.exports = exports
        self.read_only = read_only
        self.wait = wait
        self._ready = False
        self.socket = socket_dir / "restore.sock"
        self.monitor = socket_dir / "restore-qmp.sock"
        self.log = socket_dir / "qemu-storage-daemon.log"
        self._proc: subprocess.Popen | None = None
        self._started = 0.0

    def __enter__(self) -> StorageDaemon:
        # Images first: the daemon handles its options in order, so an image it cannot open
        # (locked by a running QEMU) ends it before the sockets we wait for exist.
        cmd = ["qemu-storage-daemon"]
        ro = ",read-only=on" if self.read_only else ""
        for i, img in enumerate(self.images):
            direct = ",cache.direct=on" if img.direct else ""
            cmd += ["--blockdev", f"driver=file,filename={_escape(img.path)},node-name=f{i},discard=unmap{ro}{direct}",
                    "--blockdev", f"driver={img.format},file=f{i},node-name={self.node(i)},discard=unmap{ro}"]
        cmd += ["--chardev", f"socket,id=m,path={self.monitor},server=on,wait=off",
                "--monitor", "chardev=m",
                "--nbd-server", f"addr.type=unix,addr.path={self.socket}"]
        if self.exports:
            for i, img in enumerate(self.images):
                cmd += ["--export", f"type=nbd,id=e{i},node-name={self.node(i)},name={img.export},writable=on"]
        log.debug("starting %s", cmd)
        # Its own session: a terminal's Ctrl-C reaches nbdbackup, which stops the daemon in order.
        with open(self.log, "wb") as output:
            self._proc = spawn_dying_with_parent(cmd, stdout=output)
        self._started = time.monotonic()
        if self.wait:
            self.ready()
        return self

    def ready(self) -> None:
        """Wait until the daemon serves (at once if it does); ImageInUse or RestoreTargetError if it ended."""
        assert self._proc is not None
        if self._ready:
            return
        deadline = self._started + 30
        # Ready when both sockets exist and the NBD server accepts connections (a socket file
        # exists from bind(), a moment before listen(); a daemon that died leaves it behind).
        while not (self.socket.exists() and self.monitor.exists() and _accepts(self.socket)):
            if self._proc.poll() is not None:
                out = self.log.read_text(errors="replace").strip()
                if "Failed to get" in out and "lock" in out:  # another process (a running QEMU?) has an image open
                    raise ImageInUse(f"an image is in use by another process: {out.splitlines()[-1]}",
                                     hint="shut the VM down first (or see `nbdbackup rollback --help` for a paused VM)")
                raise RestoreTargetError(f"qemu-storage-daemon failed to start: {out.splitlines()[-1] if out else self._proc.returncode}")
            if time.monotonic() > deadline:
                self._kill()
                raise RestoreTargetError("qemu-storage-daemon did not start within 30s")
            time.sleep(READY_POLL)
        log.debug("qemu-storage-daemon serves %.3fs after its start", time.monotonic() - self._started)
        self._ready = True

    @staticmethod
    def node(i: int) -> str:
        """The format node of the i-th image."""
        return f"n{i}"

    def session(self) -> QMPSession:
        """A QMP session on the daemon's monitor (a context manager), once it serves."""
        from .qmp import QMPSession

        self.ready()
        return QMPSession(self.monitor, connect_timeout=10)

    def quit(self, session: QMPSession) -> None:
        """Quit now, through an open session on its monitor (no second connection): the daemon
        flushes the images and stores their bitmaps; RestoreTargetError unless it exits cleanly."""
        assert self._proc is not None
        session.execute("quit")
        try:
            status = wait_exit(self._proc, 60)
        except subprocess.TimeoutExpired:
            self._kill()
            raise RestoreTargetError("qemu-storage-daemon did not quit within 60s") from None
        if status != 0:
            raise RestoreTargetError(f"qemu-storage-daemon exited with status {status}")

    def __exit__(self, *exc: object) -> None:
        """Ask the daemon to quit (it flushes and closes the images), else kill it."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            with self.session() as qmp:
                qmp.execute("quit")
            wait_exit(proc, 60)
        except (NbdBackupError, OSError, subprocess.TimeoutExpired) as err:
            try:
                proc.wait(timeout=1)  # already dying (killed under us): the run's own error says enough
            except subprocess.TimeoutExpired:
                log.warning("qemu-storage-daemon did not quit cleanly: %s", err)
                self._kill()
        if proc.returncode not in (0, None) and exc[0] is None:
            raise RestoreTargetError(f"qemu-storage-daemon exited with status {proc.returncode}")

    def _kill(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    """proc.wait(timeout), woken the moment the process exits: Popen.wait with a timeout polls
    with sleeps that double up to 50 ms, so a daemon that takes 17 ms to quit is seen after 32."""
    if proc.returncode is not None:  # reaped already: its pid may be another process's by now
        return proc.returncode
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel), or already reaped
        return proc.wait(timeout=timeout)
    try:
        if not select.select([fd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(fd)
    return proc.wait()


def _accepts(path: Path) -> bool:
    """Whether a unix socket accepts connections (the probe disconnects at once)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def spawn_dying_with_parent(cmd: Sequence[str], *, stdout: IO[bytes], signum: int = signal.SIGTERM,
                            env: dict[str, str] | None = None, pass_fds: Sequence[int] = ()) -> subprocess.Popen:
    """Start cmd in its own session (a terminal's Ctrl-C reaches only nbdbackup), its output to
    stdout; it gets signum if nbdbackup dies, even by SIGKILL.  setpriv(1) sets that up in the
    child: a preexec_fn would do it too, but forces a full fork() of this process instead of
    vfork(), which costs the start 10 ms and the rest of the run as much again in page faults
    (every page this process then writes was shared with the child).  The preexec_fn stays as
    the way where setpriv is missing.  setpriv execs cmd: the pid is cmd's."""
    global _SETPRIV
    if _SETPRIV is None:
        _SETPRIV = shutil.which("setpriv") or ""
    if _SETPRIV:
        argv, preexec = [_SETPRIV, "--pdeathsig", signal.Signals(signum).name.removeprefix("SIG"), "--", *cmd], None
    else:
        argv, preexec = list(cmd), functools.partial(_die_with_parent, signum)
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True,
                            env=env, pass_fds=tuple(pass_fds), preexec_fn=preexec)


_SETPRIV: str | None = None  # its path once looked up ("" if there is none)


def _die_with_parent(signum: int = signal.SIGTERM) -> None:
    """In the child: get signum (SIGTERM: the program quits cleanly) if nbdbackup dies, even by SIGKILL."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    except (OSError, AttributeError):
        pass


def _escape(path: Path) -> str:
    """Escape commas for QEMU's option syntax."""
    return str(path).replace(",", ",,")
