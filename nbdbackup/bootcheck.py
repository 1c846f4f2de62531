"""verify --boot: prove that a backup point boots.

    1  restore the point into a private temporary directory (the repository
       is only read), and put a copy-on-write overlay on each disk
    2  start a throwaway QEMU on the overlays: no network, the disks as
       virtio-blk devices named as in the backup, the guest agent on a socket,
       the serial console in a file; arguments from [vm.NAME] boot
    3  wait for a sign of life: the guest agent answers guest-ping (or the
       console shows a line the user named), within the timeout
    4  optionally run a check command in the guest through the agent
    5  quit QEMU, delete everything

Nothing here prints or exits: the result or a BackupDoesNotBoot (exit 6)
goes back to the CLI.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import random
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .capture import CancelToken, Tuning
from .errors import BackupDoesNotBoot, NbdBackupError, QEMUFailed, UsageError
from .qmp import QMPSession
from .repository import Repository
from .restore import RestoreRequest, find_backup, run_restore
from .storage_daemon import spawn_dying_with_parent

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0
POLL = 1.0  # seconds between signs-of-life checks
AGENT_ATTEMPT = 3.0  # seconds one guest-ping attempt may take

# QEMU options used unless [vm.NAME] boot gives the same option.
DEFAULT_ARGS: tuple[tuple[str, str], ...] = (("-machine", "q35"), ("-m", "1024"), ("-smp", "2"))


@dataclass(frozen=True)
class BootRequest:
    vm: str
    checkpoint: str = "latest"
    check: str | None = None  # shell command run in the guest through the agent
    console_line: str | None = None  # wait for this text on the serial console instead of the agent
    timeout: float | None = None  # seconds (None: [vm.NAME] boot_timeout, else DEFAULT_TIMEOUT; the engine fills it in)
    qemu_args: tuple[str, ...] = ()  # [vm.NAME] boot (the engine fills it in)

    @property
    def seconds(self) -> float:
        """How long the guest may take to show life."""
        return DEFAULT_TIMEOUT if self.timeout is None else self.timeout


@dataclass(frozen=True)
class BootResult:
    vm: str
    checkpoint: str
    seconds: float  # from QEMU's start to the sign of life
    sign: str  # what showed the guest alive
    check: str | None = None
    check_output: str = ""


@dataclass(frozen=True)
class BootPlan:
    """The throwaway VM: its command line and where its sockets and console are."""

    command: tuple[str, ...]
    qmp: Path
    agent: Path
    console: Path


def plan_boot(disks: Sequence[tuple[str, Path]], user_args: Sequence[str], rundir: Path, sockets: Path | None = None) -> BootPlan:
    """The QEMU command line that boots `disks` (id, overlay) in order; the first is the boot disk.
    Its sockets go into `sockets` (default rundir): a short path, as a socket's must be under 108 bytes."""
    qmp, agent, console = (sockets or rundir) / "qmp.sock", (sockets or rundir) / "qga.sock", rundir / "console.log"
    cmd = ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-no-reboot", "-nic", "none",
           "-serial", f"file:{console}",
           "-qmp", f"unix:{qmp},server=on,wait=off",
           "-chardev", f"socket,id=nbdbackup-qga,path={agent},server=on,wait=off",
           "-device", "virtio-serial-pci,id=nbdbackup-serial",
           "-device", "virtserialport,chardev=nbdbackup-qga,name=org.qemu.guest_agent.0"]
    for option, value in DEFAULT_ARGS:
        if option not in user_args:
            cmd += [option, value]
    if "-accel" not in user_args and not any("accel=" in a for a in user_args):
        cmd += ["-accel", "kvm", "-accel", "tcg"]  # KVM where it works, else emulation
    for i, (disk, path) in enumerate(disks):
        cmd += ["-blockdev", f"driver=file,filename={_escape(path)},node-name=boot-file{i}",
                "-blockdev", f"driver=qcow2,file=boot-file{i},node-name=boot-disk{i}",
                "-device", f"virtio-blk-pci,drive=boot-disk{i},id={disk}" + (",bootindex=1" if i == 0 else "")]  # -kernel takes 0
    cmd += list(user_args)
    return BootPlan(tuple(cmd), qmp, agent, console)


def restore_point(repo: Repository, req: BootRequest, workdir: Path, *, sockets: Path | None = None, tuning: Tuning = Tuning(),
                  cancel: CancelToken = CancelToken(), on_start: Callable[[int], None] = lambda total: None,
                  progress: Callable[[int], None] = lambda n: None) -> tuple[str, list[tuple[str, Path]]]:
    """Restore the point into workdir (the only step that reads the repository): its checkpoint and (disk, image) pairs."""
    if not req.seconds > 0:
        raise UsageError(f"the boot timeout must be a positive number of seconds, not {req.seconds:g}")
    m = find_backup(repo, req.vm, req.checkpoint)
    images = run_restore(repo, RestoreRequest(vm=req.vm, checkpoint=m.checkpoint, output=workdir / "restored"),
                         socket_dir=sockets or workdir, tuning=tuning, cancel=cancel, progress=progress, on_start=on_start)
    return m.checkpoint, [(i.disk, i.path) for i in images]


def boot_point(req: BootRequest, checkpoint: str, images: list[tuple[str, Path]], workdir: Path, *,
               sockets: Path | None = None, cancel: CancelToken = CancelToken(), on_phase: Callable[[str], None] = lambda text: None) -> BootResult:
    """Boot the restored images on overlays in a throwaway QEMU and wait for a sign of life."""
    overlays = []
    for disk, image in images:
        overlay = workdir / f"{disk}.overlay.qcow2"
        _qemu_img("create", "-q", "-f", "qcow2", "-b", str(image), "-F", "qcow2", str(overlay))
        overlays.append((disk, overlay))
    plan = plan_boot(overlays, req.qemu_args, workdir, sockets)
    on_phase(f"booting backup {checkpoint} of {req.vm} (timeout {req.seconds:g} s)")
    with _qemu(plan, workdir / "qemu.log") as (proc, qmp):
        started = time.monotonic()
        sign = _wait_alive(plan, proc, qmp, req, cancel, started)
        seconds = time.monotonic() - started
        output = ""
        if req.check is not None:
            output = _run_check(plan.agent, req.check, max(started + req.seconds - time.monotonic(), 30.0), checkpoint)
    return BootResult(req.vm, checkpoint, seconds, sign, req.check, output)


@contextlib.contextmanager
def _qemu(plan: BootPlan, logfile: Path) -> Iterator[tuple[subprocess.Popen, QMPSession]]:
    """Start QEMU and connect to its monitor; quit (else kill) it on exit."""
    log.debug("starting %s", plan.command)
    with open(logfile, "wb") as out:
        try:
            # Its own session (Ctrl-C reaches only us, and we stop it), and SIGTERM if we die, even by SIGKILL.
            proc = spawn_dying_with_parent(plan.command, stdout=out)
        except OSError as exc:
            raise QEMUFailed(f"cannot start QEMU for the boot test: {exc.strerror or exc}") from None
    qmp = QMPSession(plan.qmp, connect_timeout=30)
    try:
        deadline = time.monotonic() + 30
        while not plan.qmp.exists():
            if proc.poll() is not None:
                raise UsageError(f"QEMU refused the boot test's command line: {_last_line(logfile)}",
                                 hint="check [vm.NAME] boot in the config file")
            if time.monotonic() > deadline:
                raise QEMUFailed("QEMU did not start within 30 s for the boot test")
            time.sleep(0.05)
        try:
            qmp.connect()
        except NbdBackupError:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            if proc.poll() is not None:
                raise UsageError(f"QEMU refused the boot test's command line: {_last_line(logfile)}",
                                 hint="check [vm.NAME] boot in the config file") from None
            raise
        yield proc, qmp
    finally:
        if proc.poll() is None:
            with contextlib.suppress(NbdBackupError):
                qmp.execute("quit", timeout=10)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        qmp.close()


def _wait_alive(plan: BootPlan, proc: subprocess.Popen, qmp: QMPSession, req: BootRequest,
                cancel: CancelToken, started: float) -> str:
    deadline = started + req.seconds
    while True:
        cancel.check()
        if proc.poll() is not None:
            raise BackupDoesNotBoot(f"backup of {req.vm} did not boot: the VM stopped after {time.monotonic() - started:.0f} s "
                                    f"(crash or power-off); console: {_console_tail(plan.console)}")
        try:
            status = qmp.execute("query-status", timeout=10)["status"]
        except NbdBackupError:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                raise
            continue  # QEMU exited: reported at the top of the loop
        if status in ("internal-error", "guest-panicked", "shutdown"):
            hint = ' (a nested KVM that cannot run this guest? add "-accel", "tcg" to [vm.NAME] boot)' if status == "internal-error" else ""
            raise BackupDoesNotBoot(f"backup of {req.vm} did not boot: the VM is in state {status}{hint}; console: {_console_tail(plan.console)}")
        if req.console_line is not None:
            if req.console_line in _read(plan.console):
                return f"the console showed {req.console_line!r}"
        elif _agent_answers(plan.agent):
            return "the guest agent answered"
        if time.monotonic() > deadline:
            what = f"the console line {req.console_line!r}" if req.console_line is not None else "an answer from the guest agent"
            raise BackupDoesNotBoot(f"backup of {req.vm} did not boot: no sign of life ({what}) within {req.seconds:g} s; "
                                    f"console: {_console_tail(plan.console)}",
                                    hint="raise --timeout, or check [vm.NAME] boot and that the guest runs qemu-guest-agent")
        time.sleep(POLL)


def _agent_answers(socket: Path) -> bool:
    try:
        with QMPSession(socket, connect_timeout=AGENT_ATTEMPT, guest_agent=True) as agent:
            token = random.randrange(1, 2**31)
            if agent.execute("guest-sync", {"id": token}, timeout=AGENT_ATTEMPT) != token:
                return False
            agent.execute("guest-ping", timeout=AGENT_ATTEMPT)
            return True
    except NbdBackupError:
        return False


def _run_check(socket: Path, command: str, timeout: float, checkpoint: str) -> str:
    """Run command with /bin/sh -c in the guest; its output, or BackupDoesNotBoot if it fails."""
    deadline = time.monotonic() + timeout
    try:
        with QMPSession(socket, connect_timeout=10, guest_agent=True) as agent:
            token = random.randrange(1, 2**31)
            agent.execute("guest-sync", {"id": token}, timeout=10)
            pid = agent.execute("guest-exec", {"path": "/bin/sh", "arg": ["-c", command], "capture-output": True}, timeout=10)["pid"]
            while True:
                status = agent.execute("guest-exec-status", {"pid": pid}, timeout=10)
                if status.get("exited"):
                    break
                if time.monotonic() > deadline:
                    raise BackupDoesNotBoot(f"backup {checkpoint} booted, but the check {command!r} did not finish within {timeout:.0f} s")
                time.sleep(0.5)
    except BackupDoesNotBoot:
        raise
    except NbdBackupError as exc:
        raise BackupDoesNotBoot(f"backup {checkpoint} booted, but the check {command!r} could not run through the guest agent: {exc}") from None
    out = (base64.b64decode(status.get("out-data", "")) + base64.b64decode(status.get("err-data", ""))).decode(errors="replace").strip()
    code = status.get("exitcode", status.get("signal", -1))
    if code != 0:
        raise BackupDoesNotBoot(f"backup {checkpoint} booted, but the check {command!r} failed (exit {code})"
                                + (f": {out.splitlines()[-1]}" if out else ""))
    return out


def _qemu_img(*args: str) -> None:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, start_new_session=True)
    if proc.returncode != 0:
        raise QEMUFailed(f"qemu-img {args[0]} failed: {proc.stderr.strip()}")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _console_tail(path: Path) -> str:
    """The console's telling line: a kernel panic's reason if there is one, else the last line."""
    lines = [line.strip() for line in _read(path).splitlines() if line.strip()]
    panics = [line for line in lines if "Kernel panic" in line]
    line = panics[0] if panics else (lines[-1] if lines else "")
    return repr(line[:200]) if line else "empty"


def _last_line(path: Path) -> str:
    lines = _read(path).strip().splitlines()
    return lines[-1] if lines else "no output"


def _escape(path: Path) -> str:
    return str(path).replace(",", ",,")
