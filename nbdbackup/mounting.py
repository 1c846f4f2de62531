"""mount/umount: the guest filesystems of a backup point, read-only, under a directory.

Built only from existing tools; nbdbackup parses no partition table and no filesystem:

    nbdkit (nbdkit_plugin.py) + cow filter   the disk, with a throwaway overlay so that
                                             journals can be replayed (never into the repository)
    nbdfuse                                  the disk as a file (FUSE)
    partx                                    the partition table (util-linux)
    losetup --offset --sizelimit             one loop device per partition (this needs no
                                             partition scanning by the kernel)
    blkid -p                                 the filesystem type
    mount -o ro                              filesystems the kernel knows (ext2/3/4, xfs, btrfs ...)
    fusefat -o ro                            vfat when the kernel has no vfat (userspace)

Everything set up is recorded in a state file as it happens, so `umount` (or
the cleanup after a failure or Ctrl-C) removes exactly that, in reverse.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .capture import CancelToken
from .errors import MountPointError, NbdBackupError, QEMUFailed, ToolUnavailable
from .serving import Source, key_pipe, nbdkit_command, resolve
from .workdirs import runtime_base

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0
SECTOR = 512  # partx counts in 512-byte sectors
FUSE_FILESYSTEMS = {"vfat": "fusefat", "msdos": "fusefat"}  # when the kernel lacks them
KERNEL_OPTIONS = {"xfs": "ro,nouuid", "ext2": "ro", "ext3": "ro", "ext4": "ro", "btrfs": "ro"}


@dataclass(frozen=True)
class MountRequest:
    vm: str
    checkpoint: str
    directory: Path
    disks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mounted:
    path: Path
    disk: str
    partition: str  # "p1", or "" for a filesystem on the whole disk
    fstype: str
    how: str  # "kernel" | "fusefat"


@dataclass(frozen=True)
class Skipped:
    disk: str
    partition: str
    reason: str


@dataclass(frozen=True)
class MountResult:
    checkpoint: str
    mounted: tuple[Mounted, ...]
    skipped: tuple[Skipped, ...]


def state_dir(directory: Path) -> Path:
    """Where the state of the mount at directory lives (outside it: it must stay a clean view)."""
    key = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    base = Path("/run") if os.geteuid() == 0 and os.path.isdir("/run") else runtime_base()  # the same for every root shell
    return base / "nbdbackup-mounts" / key


# -- checks -----------------------------------------------------------------


def check_directory(directory: Path) -> None:
    if not directory.exists():
        raise MountPointError(f"{directory} does not exist", hint="create an empty directory first")
    if not directory.is_dir():
        raise MountPointError(f"{directory} is not a directory")
    if any(directory.iterdir()):
        raise MountPointError(f"{directory} is not empty", hint="give an empty directory")
    if os.path.ismount(directory):
        raise MountPointError(f"{directory} is already a mount point")
    if state_dir(directory).exists():
        raise MountPointError(f"{directory} is already in use by nbdbackup mount", hint=f"run `nbdbackup umount {directory}`")


def check_tools() -> None:
    if os.geteuid() != 0:
        raise ToolUnavailable("mount needs root (loop devices and kernel mounts)")
    if not os.path.exists("/dev/fuse"):
        raise ToolUnavailable("FUSE is not available (no /dev/fuse)", hint="load the fuse module or install fuse3")
    for prog, package in (("nbdkit", "nbdkit"), ("nbdfuse", "libnbd-bin"), ("fusermount3", "fuse3"),
                          ("losetup", "mount"), ("partx", "util-linux"), ("blkid", "util-linux")):
        if shutil.which(prog) is None:
            raise ToolUnavailable(f"{prog} is not installed", hint=f"install Debian's {package}")


def kernel_filesystems() -> set[str]:
    try:
        lines = Path("/proc/filesystems").read_text().splitlines()
    except OSError:
        return set()
    return {ln.split()[-1] for ln in lines if ln.strip() and not ln.startswith("nodev")}


# -- the state file: what is set up, in order -------------------------------


class State:
    """Steps done so far: {"kind": ..., ...}, persisted after each one."""

    def __init__(self, directory: Path, path: Path) -> None:
        self.directory = directory
        self.path = path
        self.steps: list[dict] = []

    @classmethod
    def load(cls, directory: Path) -> State:
        base = state_dir(directory)
        try:
            data = json.loads((base / "state.json").read_text())
        except (OSError, ValueError):
            raise MountPointError(f"{directory} is not mounted by nbdbackup") from None
        state = cls(directory, base)
        state.steps = data["steps"]
        return state

    def add(self, **step: object) -> None:
        self.steps.append(step)
        tmp = self.path / "state.json.tmp"
        tmp.write_text(json.dumps({"directory": str(self.directory), "steps": self.steps}))
        os.replace(tmp, self.path / "state.json")


def _run(cmd: list[str], what: str, error: type[NbdBackupError] = NbdBackupError) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, start_new_session=True)
    if proc.returncode != 0:
        raise error(f"{what}: {proc.stderr.strip() or f'exit status {proc.returncode}'}")
    return proc.stdout


def _wait_gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    return False


def undo(state: State) -> list[str]:
    """Undo every recorded step, newest first; returns what could not be undone."""
    problems: list[str] = []
    for step in reversed(state.steps):
        kind = step["kind"]
        try:
            if kind == "mount":
                proc = subprocess.run(["umount", step["path"]], capture_output=True, text=True)
                if proc.returncode != 0 and os.path.ismount(step["path"]):
                    problems.append(f"{step['path']}: {proc.stderr.strip()}")
                    continue
                if step.get("pid"):
                    _wait_gone(step["pid"])
            elif kind == "dir":
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(step["path"])
            elif kind == "loop":
                proc = subprocess.run(["losetup", "-d", step["device"]], capture_output=True, text=True)
                if proc.returncode != 0 and "No such device" not in proc.stderr:
                    problems.append(f"{step['device']}: {proc.stderr.strip()}")
            elif kind == "fuse":
                if os.path.ismount(step["path"]):
                    proc = subprocess.run(["fusermount3", "-u", step["path"]], capture_output=True, text=True)
                    if proc.returncode != 0:
                        problems.append(f"{step['path']}: {proc.stderr.strip()}")
                        continue
                pid = step.get("pid")
                if pid and not _wait_gone(pid):
                    os.kill(pid, signal.SIGKILL)
        except OSError as exc:
            problems.append(f"{kind}: {exc}")
    if not problems:
        shutil.rmtree(state.path, ignore_errors=True)
    return problems


# -- mounting ---------------------------------------------------------------


def _fuse_disk(state: State, source: Source, disk: str) -> Path:
    """nbdfuse running nbdkit (cow filter: journals replay into a throwaway overlay); the disk as a file."""
    where = state.path / disk
    where.mkdir()
    pidfile = state.path / f"{disk}.nbdfuse.pid"
    env = dict(os.environ, TMPDIR=str(state.path))
    log_file = open(state.path / f"{disk}.log", "wb")
    with log_file, key_pipe(source.key) as keyfd:  # nbdfuse passes the pipe on to the nbdkit it runs
        server = nbdkit_command(source.for_disks((disk,)), filters=("cow",), readonly=False, stdio=True, keyfd=keyfd)
        proc = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(where), "--command", *server],
                                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, pass_fds=() if keyfd is None else (keyfd,))
    state.add(kind="fuse", path=str(where), pid=proc.pid)
    deadline = time.monotonic() + READY_TIMEOUT
    while not pidfile.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            text = (state.path / f"{disk}.log").read_text(errors="replace").strip().splitlines()
            raise QEMUFailed(f"nbdfuse failed for disk {disk}: {text[-1] if text else proc.returncode}")
        time.sleep(0.05)
    return where / "nbd"


def _partitions(image: Path) -> list[tuple[str, int, int]]:
    """(name, offset, size) per partition, as util-linux's partx reads the table; [("", 0, size)] without one."""
    proc = subprocess.run(["partx", "--show", "--noheadings", "--output", "NR,START,SECTORS", str(image)], capture_output=True, text=True)
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln.strip()] if proc.returncode == 0 else []
    if not rows:
        return [("", 0, image.stat().st_size)]
    return [(f"p{nr}", int(start) * SECTOR, int(sectors) * SECTOR) for nr, start, sectors in rows]


def _mount_one(state: State, device: str, fstype: str, target: Path, kernel: set[str]) -> str:
    if fstype in kernel or (fstype not in FUSE_FILESYSTEMS):
        _run(["mount", "-t", fstype, "-o", KERNEL_OPTIONS.get(fstype, "ro"), device, str(target)], f"mounting {fstype} at {target}")
        state.add(kind="mount", path=str(target))
        return "kernel"
    tool = FUSE_FILESYSTEMS[fstype]
    if shutil.which(tool) is None:
        raise ToolUnavailable(f"the kernel cannot mount {fstype} and {tool} is not installed", hint=f"install Debian's {tool}")
    _run([tool, "-o", "ro", device, str(target)], f"mounting {fstype} at {target} with {tool}")
    state.add(kind="mount", path=str(target), pid=_fuse_pid(target))
    return tool


def _fuse_pid(target: Path) -> int | None:
    """The process serving a FUSE mount (fusefat backgrounds itself), found through /proc."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                args = (proc / "cmdline").read_bytes().split(b"\0")
                if str(target).encode() in args:
                    return int(proc.name)
    return None


def run_mount(repo, source_for: Callable[[str, tuple[str, ...]], Source], req: MountRequest, cancel: CancelToken) -> MountResult:
    directory = req.directory.absolute()
    check_directory(directory)
    check_tools()
    m, chosen = resolve(repo, req.vm, req.checkpoint, req.disks)
    source = source_for(m.checkpoint, tuple(d.id for d in chosen))
    base = state_dir(directory)
    base.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    base.mkdir(mode=0o700)
    state = State(directory, base)
    state.add(kind="begin", vm=req.vm, checkpoint=m.checkpoint)
    kernel = kernel_filesystems()
    mounted: list[Mounted] = []
    skipped: list[Skipped] = []
    try:
        for d in chosen:
            cancel.check()
            image = _fuse_disk(state, source, d.id)
            for part, offset, size in _partitions(image):
                cancel.check()
                device = _run(["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size), str(image)],
                              f"loop device for disk {d.id} {part}", ToolUnavailable).strip()
                state.add(kind="loop", device=device)
                fstype = subprocess.run(["blkid", "-p", "-s", "TYPE", "-o", "value", device], capture_output=True, text=True).stdout.strip()
                if not fstype or fstype in ("swap", "LVM2_member", "crypto_LUKS"):
                    skipped.append(Skipped(d.id, part, f"no filesystem to mount ({fstype or 'unknown'})"))
                    continue
                target = directory / d.id / part if part else directory / d.id
                for p in (directory / d.id, target):
                    if not p.exists():
                        p.mkdir()
                        state.add(kind="dir", path=str(p))
                try:
                    how = _mount_one(state, device, fstype, target, kernel)
                except ToolUnavailable:
                    raise
                except NbdBackupError as exc:
                    skipped.append(Skipped(d.id, part, f"{fstype}: {exc}"))
                    continue
                mounted.append(Mounted(target, d.id, part, fstype, how))
        cancel.check()
    except BaseException:
        undo(state)
        raise
    return MountResult(m.checkpoint, tuple(mounted), tuple(skipped))


def run_umount(directory: Path) -> None:
    directory = directory.absolute()
    state = State.load(directory)
    problems = undo(state)
    if problems:
        raise MountPointError(f"could not unmount everything under {directory}: {problems[0]}",
                              hint="close what uses it, then run umount again")
