"""Processes for the benchmark: a paused QEMU VM (tests/harness.py's TestVM, the one the
integration tests use) on the benchmark's image, qemu-storage-daemon restore targets, and timed
child processes with their peak RSS.

Every process started here is registered with the harness, and `reap_all()` (called from the
benchmark's finally, and by the harness at exit) stops whatever is still running.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import HarnessError, TestVM, reap_all, register  # noqa: E402

__all__ = ["VM", "NbdExport", "StorageDaemon", "Timed", "reap_all", "run_pipeline", "run_timed", "children_maxrss_kib"]


class QMPFailed(RuntimeError):
    pass


class _Commands:
    """`vm.mon.cmd(...)`: QMP commands on the harness's own monitor; keyword arguments with '_'
    are sent with '-' (node_name=...)."""

    def __init__(self, vm: TestVM) -> None:
        self._vm = vm

    def cmd(self, _command: str, **args: Any) -> Any:
        try:
            return self._vm.qmp(_command, **{k.replace("_", "-"): v for k, v in args.items()})
        except HarnessError as exc:
            raise QMPFailed(str(exc)) from None


def virtual_size(image: Path) -> int:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)], capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)["virtual-size"])


class VM:
    """The harness's TestVM with one virtio-blk disk (id vda, format node vda-fmt) on an existing
    qcow2 image, keeping no model of its content; started paused (-S).

    `tool_qmp` is for nbdbackup; the benchmark uses the harness's own monitor (`mon`).
    sockdir is not used: the harness keeps its sockets in a directory of its own.
    """

    DISK = "vda"
    NODE = "vda-fmt"
    QDEV = "/machine/peripheral/vda/virtio-backend"

    def __init__(self, image: Path, rundir: Path, sockdir: Path, name: str = "vm1") -> None:
        self.image = image
        self.name = name
        self.vm = TestVM(rundir, {self.DISK: 0}, name=name, write_cache=True, images={self.DISK: image}, model=False)
        self.tool_qmp = self.vm.qmp_socket
        self.mon: _Commands | None = None

    def start(self) -> None:
        self.vm.start()
        self.mon = _Commands(self.vm)

    def cpu_seconds(self) -> float:
        """User+system CPU seconds QEMU has used so far (/proc/PID/stat), NBD server included."""
        assert self.vm.pid is not None
        fields = Path(f"/proc/{self.vm.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def write(self, offset: int, length: int, pattern: int) -> None:
        """A simulated guest write through the device, confirmed on QEMU's stdout."""
        self.vm.write(self.DISK, offset, length, pattern)

    def quit(self) -> None:
        """Clean quit (QEMU stores the persistent bitmaps); killed if that fails."""
        try:
            if self.vm.running:
                self.vm.stop()
        except HarnessError:
            pass  # cleanup() kills it
        finally:
            self.mon = None
            self.vm.cleanup()

    def __enter__(self) -> VM:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.quit()


class NbdExport:
    """A read-only NBD export of the VM's qcow2 node through the harness's monitor."""

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
            deadline = time.monotonic() + 30  # deleted once its last client is gone (BLOCK_EXPORT_DELETED)
            while any(e["id"] == "bench-ref" for e in mon.cmd("query-block-exports")):
                if time.monotonic() > deadline:
                    raise QMPFailed("the reference export was not deleted within 30 s")
                time.sleep(0.01)
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
        self.proc = register(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
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
        proc = register(subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                          env=env, cwd=cwd))
        seconds, rcs, rss, hwm, cpu, anon = _wait_all([proc], t0)
        out.seek(0)
        err.seek(0)
        return Timed(seconds, rcs, rss, hwm, cpu, out.read().decode(errors="replace"), err.read().decode(errors="replace"), anon)


def run_pipeline(first: Sequence[str], second: Sequence[str]) -> Timed:
    """first | second; time until both exit; stderr of both."""
    with tempfile.TemporaryFile() as err1, tempfile.TemporaryFile() as err2:
        t0 = time.monotonic()
        p1 = register(subprocess.Popen(list(first), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err1))
        try:
            p2 = register(subprocess.Popen(list(second), stdin=p1.stdout, stdout=subprocess.DEVNULL, stderr=err2))
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
