"""Real Linux guests for the `guest` test tier.

:func:`guest_image` builds (once, cached: scripts/guest-image) a small Debian 12
guest from Debian's packages. A :class:`Guest` boots it with its own kernel and
initrd, on a copy-on-write overlay (the cached image stays pristine), with any
number of extra disks, the guest agent on a unix socket, and two QMP monitors:
``qmp_socket`` for the tool under test, a private one for the harness.

:class:`Agent` is a small synchronous client for qemu-guest-agent. The agent's
socket serves one client at a time, so the harness connects per operation and
never while nbdbackup uses it.

Acceleration: KVM when /dev/kvm works and can run the guest, else TCG. Nested
KVM on some hosts starts QEMU but never runs a Linux guest (an emulation failure
or a silent hang), so the first boot under KVM must show a live agent within
KVM_TRIAL seconds, or the session falls back to TCG for good.
NBDBACKUP_GUEST_ACCEL=kvm|tcg forces a choice.
"""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import _LIVE, QEMU_SYSTEM, HarnessError, _Monitor

TOP = Path(__file__).resolve().parent.parent
IMAGE_SCRIPT = TOP / "scripts" / "guest-image"
KVM_TRIAL = 30.0        # seconds a KVM boot gets to show a live agent before TCG is used
BOOT_TIMEOUT = 300.0    # seconds for the agent to answer after start (TCG on a busy host)
AGENT_TIMEOUT = 30.0    # seconds for one agent command


@dataclass(frozen=True)
class GuestImage:
    directory: Path
    build_seconds: float  # 0 when the cache had it

    @property
    def root(self) -> Path:
        return self.directory / "root.qcow2"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def cmdline(self) -> str:
        return (self.directory / "cmdline").read_text().strip()

    def boot_args(self) -> list[str]:
        """QEMU arguments that boot the guest's kernel with its root on the first disk (vda)."""
        return ["-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", self.cmdline]


def guest_image() -> GuestImage:
    """The cached guest image, built now if needed (a few minutes, as root)."""
    start = time.monotonic()
    proc = subprocess.run([str(IMAGE_SCRIPT)], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise HarnessError(f"scripts/guest-image failed: {proc.stderr.strip()}")
    built = "built in" in proc.stderr
    return GuestImage(Path(proc.stdout.strip().splitlines()[-1]), time.monotonic() - start if built else 0.0)


class AgentError(HarnessError):
    pass


class Agent:
    """One connection to qemu-guest-agent (QMP without greeting). Use as a context manager."""

    def __init__(self, path: Path, timeout: float = AGENT_TIMEOUT) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(str(path))
        self._buf = b""

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def sync(self) -> None:
        """guest-sync with a fresh id: skips replies a previous client left unread."""
        token = random.randrange(1, 2**31)
        self._send("guest-sync", {"id": token})
        while self._read().get("return") != token:
            pass

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        self._send(command, arguments)
        reply = self._read()
        if "error" in reply:
            raise AgentError(f"{command}: {reply['error'].get('desc')}")
        return reply.get("return")

    def run(self, argv: Sequence[str], timeout: float = 120.0, check: bool = True) -> tuple[int, str, str]:
        """Run a program in the guest; (exit code, stdout, stderr)."""
        pid = self.execute("guest-exec", {"path": argv[0], "arg": list(argv[1:]), "capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.execute("guest-exec-status", {"pid": pid})
            if status["exited"]:
                break
            if time.monotonic() > deadline:
                raise AgentError(f"{' '.join(argv)}: still running after {timeout:g} s")
            time.sleep(0.2)
        out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
        err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
        code = status.get("exitcode", -1)
        if check and code != 0:
            raise AgentError(f"{' '.join(argv)}: exit {code}: {err.strip() or out.strip()}")
        return code, out, err

    def _send(self, command: str, arguments: Mapping[str, Any] | None) -> None:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = dict(arguments)
        self._sock.sendall(json.dumps(msg).encode() + b"\n")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise AgentError("the guest agent socket closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        line = line.strip(b"\xff").strip()  # guest-sync-delimited's 0xff, if a peer used it
        return json.loads(line) if line else self._read()


# The session's choice of accelerator, once a boot has shown which works.
_accel: list[str] = []


def _kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def accelerator() -> str:
    """The accelerator guests boot with: forced, learned this session, or to be tried."""
    forced = os.environ.get("NBDBACKUP_GUEST_ACCEL")
    if forced:
        return forced
    if _accel:
        return _accel[0]
    return "kvm" if _kvm_usable() else "tcg"


class Guest:
    """A real Debian guest: root overlay on vda, extra empty qcow2 disks (vdb, ...)."""

    def __init__(self, workdir: Path, image: GuestImage, extra_disks: Mapping[str, int] = {}, *,
                 name: str = "guest", memory_mib: int = 512) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.image = image
        self.name = name
        self.memory_mib = memory_mib
        self.qmp_socket = self.dir / "qmp.sock"       # for the tool under test
        self.qga_socket = self.dir / "qga.sock"
        self.console = self.dir / "console.log"
        self._harness_socket = self.dir / "harness.sock"
        self.disks: dict[str, Path] = {"vda": self.dir / "vda.qcow2"}
        _qemu_img("create", "-q", "-f", "qcow2", "-b", str(image.root), "-F", "qcow2", str(self.disks["vda"]))
        for disk, size in extra_disks.items():
            self.disks[disk] = self.dir / f"{disk}.qcow2"
            _qemu_img("create", "-q", "-f", "qcow2", str(self.disks[disk]), str(size))
        self._proc: subprocess.Popen[bytes] | None = None
        self._monitor: _Monitor | None = None
        self.accel = ""
        self.boot_seconds = 0.0

    # -- lifecycle -------------------------------------------------------

    def start(self) -> Guest:
        """Boot and wait for the agent; falls back from KVM to TCG if KVM cannot run the guest."""
        accel = accelerator()
        t0 = time.monotonic()
        if accel == "kvm" and not os.environ.get("NBDBACKUP_GUEST_ACCEL") and not _accel:
            self._launch("kvm")
            if self._wait_agent(KVM_TRIAL, raise_on_timeout=False):
                _accel.append("kvm")
                self.boot_seconds = time.monotonic() - t0
                return self
            self.kill()
            _accel.append("tcg")
            accel = "tcg"
            t0 = time.monotonic()
        self._launch(accel)
        self._wait_agent(BOOT_TIMEOUT)
        if not _accel:
            _accel.append(accel)
        self.boot_seconds = time.monotonic() - t0
        return self

    def _launch(self, accel: str) -> None:
        for p in (self.qmp_socket, self.qga_socket, self._harness_socket):
            p.unlink(missing_ok=True)
        self.console.write_bytes(b"")
        self.accel = accel
        err = open(self.dir / "qemu.stderr", "wb")
        self._proc = subprocess.Popen(self.command_line(accel), stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        err.close()
        _LIVE.add(self._proc)
        self._monitor = _Monitor.connect(self._harness_socket, self.running, 15.0)

    def command_line(self, accel: str) -> list[str]:
        cmd = [QEMU_SYSTEM, "-machine", f"q35,accel={accel}", "-m", str(self.memory_mib), "-nodefaults",
               "-display", "none", "-no-reboot", "-nic", "none", "-serial", f"file:{self.console}",
               *self.image.boot_args(),
               "-chardev", f"socket,id=qga0,path={self.qga_socket},server=on,wait=off",
               "-device", "virtio-serial-pci", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
               "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
               "-qmp", f"unix:{self._harness_socket},server=on,wait=off"]
        for disk, path in self.disks.items():
            cmd += ["-blockdev", f"driver=file,filename={path},node-name={disk}-file",
                    "-blockdev", f"driver=qcow2,file={disk}-file,node-name={disk}-fmt",
                    "-device", f"virtio-blk-pci,drive={disk}-fmt,id={disk}"]
        return cmd

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _wait_agent(self, timeout: float, *, raise_on_timeout: bool = True) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise HarnessError(f"the guest's QEMU exited: {self._tail()}")
            if self._monitor is not None and self._monitor.execute("query-status")["status"] in ("internal-error", "guest-panicked"):
                break
            try:
                with Agent(self.qga_socket, timeout=3.0) as agent:
                    agent.sync()
                    agent.execute("guest-ping")
                    return True
            except (OSError, AgentError, ValueError):
                time.sleep(1.0)
        if raise_on_timeout:
            raise HarnessError(f"the guest's agent did not answer within {timeout:g} s ({self.accel}); console: {self._tail()}")
        return False

    def agent(self) -> Agent:
        agent = Agent(self.qga_socket)
        agent.sync()
        return agent

    def run(self, *argv: str, timeout: float = 120.0, check: bool = True) -> tuple[int, str, str]:
        with self.agent() as agent:
            return agent.run(argv, timeout=timeout, check=check)

    def sh(self, script: str, timeout: float = 120.0) -> str:
        return self.run("/bin/sh", "-c", script, timeout=timeout)[1]

    def qmp(self, command: str, **args: Any) -> Any:
        if self._monitor is None:
            raise HarnessError("the guest is not running")
        return self._monitor.execute(command, args)

    def stop(self) -> None:
        """Quit QEMU (the guest is not shut down: the disks are throwaway)."""
        if self._proc is None:
            return
        if self.running() and self._monitor is not None:
            try:
                self._monitor.execute("quit")
            except (OSError, HarnessError):
                pass
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._release()

    def kill(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._release()

    def _release(self) -> None:
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        if self._proc is not None:
            _LIVE.discard(self._proc)
            self._proc = None

    def _tail(self) -> str:
        text = ""
        for f in (self.dir / "qemu.stderr", self.console):
            if f.exists():
                text += f.read_text(errors="replace")[-600:]
        return text.strip().replace("\n", " | ")[-800:]

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _qemu_img(*args: str) -> None:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HarnessError(f"qemu-img {' '.join(args)}: {proc.stderr.strip()}")
