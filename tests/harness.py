"""A real-QEMU test harness for nbdbackup's integration tests.

A :class:`TestVM` is a ``qemu-system-x86_64`` started with ``-S`` (no guest
runs, no guest OS needed) and one disk per entry of ``disks``: virtio-blk by
default, or attached as users start QEMU by hand (``attach``: -drive
if=virtio, -drive if=ide, scsi-hd, a throttle filter; see ATTACH_STYLES).
"Guest writes" are made with HMP ``qemu-io`` through each disk's device, so
they pass through the same block layer as a guest's writes and dirty the
disk's bitmaps. The harness keeps a model of every disk's content, so tests
can compare backups and restores byte for byte with what the guest wrote.

The VM has two QMP monitors:

* ``TestVM.qmp_socket`` belongs to the tool under test. The harness never
  connects to it (a QMP socket serves one client at a time).
* a second, private monitor used by the harness (``hmp``, ``qmp``, writes).
  All use of it is serialised by one lock, so a :class:`BackgroundWriter`
  thread can write while the test thread queries QEMU.

The harness monitor is a tiny synchronous QMP client over a plain socket
(one JSON document per line), so it works from any thread and inside or
outside an asyncio event loop, whatever the tool under test does.

qemu-io's HMP reply is ``""`` even when a write fails; the outcome is printed
on QEMU's stdout (``wrote N/N bytes at offset O``). QEMU therefore runs under
``stdbuf -oL`` with stdout in a log file, and every write waits for its own
confirmation line, reading the log from the byte offset it last consumed.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

QEMU_SYSTEM = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"
STDBUF = "stdbuf"
REQUIRED_PROGRAMS = (QEMU_SYSTEM, QEMU_IMG, STDBUF)

SECTOR = 512
START_TIMEOUT = 15.0      # seconds for QEMU to accept the harness monitor
COMMAND_TIMEOUT = 30.0    # seconds for one QMP command
CONFIRM_TIMEOUT = 10.0    # seconds for qemu-io's confirmation line
STOP_TIMEOUT = 30.0       # seconds for QEMU to exit after "quit"

_DEVICE_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
# "write failed: Input/output error", "discard failed: ...", "Parsing error: ..."
_QEMU_IO_FAILURE = re.compile(r"^\S+ failed: |^Parsing error")
_PATTERN_MISMATCH = re.compile(r"^Pattern verification failed at offset (\d+), (\d+) bytes")
_VERIFY_CHUNK = 16 * 1024 * 1024


class HarnessError(RuntimeError):
    """QEMU or qemu-img did not do what the harness asked."""


class QMPError(HarnessError):
    """A QMP command returned an error."""

    def __init__(self, command: str, error: Mapping[str, Any]) -> None:
        self.command = command
        self.error_class: str = error.get("class", "")
        self.desc: str = error.get("desc", "")
        super().__init__(f"{command}: {self.error_class}: {self.desc}")


def missing_programs() -> list[str]:
    """Names of the programs the harness needs that are not on PATH."""
    return [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]


# Every process the harness (or a benchmark, scripts/bench_qemu.py) started and has
# not yet reaped: stopped at interpreter exit, so an aborted run leaves none behind.
_LIVE: set[subprocess.Popen[Any]] = set()


def register(proc: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
    """Stop proc at exit (reap_all) unless it was reaped before."""
    _LIVE.add(proc)
    return proc


@atexit.register
def reap_all(grace: float = 20.0) -> None:
    """SIGTERM every registered process still running (QEMU quits cleanly, nbdbackup cleans up),
    SIGKILL those still there after grace seconds."""
    procs = [p for p in _LIVE if p.poll() is None]
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    _LIVE.clear()


# How a disk is attached (TestVM's ``attach``): the ways users start QEMU by hand.
#   virtio-blk     -blockdev ... -device virtio-blk-pci,id=<id>      (the default)
#   scsi-hd        -blockdev ... -device scsi-hd,id=<id> on a virtio-scsi-pci controller
#   drive-virtio   -drive file=...,if=virtio,index=N: QEMU names it virtio<N>; the id must be that
#   drive-ide      -drive file=...,if=ide,bus=N,unit=0: QEMU names it ide<N>-hd0; the id must be that
#   throttled      virtio-blk-pci,id=<id> on a throttle filter node above the format node
ATTACH_STYLES = ("virtio-blk", "scsi-hd", "drive-virtio", "drive-ide", "throttled")
_DRIVE_ID = {"drive-virtio": re.compile(r"^virtio(\d+)$"), "drive-ide": re.compile(r"^ide(\d+)-hd0$")}


@dataclass(frozen=True)
class GuestDisk:
    """One disk of a :class:`TestVM`."""

    id: str      # the guest device id as QEMU reports it, e.g. "vda", "virtio0"
    path: Path   # image file
    size: int    # virtual size in bytes
    fmt: str     # image format: "qcow2" or "raw"
    attach: str = "virtio-blk"  # one of ATTACH_STYLES

    @property
    def _short(self) -> str:
        """The id, or a short stand-in where a node name built from it would pass QEMU's 31 characters."""
        return self.id if len(self.id) <= 26 else "d" + format(zlib.crc32(self.id.encode()), "08x")

    @property
    def file_node(self) -> str:
        """Node name of the protocol (file) node."""
        return f"{self._short}-file"

    @property
    def node(self) -> str:
        """Node name of the format node the device is attached to (not for -drive disks: TestVM.node)."""
        return f"{self._short}-fmt"

    @property
    def qdev(self) -> str:
        """QOM path of the device's block backend, as qemu-io -d wants it."""
        if self.attach == "scsi-hd":
            return f"/machine/peripheral/{self.id}"
        return f"/machine/peripheral/{self.id}/virtio-backend"

    @property
    def qemu_io_target(self) -> str:
        """What HMP qemu-io takes to write through the device: -d <QOM path>, or a -drive's name."""
        return self.id if self.attach.startswith("drive-") else f"-d {self.qdev}"


class Write(NamedTuple):
    """One completed harness write (a plain (disk, offset, length, pattern) tuple)."""

    disk: str
    offset: int
    length: int
    pattern: int


class _Monitor:
    """A minimal synchronous QMP client: one JSON document per line.

    Not thread-safe by itself; :class:`TestVM` holds its lock around every use.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    @classmethod
    def connect(cls, path: Path, alive: Callable[[], bool], timeout: float) -> _Monitor:
        """Connect to a QMP socket QEMU is creating, and negotiate capabilities."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(COMMAND_TIMEOUT)
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if not alive():
                    raise HarnessError("QEMU exited during startup") from None
                if time.monotonic() > deadline:
                    raise HarnessError(f"QMP socket {path} did not appear") from None
                time.sleep(0.01)
        monitor = cls(sock)
        try:
            greeting = monitor._read()
            if "QMP" not in greeting:
                raise HarnessError(f"unexpected QMP greeting: {greeting}")
            monitor.execute("qmp_capabilities")
        except BaseException:
            monitor.close()
            raise
        return monitor

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run one command; return its ``return`` value or raise :class:`QMPError`."""
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = dict(arguments)
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif reply.get("id") != msg_id:
                continue  # a late reply to an earlier command that timed out
            elif "error" in reply:
                raise QMPError(command, reply["error"])
            else:
                return reply["return"]

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("QEMU closed the harness monitor")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        self._sock.close()


class TestVM:
    """A paused QEMU VM with virtio-blk disks, driven through a private monitor.

    ``disks`` maps device ids to virtual sizes in bytes (multiples of 512).
    Images are created in ``workdir`` on the first :meth:`start`; later starts
    reuse them. The device has ``write-cache=off`` unless ``write_cache`` is
    true: every harness write is then flushed to the image when it is
    confirmed, so the model stays true even across :meth:`kill` (with a
    write cache, qcow2 keeps new L2 entries in memory and a SIGKILL loses
    writes that were never flushed).

    ``images`` gives existing image files for some disks (qcow2): used as they are, never
    created or removed; their size in ``disks`` may be 0 (unknown). ``model=False`` keeps no
    model of the content (the benchmarks' disks of gigabytes): ``expected``, ``verify`` and
    ``discard`` are then unavailable.
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(
        self,
        workdir: Path,
        disks: dict[str, int],
        *,
        name: str = "vm1",
        fmt: str = "qcow2",
        cluster_size: int = 65536,
        write_cache: bool = False,
        runas: str | None = None,
        attach: Mapping[str, str] | None = None,
        images: Mapping[str, Path] | None = None,
        model: bool = True,
    ) -> None:
        if fmt not in ("qcow2", "raw"):
            raise ValueError(f"unsupported image format {fmt!r}")
        attach = dict(attach or {})
        for disk_id, size in disks.items():
            style = attach.setdefault(disk_id, "virtio-blk")
            if style not in ATTACH_STYLES:
                raise ValueError(f"disk {disk_id}: unknown attach style {style!r}")
            if not (_DRIVE_ID[style].match(disk_id) if style in _DRIVE_ID else _DEVICE_ID.match(disk_id)):
                raise ValueError(f"bad device id {disk_id!r} for {style}")
            if size % SECTOR or size < 0 or (size == 0 and disk_id not in (images or {})):
                raise ValueError(f"disk {disk_id}: size {size} is not a positive multiple of 512")
        self.workdir = Path(workdir)
        self.name = name
        self.fmt = fmt
        self.cluster_size = cluster_size
        self.write_cache = write_cache
        self.runas = runas  # QEMU drops to this user after opening its sockets (-runas)
        self._given = dict(images or {})
        self.disks: dict[str, GuestDisk] = {
            disk_id: GuestDisk(disk_id, Path(self._given.get(disk_id, self.workdir / f"{name}-{disk_id}.{fmt}")), size, fmt,
                               attach[disk_id])
            for disk_id, size in disks.items()
        }
        self.model: dict[str, bytearray] = {d: bytearray(s) for d, s in disks.items()} if model else {}
        # Unix socket paths are limited to 107 bytes: keep them out of tmp_path.
        self._sockdir = Path(tempfile.mkdtemp(prefix="nbdb-"))
        self.qmp_socket: Path = self._sockdir / "tool.qmp"
        self._harness_socket = self._sockdir / "harness.qmp"
        self.log_path: Path = self.workdir / f"{name}.stdout.log"
        self.stderr_path: Path = self.workdir / f"{name}.stderr.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._monitor: _Monitor | None = None
        self._lock = threading.RLock()
        self._log_pos = 0
        self._images_created = False
        self._starts = 0

    # -- lifecycle ---------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the QEMU process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The QEMU process id, or None when not started."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start QEMU paused (-S); create the images on the first start."""
        if self._proc is not None:
            rc = self._proc.poll()
            if rc is None:
                raise HarnessError(f"{self.name} is already running")
            raise HarnessError(f"{self.name} exited by itself (status {rc}); kill() reaps it\n"
                               f"{self._stderr_tail()}")
        missing = missing_programs()
        if missing:
            raise HarnessError(f"required programs not found: {', '.join(missing)}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._sockdir.mkdir(exist_ok=True)
        if not self._images_created:
            for disk in self.disks.values():
                if disk.id not in self._given:
                    self._create_image(disk)
            self._images_created = True
        for sock in (self.qmp_socket, self._harness_socket):
            sock.unlink(missing_ok=True)

        self._starts += 1
        with open(self.log_path, "ab") as stdout, open(self.stderr_path, "ab") as stderr:
            for log in (stdout, stderr):
                log.write(f"### harness: start {self._starts} of {self.name}\n".encode())
                log.flush()
            self._log_pos = stdout.tell()
            proc = subprocess.Popen(
                self._command_line(), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
            )
        self._proc = proc
        register(proc)
        try:
            self._monitor = _Monitor.connect(
                self._harness_socket, lambda: proc.poll() is None, START_TIMEOUT
            )
        except BaseException as exc:
            self._reap(kill=True)
            raise HarnessError(f"{self.name} failed to start: {exc}\n{self._stderr_tail()}") from exc

    def stop(self) -> None:
        """Quit QEMU cleanly through the harness monitor and wait for it to exit.

        A clean exit stores persistent dirty bitmaps in the qcow2 images.
        Raises if QEMU does not exit in time or exits non-zero.
        """
        if self._proc is None:
            raise HarnessError(f"{self.name} is not started")
        with self._lock:
            if self._monitor is not None:
                try:
                    self._monitor.execute("quit")
                except (ConnectionError, OSError):
                    pass  # QEMU may close the socket before it replies
        try:
            self._proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._reap(kill=True)
            raise HarnessError(f"{self.name} did not exit within {STOP_TIMEOUT}s of quit") from None
        rc = self._reap(kill=False)
        if rc != 0:
            raise HarnessError(f"{self.name} exited with status {rc}\n{self._stderr_tail()}")

    def kill(self) -> None:
        """SIGKILL QEMU (a host crash, as far as QEMU knows) and wait for it.

        Persistent bitmaps are not saved. Confirmed writes survive only with
        the default ``write_cache=False``; otherwise the model may be wrong.
        """
        if self._proc is not None:
            self._reap(kill=True)

    def restart(self) -> None:
        """:meth:`stop` then :meth:`start`."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Kill QEMU if it runs and remove the socket directory."""
        self.kill()
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def __enter__(self) -> TestVM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- monitor -----------------------------------------------------------

    def qmp(self, cmd: str, **args: Any) -> Any:
        """Run a QMP command on the harness monitor and return its ``return`` value.

        Arguments whose names contain "-" go in as ``**{"node-name": ...}``.
        """
        with self._lock:
            if self._monitor is None or not self.running:
                raise HarnessError(f"{self.name} is not running")
            return self._monitor.execute(cmd, args)

    def hmp(self, command_line: str) -> str:
        """Run an HMP command through the harness monitor; return its text reply."""
        reply: str = self.qmp("human-monitor-command", **{"command-line": command_line})
        return reply

    @property
    def events(self) -> list[dict[str, Any]]:
        """QMP events seen so far on the harness monitor (while running commands)."""
        return list(self._monitor.events) if self._monitor is not None else []

    def block_state(self) -> dict[str, Any]:
        """Block-layer state for leftover checks after a tool run.

        ``{"exports": [...], "jobs": [...], "nodes": [node names],
        "bitmaps": {node name: [bitmap dicts]}}`` (every node, maybe ``[]``).
        """
        with self._lock:
            nodes = self.qmp("query-named-block-nodes", flat=True)
            return {
                "exports": self.qmp("query-block-exports"),
                "jobs": self.qmp("query-block-jobs"),
                "nodes": [n["node-name"] for n in nodes],
                "bitmaps": {n["node-name"]: n.get("dirty-bitmaps", []) for n in nodes},
            }

    def bitmaps(self, disk: str) -> list[dict[str, Any]]:
        """The dirty bitmaps of a disk's format node."""
        bitmaps: list[dict[str, Any]] = self.block_state()["bitmaps"][self.node(disk)]
        return bitmaps

    def node(self, disk: str) -> str:
        """The node name of a disk's format node; QEMU picks it (#block123) for a -drive disk."""
        d = self.disks[disk]
        if not d.attach.startswith("drive-"):
            return d.node
        for blk in self.qmp("query-block"):
            if blk["device"] == d.id:
                node: str = blk["inserted"]["node-name"]
                return node
        raise HarnessError(f"QEMU shows no drive {d.id}")

    # -- guest I/O ---------------------------------------------------------

    def write(self, disk: str, offset: int, length: int, pattern: int) -> None:
        """Write ``length`` bytes of ``pattern`` at ``offset``, like the guest would.

        Waits for qemu-io's "wrote" line; raises :class:`HarnessError` if the
        write fails (e.g. beyond the end of the disk) or is not confirmed.
        """
        if not 0 <= pattern <= 0xFF:
            raise ValueError(f"pattern {pattern} is not a byte")
        self._check_request(disk, offset, length)
        with self._lock:
            self._qemu_io(disk, f"write -P 0x{pattern:02x} {offset} {length}",
                          f"wrote {length}/{length} bytes at offset {offset}")
            if disk in self.model:
                self.model[disk][offset:offset + length] = bytes([pattern]) * length

    def write_zeroes(self, disk: str, offset: int, length: int) -> None:
        """Write zeroes (``write -z``); reads back as zeroes, the model gets zeroes."""
        self._check_request(disk, offset, length)
        with self._lock:
            self._qemu_io(disk, f"write -z {offset} {length}",
                          f"wrote {length}/{length} bytes at offset {offset}")
            if disk in self.model:
                self.model[disk][offset:offset + length] = bytes(length)

    def discard(self, disk: str, offset: int, length: int) -> bool:
        """Discard (TRIM) a range, like the guest would; return True if it took effect.

        What reads back as zeroes afterwards depends on the image, so the
        model changes only where QEMU is known to drop the data:

        * qcow2: only the whole clusters inside the range (plus the last,
          partial cluster of a disk whose size is not a cluster multiple,
          when the range covers it up to the end). Partial clusters at
          either end are ignored by qcow2 and keep their data. A range
          with no whole cluster changes nothing (returns False).
        * raw: the whole range (punched hole).

        The harness then reads those clusters back through the device: if
        they are not zero (while a backup job's copy-before-write filter sits
        on a disk, QEMU 7.2 ignores discards) it checks that they still hold
        the old data, leaves the model as it was and returns False. Anything
        else (half applied) raises :class:`HarnessError`.
        """
        self._check_request(disk, offset, length)
        with self._lock:
            self._qemu_io(disk, f"discard {offset} {length}",
                          f"discard {length}/{length} bytes at offset {offset}")
            start, end = self._discarded_range(self.disks[disk], offset, length)
            if start >= end:
                return False
            if self._live_matches(disk, start, end - start, 0):
                self._model(disk)[start:end] = bytes(end - start)
                return True
            try:
                self.verify(disk, start, end - start)
            except AssertionError as exc:
                raise HarnessError(f"discard {disk} {offset}+{length} was half applied: {exc}") from exc
            return False

    def expected(self, disk: str) -> bytes:
        """A snapshot of the model of ``disk``: what the guest wrote."""
        with self._lock:
            return bytes(self._model(disk))

    def verify(self, disk: str, offset: int = 0, length: int | None = None) -> None:
        """Check QEMU's live view of a range (read through the device) against the model.

        Uses qemu-io ``read -P`` per run of equal bytes, so it needs a model
        made of pattern writes (it always is). Raises AssertionError with the
        first mismatching offset.
        """
        if length is None:
            length = self.disks[disk].size - offset
        with self._lock:
            for run_offset, run_length, value in _runs(self._model(disk), offset, offset + length):
                if not self._live_matches(disk, run_offset, run_length, value):
                    raise AssertionError(
                        f"{disk}: live data in {run_offset}+{run_length} is not 0x{value:02x} as modelled"
                    )

    # -- internals ---------------------------------------------------------

    def _model(self, disk: str) -> bytearray:
        if disk not in self.model:
            raise HarnessError(f"{self.name} keeps no model of {disk}'s content (model=False)")
        return self.model[disk]

    def _command_line(self) -> list[str]:
        cmd = [
            STDBUF, "-oL", QEMU_SYSTEM,
            "-name", self.name,
            "-machine", "q35,accel=tcg", "-nodefaults", "-S", "-display", "none",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            "-qmp", f"unix:{self._harness_socket},server=on,wait=off",
        ]
        if self.runas:
            cmd += ["-runas", self.runas]
        write_cache = "on" if self.write_cache else "off"
        if any(d.attach == "scsi-hd" for d in self.disks.values()):
            cmd += ["-device", "virtio-scsi-pci,id=scsi0"]
        if any(d.attach == "throttled" for d in self.disks.values()):
            cmd += ["-object", "throttle-group,id=tg0,x-iops-total=100000"]
        for disk in self.disks.values():
            drive = _DRIVE_ID.get(disk.attach)
            if drive:  # a -drive as users write it: QEMU picks the device and its id
                interface, number = disk.attach.removeprefix("drive-"), drive.match(disk.id).group(1)  # type: ignore[union-attr]
                where = f"index={number}" if interface == "virtio" else f"bus={number},unit=0"
                cache = "writeback" if self.write_cache else "writethrough"
                cmd += ["-drive", f"file={disk.path},format={disk.fmt},if={interface},{where},discard=unmap,cache={cache}"]
                continue
            file_node = {"driver": "file", "filename": str(disk.path),
                         "node-name": disk.file_node, "discard": "unmap"}
            fmt_node = {"driver": disk.fmt, "file": disk.file_node,
                        "node-name": disk.node, "discard": "unmap"}
            cmd += ["-blockdev", json.dumps(file_node), "-blockdev", json.dumps(fmt_node)]
            top = disk.node
            if disk.attach == "throttled":  # the bitmaps stay on the format node below the filter
                top = f"{disk._short}-thr"
                cmd += ["-blockdev", json.dumps({"driver": "throttle", "throttle-group": "tg0", "file": disk.node, "node-name": top})]
            cmd += ["-device", f"{'scsi-hd' if disk.attach == 'scsi-hd' else 'virtio-blk-pci'},drive={top},"
                               f"id={disk.id},write-cache={write_cache}"]
        return cmd

    def _create_image(self, disk: GuestDisk) -> None:
        cmd = [QEMU_IMG, "create", "-q", "-f", disk.fmt]
        if disk.fmt == "qcow2":
            cmd += ["-o", f"cluster_size={self.cluster_size}"]
        cmd += [str(disk.path), str(disk.size)]
        _run(cmd)
        if self.runas:  # the images belong to the user QEMU runs as
            import pwd

            user = pwd.getpwnam(self.runas)
            for path in (self.workdir, disk.path):
                os.chown(path, user.pw_uid, user.pw_gid)

    def _reap(self, *, kill: bool) -> int:
        """Wait for (optionally after SIGKILL) the QEMU process; forget it."""
        proc = self._proc
        assert proc is not None
        if kill and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        rc = proc.wait()
        _LIVE.discard(proc)
        with self._lock:  # a writer thread still in a command sees EOF and lets go
            if self._monitor is not None:
                self._monitor.close()
                self._monitor = None
            self._proc = None
        return rc

    def _check_request(self, disk: str, offset: int, length: int) -> None:
        if disk not in self.disks:
            raise KeyError(f"no disk {disk!r} in {self.name}")
        if offset < 0 or length <= 0 or offset % SECTOR or length % SECTOR:
            raise ValueError(f"offset {offset} and length {length} must be multiples of 512, length > 0")
        # The end of the disk is left to QEMU to check: a write past it fails there.

    def _discarded_range(self, disk: GuestDisk, offset: int, length: int) -> tuple[int, int]:
        """The part of a discard that reads back as zeroes afterwards (see :meth:`discard`)."""
        end = min(offset + length, disk.size)
        if disk.fmt == "raw":
            return offset, end
        cs = self.cluster_size
        start = -(-offset // cs) * cs
        last_partial = disk.size - disk.size % cs
        if end == disk.size and disk.size % cs and offset <= last_partial:
            return start, end
        return start, end // cs * cs

    def _live_matches(self, disk: str, offset: int, length: int, value: int) -> bool:
        """True if the device reads ``length`` bytes of ``value`` at ``offset``."""
        for pos in range(offset, offset + length, _VERIFY_CHUNK):
            n = min(_VERIFY_CHUNK, offset + length - pos)
            seen = self._qemu_io(disk, f"read -P 0x{value:02x} {pos} {n}",
                                 f"read {n}/{n} bytes at offset {pos}")
            if any(_PATTERN_MISMATCH.match(line) for line in seen):
                return False
        return True

    def _qemu_io(self, disk: str, command: str, confirmation: str) -> list[str]:
        """Run one qemu-io command on a disk's device and wait for its stdout line.

        Returns the stdout lines printed between the command and its
        confirmation (e.g. "Pattern verification failed ...").
        """
        target = self.disks[disk].qemu_io_target
        with self._lock:
            reply = self.hmp(f'qemu-io {target} "{command}"')
            if reply.strip():
                raise HarnessError(f"qemu-io {disk} {command!r}: {reply.strip()}")
            return self._await_line(confirmation, f"qemu-io {disk} {command!r}")

    def _await_line(self, wanted: str, what: str) -> list[str]:
        """Consume QEMU's stdout log up to the line ``wanted``; raise on a failure line."""
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        seen: list[str] = []
        delay = 0.0005
        while True:
            for line in self._new_log_lines():
                if line == wanted:
                    return seen
                if _QEMU_IO_FAILURE.match(line):
                    raise HarnessError(f"{what}: {line}")
                seen.append(line)
            if not self.running:
                raise HarnessError(f"{what}: QEMU exited\n{self._stderr_tail()}")
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{what}: no {wanted!r} on QEMU's stdout within {CONFIRM_TIMEOUT}s\n"
                    f"{self._stderr_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _new_log_lines(self) -> Iterator[str]:
        """Complete stdout lines after the consumed offset, consuming each as it is yielded."""
        base = self._log_pos
        with open(self.log_path, "rb") as log:
            log.seek(base)
            data = log.read()
        pos = 0
        while (nl := data.find(b"\n", pos)) >= 0:
            line = data[pos:nl].decode(errors="replace").rstrip("\r")
            pos = nl + 1
            self._log_pos = base + pos  # consumed, even if the caller stops here
            yield line

    def _stderr_tail(self, lines: int = 20) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "QEMU stderr:\n" + "\n".join(text.splitlines()[-lines:])


def apply_ops(vm: TestVM, step: Sequence[tuple[str, str, int, int, int]]) -> None:
    """Guest writes as (disk, op, offset, length, pattern): op "w" writes the pattern, "z" writes
    zeroes, "d" discards (which must succeed)."""
    for disk, op, offset, length, pattern in step:
        if op == "w":
            vm.write(disk, offset, length, pattern)
        elif op == "z":
            vm.write_zeroes(disk, offset, length)
        elif not vm.discard(disk, offset, length):
            raise HarnessError(f"discard of {disk} {offset}+{length} had no effect")


def _runs(buf: bytearray, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """Split ``buf[start:end]`` into (offset, length, byte) runs of equal bytes.

    Works sector by sector (every model change is sector-aligned) with a
    64 KiB fast path, so a large, mostly uniform disk is quick.
    """
    big = 65536
    pos = start
    while pos < end:
        value = buf[pos]
        run_end = pos
        fill_big = bytes([value]) * big
        while run_end + big <= end and buf[run_end:run_end + big] == fill_big:
            run_end += big
        fill = bytes([value]) * SECTOR
        while run_end < end:
            n = min(SECTOR, end - run_end)
            if buf[run_end:run_end + n] != fill[:n]:
                break
            run_end += n
        if run_end == pos:
            raise HarnessError(f"model of sector at {pos} is not uniform")
        yield pos, run_end - pos, value
        pos = run_end


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True)
    if result.returncode != 0:
        raise HarnessError(f"{' '.join(cmd)} failed ({result.returncode}): "
                           f"{result.stderr.decode(errors='replace').strip()}")
    return result


def image_bytes(path: Path, fmt: str | None = None, *, force_share: bool = False) -> bytes:
    """The full guest-visible content of an image (``qemu-img convert -O raw``).

    ``fmt`` None lets qemu-img probe. ``force_share`` (-U) reads an image a
    running QEMU holds open (the result may then be inconsistent).
    """
    with tempfile.TemporaryDirectory(prefix="nbdb-img-") as tmp:
        out = Path(tmp) / "image.raw"
        cmd = [QEMU_IMG, "convert", "-O", "raw"]
        if fmt is not None:
            cmd += ["-f", fmt]
        if force_share:
            cmd.append("-U")
        _run(cmd + [str(path), str(out)])
        return out.read_bytes()


def first_difference(actual: bytes, expected: bytes) -> int | None:
    """Offset of the first byte where the two differ (or the shorter length), else None."""
    n = min(len(actual), len(expected))
    step = 65536
    for pos in range(0, n, step):
        stop = min(pos + step, n)
        a, e = actual[pos:stop], expected[pos:stop]
        if a != e:
            return pos + next(i for i in range(len(a)) if a[i] != e[i])
    return None if len(actual) == len(expected) else n


def assert_image_equals(path: Path, expected: bytes, fmt: str | None = None) -> None:
    """Assert an image's content is exactly ``expected``; name the first differing offset."""
    actual = image_bytes(path, fmt)
    diff = first_difference(actual, expected)
    if diff is None:
        return
    if len(actual) != len(expected) and diff == min(len(actual), len(expected)):
        raise AssertionError(f"{path}: size {len(actual)} != expected {len(expected)}")
    end = diff
    while end < min(len(actual), len(expected)) and actual[end] != expected[end]:
        end += 1
    raise AssertionError(
        f"{path}: first difference at offset {diff} (0x{diff:x}, in 64 KiB cluster {diff // 65536}): "
        f"expected 0x{expected[diff]:02x}, got 0x{actual[diff]:02x}; "
        f"{end - diff} differing bytes from there"
    )


def is_prefix(
    writes: Sequence[tuple[str, int, int, int]],
    images: Mapping[str, bytes],
    baseline: Mapping[str, bytes] | None = None,
) -> int:
    """How many of an ordered list of writes a set of (restored) images holds.

    ``writes`` are (disk, offset, length, pattern) in completion order, on
    distinct, non-overlapping regions; ``images`` maps disk ids to content.
    A write is present if its region holds only its pattern. With
    ``baseline`` (content before any of the writes), a region that is not
    present must equal the baseline: a torn write fails the check.

    Returns k such that exactly ``writes[:k]`` are present; raises
    AssertionError if the present writes are not a prefix of the order.
    """
    present: list[bool] = []
    for i, (disk, offset, length, pattern) in enumerate(writes):
        region = images[disk][offset:offset + length]
        if region == bytes([pattern]) * length:
            present.append(True)
            continue
        if baseline is not None and region != baseline[disk][offset:offset + length]:
            raise AssertionError(
                f"write {i} {(disk, offset, length, pattern)} is torn: its region is neither "
                f"its pattern nor the baseline"
            )
        present.append(False)
    k = present.index(False) if False in present else len(present)
    if any(present[k:]):
        later = [i for i in range(k, len(present)) if present[i]]
        raise AssertionError(
            f"present writes are not a prefix: write {k} {tuple(writes[k])} is missing "
            f"but later writes {later[:10]} are present"
        )
    return k


class BackgroundWriter:
    """A thread that keeps writing to several disks in a known order until stopped.

    Write i goes to ``disks[i % len(disks)]`` (round-robin over the disks
    that still have room), into that disk's next ``length``-byte slot of
    ``[start, end)``: regions never overlap. Patterns cycle through 1..255,
    skipping a value that already fills the slot, so every write is visible.
    ``writes`` lists completed (confirmed) writes in completion order, and
    ``baseline`` the content of every disk when the writer started, for
    :func:`is_prefix`. The thread stops by itself when every slot is used
    or after ``max_writes``; a write error stops it and is re-raised by
    :meth:`stop`. ``interval`` pauses between writes (outside the harness
    lock) so other monitor users are not starved.
    """

    def __init__(
        self,
        vm: TestVM,
        disks: Sequence[str] | None = None,
        *,
        length: int = 65536,
        start: int = 0,
        end: int | None = None,
        interval: float = 0.002,
        max_writes: int | None = None,
    ) -> None:
        self.vm = vm
        self.disks = list(disks) if disks is not None else list(vm.disks)
        self.length = length
        self.start_offset = start
        self.end_offset = end
        self.interval = interval
        self.max_writes = max_writes
        self.baseline: dict[str, bytes] = {}
        self.error: BaseException | None = None
        self._writes: list[Write] = []
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def writes(self) -> list[Write]:
        """Completed writes so far, in order."""
        with self._cond:
            return list(self._writes)

    def plan(self) -> Iterator[Write]:
        """The writes this writer makes, in order (needs ``baseline``)."""
        slots = {d: self._slots(d) for d in self.disks}
        patterns = itertools.cycle(range(1, 256))
        while slots:
            for disk in list(slots):
                offset = next(slots[disk], None)
                if offset is None:
                    del slots[disk]
                    continue
                old = self.baseline[disk][offset:offset + self.length]
                pattern = next(patterns)
                if old == bytes([pattern]) * self.length:
                    pattern = next(patterns)
                yield Write(disk, offset, self.length, pattern)

    def _slots(self, disk: str) -> Iterator[int]:
        size = self.vm.disks[disk].size
        end = size if self.end_offset is None else min(self.end_offset, size)
        return iter(range(self.start_offset, end - self.length + 1, self.length))

    def start(self) -> BackgroundWriter:
        """Snapshot the baseline and start the thread."""
        if self._thread is not None:
            raise HarnessError("BackgroundWriter already started")
        self.baseline = {d: self.vm.expected(d) for d in self.disks}
        self._thread = threading.Thread(target=self._run, name="BackgroundWriter", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for count, write in enumerate(self.plan()):
                if self._stopping.is_set() or (self.max_writes is not None and count >= self.max_writes):
                    break
                self.vm.write(*write)
                with self._cond:
                    self._writes.append(write)
                    self._cond.notify_all()
                if self.interval:
                    self._stopping.wait(self.interval)
        except BaseException as exc:  # reported by stop() / wait_for()
            self.error = exc
        finally:
            with self._cond:
                self._cond.notify_all()

    @property
    def alive(self) -> bool:
        """True while the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        """Block until at least ``count`` writes completed."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: len(self._writes) >= count or self.error is not None or not self.alive,
                timeout,
            )
            if self.error is not None:
                raise HarnessError(f"BackgroundWriter failed: {self.error}") from self.error
            if not ok or len(self._writes) < count:
                raise HarnessError(f"BackgroundWriter made {len(self._writes)} of {count} writes")

    def stop(self, timeout: float = 30.0) -> list[Write]:
        """Stop after the write in progress; return the completed writes; re-raise a write error."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise HarnessError("BackgroundWriter did not stop")
        if self.error is not None:
            raise HarnessError(f"BackgroundWriter failed: {self.error}") from self.error
        return self.writes

    def __enter__(self) -> BackgroundWriter:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.stop()
        else:
            try:
                self.stop()
            except HarnessError:
                pass  # the test's own exception is the one to see
