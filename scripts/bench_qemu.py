"""Processes for the benchmark: a paused QEMU VM with two monitors (ours through nbdbackup.qmp),
qemu-storage-daemon restore targets, and timed child processes with their peak RSS.

Every process started here is registered, and `reap_all()` (called from the
benchmark's finally and atexit) stops whatever is still running.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_LIVE: list[subprocess.Popen] = []


def _register(proc: subprocess.Popen) -> subprocess.Popen:
    _LIVE.append(proc)
    return proc


def reap_all() -> None:
    """SIGTERM every registered process still running (they clean up), then SIGKILL."""
    procs = [p for p in _LIVE if p.poll() is None]
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    _LIVE.clear()


atexit.register(reap_all)


class QMPFailed(RuntimeError):
    pass


class Monitor:
    """The benchmark's own QMP monitor: nbdbackup's QMP adapter with keyword arguments.

    Keyword arguments with '_' are sent with '-' (node_name=...).
    """

    def __init__(self, path: Path, alive: Callable[[], bool], timeout: float = 15.0) -> None:
        from nbdbackup.errors import NbdBackupError
        from nbdbackup.qmp import QMPSession

        self._errors = NbdBackupError
        deadline = time.monotonic() + timeout
        while not path.exists():  # QEMU creates the socket a moment after it starts
            if not alive():
                raise QMPFailed(f"process exited before its monitor {path} appeared")
            if time.monotonic() > deadline:
                raise QMPFailed(f"monitor {path} did not appear")
            time.sleep(0.01)
        self._session = QMPSession(path, connect_timeout=timeout)
        try:
            self._session.connect()
        except NbdBackupError as exc:
            raise QMPFailed(str(exc)) from None

    def cmd(self, _command: str, **args: Any) -> Any:
        try:
            return self._session.execute(_command, {k.replace("_", "-"): v for k, v in args.items()} or None)
        except self._errors as exc:
            raise QMPFailed(str(exc)) from None

    def wait_event(self, pred: Callable[[dict], bool], timeout: float = 30.0) -> dict:
        try:
            return self._session.wait_event(pred, timeout)
        except self._errors as exc:
            raise QMPFailed(str(exc)) from None

    def close(self) -> None:
        self._session.close()


class VM:
    """qemu-system-x86_64 -S with one virtio-blk disk (id vda) on -blockdev file + qcow2 nodes.

    `tool_qmp` is for nbdbackup; the benchmark uses its own monitor (`mon`).
    """

    DISK = "vda"
    NODE = "vda-fmt"
    QDEV = "/machine/peripheral/vda/virtio-backend"

    def __init__(self, image: Path, rundir: Path, sockdir: Path, name: str = "vm1") -> None:
        self.image = image
        self.name = name
        self.log_path = rundir / f"{name}.qemu-stdout.log"
        self.err_path = rundir / f"{name}.qemu-stderr.log"
        self.tool_qmp = sockdir / f"{name}-tool.qmp"
        self.bench_qmp = sockdir / f"{name}-bench.qmp"
        self.proc: subprocess.Popen | None = None
        self.mon: Monitor | None = None
        self._log_pos = 0

    def start(self) -> None:
        for s in (self.tool_qmp, self.bench_qmp):
            s.unlink(missing_ok=True)
        cmd = [
            "stdbuf", "-oL", "qemu-system-x86_64", "-name", self.name,
            "-machine", "q35,accel=tcg", "-nodefaults", "-S", "-display", "none",
            "-qmp", f"unix:{self.tool_qmp},server=on,wait=off",
            "-qmp", f"unix:{self.bench_qmp},server=on,wait=off",
            "-blockdev", json.dumps({"driver": "file", "filename": str(self.image), "node-name": "vda-file"}),
            "-blockdev", json.dumps({"driver": "qcow2", "file": "vda-file", "node-name": self.NODE}),
            "-device", f"virtio-blk-pci,drive={self.NODE},id={self.DISK}",
        ]
        with open(self.log_path, "ab") as out, open(self.err_path, "ab") as err:
            self._log_pos = out.tell()
            self.proc = _register(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err))
        proc = self.proc
        self.mon = Monitor(self.bench_qmp, lambda: proc.poll() is None)

    def cpu_seconds(self) -> float:
        """User+system CPU seconds QEMU has used so far (/proc/PID/stat), NBD server included."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def write(self, offset: int, length: int, pattern: int) -> None:
        """A simulated guest write through the device, confirmed on QEMU's stdout."""
        assert self.mon is not None
        reply = self.mon.cmd("human-monitor-command",
                             command_line=f'qemu-io -d {self.QDEV} "write -P 0x{pattern:02x} {offset} {length}"')
        if reply.strip():
            raise RuntimeError(f"qemu-io write {offset}+{length}: {reply.strip()}")
        want = f"wrote {length}/{length} bytes at offset {offset}"
        deadline = time.monotonic() + 30
        while True:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_pos)
                data = f.read()
            pos = 0
            while (nl := data.find(b"\n", pos)) >= 0:
                line = data[pos:nl].decode(errors="replace").rstrip("\r")
                pos = nl + 1
                if line == want:
                    self._log_pos += pos
                    return
                if " failed: " in line or line.startswith("Parsing error"):
                    raise RuntimeError(f"qemu-io write {offset}+{length}: {line}")
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError("QEMU exited")
            if time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not confirm {want!r}")
            time.sleep(0.002)

    def quit(self) -> None:
        """Clean quit (QEMU stores the persistent bitmaps); kill if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            if self.mon is not None:
                self.mon.cmd("quit")
        except (OSError, QMPFailed):
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.mon is not None:
            self.mon.close()
            self.mon = None

    def __enter__(self) -> VM:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.quit()


class NbdExport:
    """A read-only NBD export of the VM's qcow2 node through the benchmark's monitor."""

    def __init__(self, vm: VM, socket_path: Path, name: str = "vda") -> None:
        self.vm, self.socket, self.name = vm, socket_path, name
        self._server = self._export = False

    def __enter__(self) -> NbdExport:
        mon = self.vm.mon
        assert mon is not None
        try:
            mon.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(self.socket)}})
            self._server = True
            mon.cmd("block-export-add", type="nbd", id="bench-ref", node_name=VM.NODE, name=self.name, writable=False)
            self._export = True
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        mon = self.vm.mon
        if mon is None:
            return
        if self._export:
            mon.cmd("block-export-del", id="bench-ref", mode="hard")
            mon.wait_event(lambda e: e["event"] == "BLOCK_EXPORT_DELETED" and e["data"].get("id") == "bench-ref")
            self._export = False
        if self._server:
            mon.cmd("nbd-server-stop")
            self._server = False


class StorageDaemon:
    """qemu-storage-daemon serving a new qcow2 writable over NBD (the reference restore target)."""

    def __init__(self, image: Path, socket_path: Path, export: str = "t") -> None:
        self.image, self.socket, self.export = image, socket_path, export
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> StorageDaemon:
        self.socket.unlink(missing_ok=True)
        cmd = ["qemu-storage-daemon",
               "--blockdev", f"driver=file,filename={self.image},node-name=f",
               "--blockdev", "driver=qcow2,file=f,node-name=r",
               "--nbd-server", f"addr.type=unix,addr.path={self.socket}",
               "--export", f"type=nbd,id=e,node-name=r,name={self.export},writable=on"]
        self.proc = _register(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.PIPE))
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu-storage-daemon failed: {self.proc.stderr.read().decode()[-500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-storage-daemon did not create its socket")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        """SIGTERM: the daemon flushes and closes the image, then exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("qemu-storage-daemon did not exit on SIGTERM") from None
        if rc != 0 and exc[0] is None:
            raise RuntimeError(f"qemu-storage-daemon exited with status {rc}")


# -- timed children ---------------------------------------------------------------


@dataclass
class Timed:
    seconds: float
    returncodes: list[int]
    maxrss_kib: list[int]  # per process: wait4's ru_maxrss (the process and its reaped descendants)
    hwm_kib: list[int] = field(default_factory=list)  # per process: polled VmHWM of the process itself
    cpu: list[float] = field(default_factory=list)  # per process: wait4's user+system CPU seconds (with reaped descendants)
    stdout: str = ""
    stderr: str = ""
    anon_kib: list[int] = field(default_factory=list)  # per process: polled peak of RssAnon (private memory, no mapped files)
    extra: dict[str, Any] = field(default_factory=dict)  # filled in by the caller

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)


def _hwm(pid: int) -> tuple[int, int]:
    """(VmHWM, RssAnon) of pid in KiB; zeroes once it is gone."""
    found = {"VmHWM:": 0, "RssAnon:": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name = line.split(None, 1)[0]
                if name in found:
                    found[name] = int(line.split()[1])
    except OSError:
        pass
    return found["VmHWM:"], found["RssAnon:"]


def _wait_all(procs: Sequence[subprocess.Popen], t0: float) -> tuple[float, list[int], list[int], list[int], list[float], list[int]]:
    """wait4 every process (for its rusage), polling VmHWM and RssAnon meanwhile; seconds until the last exits."""
    hwm = [0] * len(procs)
    anon = [0] * len(procs)
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for i, p in enumerate(procs):
                if p.returncode is None:
                    peak, private = _hwm(p.pid)
                    hwm[i], anon[i] = max(hwm[i], peak), max(anon[i], private)
            stop.wait(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    rcs, rss, cpu = [0] * len(procs), [0] * len(procs), [0.0] * len(procs)
    end = t0
    try:
        for i, p in enumerate(procs):  # the last return is (about) when the last process exited
            _, status, usage = os.wait4(p.pid, 0)
            end = time.monotonic()
            p.returncode = rcs[i] = os.waitstatus_to_exitcode(status)
            rss[i] = usage.ru_maxrss
            cpu[i] = usage.ru_utime + usage.ru_stime
    finally:
        stop.set()
        poller.join()
    return end - t0, rcs, rss, hwm, cpu, anon


def run_timed(argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> Timed:
    """Run one command, capture its output; wall time and peak RSS."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = _register(subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                          env=env, cwd=cwd))
        seconds, rcs, rss, hwm, cpu, anon = _wait_all([proc], t0)
        out.seek(0)
        err.seek(0)
        return Timed(seconds, rcs, rss, hwm, cpu, out.read().decode(errors="replace"), err.read().decode(errors="replace"), anon)


def run_pipeline(first: Sequence[str], second: Sequence[str]) -> Timed:
    """first | second; time until both exit; stderr of both."""
    with tempfile.TemporaryFile() as err1, tempfile.TemporaryFile() as err2:
        t0 = time.monotonic()
        p1 = _register(subprocess.Popen(list(first), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err1))
        try:
            p2 = _register(subprocess.Popen(list(second), stdin=p1.stdout, stdout=subprocess.DEVNULL, stderr=err2))
        finally:
            assert p1.stdout is not None
            p1.stdout.close()
        seconds, rcs, rss, hwm, cpu, anon = _wait_all([p1, p2], t0)
        err1.seek(0)
        err2.seek(0)
        return Timed(seconds, rcs, rss, hwm, cpu, "",
                     err1.read().decode(errors="replace") + err2.read().decode(errors="replace"), anon)


def children_maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
