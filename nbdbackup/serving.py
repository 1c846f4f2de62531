"""serve: disks of a backup point as NBD exports, by a real NBD server.

    nbdkit + nbdkit_plugin.py     read-only exports straight from the repository
                                  (extents, multi-conn, any number of clients)
    qemu-storage-daemon           --writable only: a throwaway qcow2 overlay per
                                  disk on top of nbdkit's export; writes land in
                                  the overlay, which is deleted on exit

Why nbdkit with a Python plugin: the data lives in the repository's chunks, not
in an image file, so some program must answer reads from the index; nbdkit
speaks the protocol (and extents, multi-conn, many exports on one socket) and
leaves only "read these bytes / which ranges are holes" to us, in the same
Python code that `restore` trusts.  qemu-storage-daemon alone cannot read the
repository; it is used only where a qcow2 overlay is the right tool.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import QEMUFailed, ServeAddressError, ToolUnavailable, UsageError
from .records import Manifest
from .repository import Repository
from .repository.keys import Unlocked
from .repository.location import S3Location, parse_location
from .storage_daemon import spawn_dying_with_parent

log = logging.getLogger(__name__)

PLUGIN = Path(__file__).with_name("nbdkit_plugin.py")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 3.0  # nbdkit waits for its clients to disconnect; a read-only server can be killed
THREADS = 16  # nbdkit's worker threads at most (nbdkit_threads)
SOCKET_MAX = 107  # bytes in a unix socket path


@dataclass(frozen=True)
class ServeRequest:
    vm: str
    checkpoint: str
    disks: tuple[str, ...] = ()
    socket: Path | None = None  # default: a private directory
    tcp: str | None = None  # "ADDR:PORT"
    writable: bool = False


@dataclass(frozen=True)
class Listen:
    """Where a server listens: a unix socket path, or a TCP host and port."""

    path: Path | None = None
    host: str = ""
    port: int = 0

    def uri(self, export: str) -> str:
        if self.path is not None:
            return f"nbd+unix:///{export}?socket={self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{export}"

    def server_args(self) -> list[str]:
        """nbdkit's listening options."""
        if self.path is not None:
            return ["--unix", str(self.path)]
        return ["--ipaddr", self.host, "--port", str(self.port)]

    def qemu_addr(self) -> str:
        if self.path is not None:
            return f"addr.type=unix,addr.path={_escape(self.path)}"
        return f"addr.type=inet,addr.host={self.host},addr.port={self.port}"


@dataclass(frozen=True)
class Export:
    disk: str
    size: int
    uri: str


@dataclass(frozen=True)
class Source:
    """What nbdkit must serve: the repository (as the CLI names it), a backup, its disks;
    key: the opened key of an encrypted repository (handed to nbdkit by key_pipe, never
    on its command line)."""

    repo: str
    config: Path | None
    vm: str
    checkpoint: str
    disks: tuple[str, ...]
    key: Unlocked | None = field(default=None, repr=False)

    def for_disks(self, disks: tuple[str, ...]) -> Source:
        return replace(self, disks=disks)


# -- deciding ---------------------------------------------------------------


def choose_disks(m: Manifest, wanted: Sequence[str]) -> list:
    unknown = set(wanted) - {d.id for d in m.disks}
    if unknown:
        raise UsageError(f"backup {m.checkpoint} has no disk {', '.join(sorted(unknown))}", hint=f"its disks: {', '.join(d.id for d in m.disks)}")
    return [d for d in m.disks if not wanted or d.id in wanted]


def parse_tcp(text: str) -> Listen:
    """'ADDR:PORT' or '[IPv6]:PORT' -> Listen; ADDR must be given (no silent 0.0.0.0)."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--tcp {text!r} is not ADDR:PORT", hint="e.g. --tcp 127.0.0.1:10809")
    return Listen(host=host, port=int(port))


def check_socket_path(path: Path) -> None:
    """A socket path must be free: nothing there, or a dead socket (removed)."""
    if len(os.fsencode(path)) > SOCKET_MAX:
        raise ServeAddressError(f"socket path {path} is too long for a unix socket ({SOCKET_MAX} bytes at most)")
    if not path.parent.is_dir():
        raise ServeAddressError(f"cannot create socket {path}: {path.parent} is not a directory")
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServeAddressError(f"{path} exists and is not a socket", hint="choose another --socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # a socket nobody listens on: left by a dead server
            return
        pid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
    if _reap_orphan(pid):
        path.unlink(missing_ok=True)
        return
    raise ServeAddressError(f"socket {path} is in use by another server", hint="stop it or choose another --socket")


def _reap_orphan(pid: int) -> bool:
    """Stop an nbdkit of ours whose nbdbackup died (killed): nbdkit's --exit-with-parent
    asks it to stop, but it keeps serving while clients (a VM) stay connected."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    if ppid != 1 or str(PLUGIN).encode() not in args or not args[0].endswith(b"nbdkit"):
        return False
    log.info("stopping the server left by a killed nbdbackup run (pid %d)", pid)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + STOP_TIMEOUT
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def remove_dead_server_dirs(base: Path, prefix: str) -> None:
    """Private directories of killed `serve` runs: ours, and their nbdkit (pidfile) is gone."""
    for d in base.glob(f"{prefix}*"):
        try:
            if d.is_symlink() or not d.is_dir() or d.stat().st_uid != os.geteuid():
                continue
            pid = int((d / "nbdkit.pid").read_text().strip())
        except (OSError, ValueError):
            continue  # no pidfile yet: a run that is starting
        try:
            alive = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone too
        except (OSError, IndexError):
            alive = False
        if not alive:
            shutil.rmtree(d, ignore_errors=True)


def check_tcp_free(listen: Listen) -> None:
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(listen.host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((listen.host, listen.port))
        except OSError as exc:
            raise ServeAddressError(f"cannot listen on {listen.host}:{listen.port}: {exc.strerror}") from None


def need_program(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolUnavailable(f"{name} is not installed", hint=f"install Debian's {package}")
    return path


# -- the servers ------------------------------------------------------------


def plugin_path_param() -> str:
    """nbdkit's embedded Python gets our sys.path, so it imports this nbdbackup and its dependencies."""
    return os.pathsep.join(p for p in sys.path if p and Path(p).is_dir())


@contextlib.contextmanager
def key_pipe(key: Unlocked | None) -> Iterator[int | None]:
    """The key of an encrypted repository for nbdkit: written into a pipe whose read end the
    server inherits (keyfd=N) and reads once, at start.  The passphrase is asked (and the
    key derived) once, by nbdbackup; the key is never on a command line, in the environment,
    in a file or in a log.  Yields None when there is no key to hand over."""
    if key is None:
        yield None
        return
    r, w = os.pipe()
    try:
        os.write(w, key.to_bytes())  # ~100 bytes, far below the pipe's capacity: written at once
    finally:
        os.close(w)
    try:
        yield r
    finally:
        os.close(r)  # the server has its own copy (or died): nothing stays readable here


def nbdkit_threads(repo: str) -> int:
    """nbdkit's worker threads for repo (as the CLI names it).  Reading from a directory is CPU
    work (decompressing, hashing): more threads than twice the CPUs only switch between each other
    and wait for Python's lock (16 threads on 2 CPUs: a whole-disk copy took 20% longer than with
    4; docs/PERFORMANCE.md).  S3's threads mostly wait for the network: THREADS."""
    if isinstance(parse_location(repo), S3Location):
        return THREADS
    return min(THREADS, max(4, 2 * len(os.sched_getaffinity(0))))


def nbdkit_command(source: Source, *, filters: Sequence[str] = (), readonly: bool = True, stdio: bool = False,
                   keyfd: int | None = None) -> list[str]:
    """The nbdkit command line serving source (listening options are added by the caller);
    keyfd: the inherited pipe holding source's key (key_pipe)."""
    cmd = [need_program("nbdkit", "nbdkit"), "--threads", str(nbdkit_threads(source.repo))]
    if stdio:
        cmd += ["--single", "--exit-with-parent"]  # under nbdfuse, which unmounts (disconnects) first
    else:
        cmd.append("--foreground")
    if readonly:
        cmd.append("--readonly")
    cmd += [f"--filter={f}" for f in filters]
    cmd += ["python", str(PLUGIN), f"path={plugin_path_param()}", f"repo={source.repo}",
            f"config={source.config or ''}", f"vm={source.vm}", f"checkpoint={source.checkpoint}"]
    cmd += [f"disk={d}" for d in source.disks]
    if keyfd is not None:
        cmd.append(f"keyfd={keyfd}")
    return cmd


def _plugin_available() -> None:
    proc = subprocess.run([need_program("nbdkit", "nbdkit"), "python", "--version"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolUnavailable("nbdkit's Python plugin is not installed", hint="install Debian's nbdkit-plugin-python")


class Process:
    """A server process started in its own session, ready once its pidfile exists; stopped on exit."""

    def __init__(self, name: str, cmd: Sequence[str], workdir: Path, *, env: dict[str, str] | None = None,
                 die_with_parent: bool = False, kill: bool = False, pass_fds: Sequence[int] = ()) -> None:
        """die_with_parent: SIGTERM (kill: SIGKILL) when nbdbackup dies, even by SIGKILL.
        kill: stop with SIGKILL at once.  For nbdkit: on SIGTERM it keeps its connections open
        and answers every request with ESHUTDOWN until the clients leave, so a connected VM
        would keep it alive (and get errors) for ever.  A killed read-only server loses nothing;
        its clients see the connection close (QEMU's NBD client then reconnects, or fails the
        request after its reconnect-delay, which rerror=stop turns into a paused VM)."""
        self.name = name
        self.cmd = list(cmd)
        self.pidfile = workdir / f"{name}.pid"
        self.logfile = workdir / f"{name}.log"
        self.env = env
        self.die_with_parent = die_with_parent
        self.kill = kill
        self.pass_fds = tuple(pass_fds)
        self.proc: subprocess.Popen | None = None

    def start(self, ready: Callable[[], bool] | None = None, timeout: float = START_TIMEOUT) -> Process:
        log.debug("starting %s", self.cmd)
        with open(self.logfile, "wb") as out:
            if self.die_with_parent:
                self.proc = spawn_dying_with_parent(self.cmd, stdout=out, signum=signal.SIGKILL if self.kill else signal.SIGTERM,
                                                    env=self.env, pass_fds=self.pass_fds)
            else:
                self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True, env=self.env, pass_fds=self.pass_fds)
        ready = ready or self.pidfile.exists
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                if self.proc.poll() is not None:
                    self.failed()
                if time.monotonic() > deadline:
                    raise QEMUFailed(f"{self.name} did not start within {timeout:.0f}s")
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def last_words(self) -> str:
        try:
            lines = [ln.strip() for ln in self.logfile.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            lines = []
        errors = [ln for ln in lines if "error" in ln.lower()] or lines
        return errors[-1] if errors else f"exit status {self.proc.returncode if self.proc else '?'}"

    def failed(self) -> None:
        words = self.last_words()
        if "Address already in use" in words:
            raise ServeAddressError(f"{self.name}: address in use ({words})")
        raise QEMUFailed(f"{self.name} failed: {words}")

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if self.kill:
            proc.kill()
            proc.wait()
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", self.name, STOP_TIMEOUT)
            proc.kill()
            proc.wait()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _escape(path: Path) -> str:
    return str(path).replace(",", ",,")


@contextlib.contextmanager
def backup_server(source: Source, listen: Listen, workdir: Path, *, block_status: bool = True) -> Iterator[Process]:
    """nbdkit serving source read-only on listen, until the block ends.
    block_status=False: no structured replies, so clients cannot ask which ranges are holes
    (QEMU then answers "data" itself, without asking the server; see recovering.py)."""
    _plugin_available()
    with Process("nbdkit", [], workdir, die_with_parent=True, kill=True) as server:
        with key_pipe(source.key) as keyfd:
            cmd = nbdkit_command(source, keyfd=keyfd)
            cmd[1:1] = [*listen.server_args(), "--pidfile", str(workdir / "nbdkit.pid"), *([] if block_status else ["--no-sr"])]
            server.cmd, server.pass_fds = cmd, (() if keyfd is None else (keyfd,))
            server.start()
        yield server


@contextlib.contextmanager
def overlay_server(source: Source, backing: Listen, listen: Listen, sizes: dict[str, int], workdir: Path) -> Iterator[Process]:
    """qemu-storage-daemon exporting a writable, throwaway qcow2 overlay per disk over backing's exports."""
    need_program("qemu-storage-daemon", "qemu-system-common")
    cmd = [need_program("qemu-storage-daemon", "qemu-system-common"), "--pidfile", str(workdir / "qemu-storage-daemon.pid"),
           "--nbd-server", listen.qemu_addr()]
    for i, disk in enumerate(source.disks):
        overlay = workdir / f"overlay-{i}.qcow2"
        proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", backing.uri(disk),
                               str(overlay), str(sizes[disk])], capture_output=True, text=True)
        if proc.returncode != 0:
            raise QEMUFailed(f"cannot create the overlay for disk {disk}: {proc.stderr.strip()}")
        cmd += ["--blockdev", f"driver=qcow2,node-name=o{i},file.driver=file,file.filename={_escape(overlay)}",
                "--export", f"type=nbd,id=e{i},node-name=o{i},name={disk},writable=on"]
    with Process("qemu-storage-daemon", cmd, workdir, die_with_parent=True) as server:
        server.start()
        yield server


# -- for the plugin ---------------------------------------------------------


def read_key(fd: int) -> Unlocked:
    """In nbdkit: the key nbdbackup wrote into the pipe fd (key_pipe); the pipe is closed after."""
    parts = []
    try:
        while chunk := os.read(fd, 4096):
            parts.append(chunk)
    finally:
        os.close(fd)
    return Unlocked.from_bytes(b"".join(parts))


# -- orchestration ----------------------------------------------------------


def resolve(repo: Repository, vm: str, checkpoint: str, disks: Sequence[str]) -> tuple[Manifest, list]:
    """The backup and its chosen disks, every index checked now (a damaged one fails here, not in a client)."""
    from .restore import find_backup

    m = find_backup(repo, vm, checkpoint)
    chosen = choose_disks(m, disks)
    for d in chosen:
        repo.read_index(m, d.id)
    return m, chosen


@contextlib.contextmanager
def serving(repo: Repository, repo_location: str, config: Path | None, req: ServeRequest, workdir: Path) -> Iterator[tuple[Manifest, list[Export], list[Process]]]:
    """Start the servers for req; yield the exports; stop everything on exit."""
    if req.socket is not None and req.tcp is not None:
        raise UsageError("give --socket or --tcp, not both")
    listen = parse_tcp(req.tcp) if req.tcp else Listen(path=(req.socket.absolute() if req.socket else workdir / "nbd.sock"))
    m, chosen = resolve(repo, req.vm, req.checkpoint, req.disks)
    if listen.path is not None:
        check_socket_path(listen.path)
    else:
        check_tcp_free(listen)
    source = Source(repo_location, config, req.vm, m.checkpoint, tuple(d.id for d in chosen), repo.unlocked_key())
    with contextlib.ExitStack() as stack:
        if req.writable:
            inner = Listen(path=workdir / "backup.sock")
            servers = [stack.enter_context(backup_server(source, inner, workdir)),
                       stack.enter_context(overlay_server(source, inner, listen, {d.id: d.size for d in chosen}, workdir))]
        else:
            servers = [stack.enter_context(backup_server(source, listen, workdir))]
        if listen.path is not None and req.socket is not None:
            stack.callback(listen.path.unlink, missing_ok=True)
        yield m, [Export(d.id, d.size, listen.uri(d.id)) for d in chosen], servers
