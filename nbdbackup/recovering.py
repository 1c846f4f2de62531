"""recover: run a lost VM from a backup point at once, and copy its disks home meanwhile.

    1. DIR/<disk>.qcow2: new, empty qcow2 images whose backing file is the backup,
       served read-only by nbdkit on DIR/.nbdbackup-recover.sock (QEMU's NBD
       client, with a reconnect delay so a restarted server is picked up again).
    2. The administrator starts the VM on these images (with rerror=stop,werror=stop
       on the devices: reads the server cannot answer pause the VM, never fail in
       the guest); the guest writes into the local images from the first second.
    3. nbdbackup connects to the VM's QMP socket and runs `block-stream` on each
       image: every block not yet local is copied in, and QEMU then drops the
       backing file.  The VM runs on DIR alone; nbdbackup stops the server.

Interrupted (Ctrl-C, a crash, a dead server), the images stay usable and a
second `recover` with the same --output resumes: block-stream copies only what
is not local yet.  A state file in DIR remembers which backup the images need.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .capture import CancelToken
from .errors import Interrupted, NbdBackupError, QEMUCommandFailed, RestoreTargetError, ServeAddressError, UsageError, VMUnreachable, VMUnsuitable
from .qmp import QMPSession
from .serving import SOCKET_MAX, Listen, Source, backup_server, check_socket_path, resolve

log = logging.getLogger(__name__)

STATE = ".nbdbackup-recover.json"
SOCKET = ".nbdbackup-recover.sock"
RECONNECT_DELAY = 5  # seconds QEMU holds requests while the server is away, before failing them (-> rerror=stop)
POLL = 0.5
SERVER_GONE = 10.0  # seconds to wait for the server of a killed run to exit


@dataclass(frozen=True)
class RecoverRequest:
    vm: str
    checkpoint: str
    output: Path
    qmp: Path
    disks: tuple[str, ...] = ()
    speed: int = 0  # bytes/s per disk, 0: unlimited


@dataclass(frozen=True)
class RecoverImage:
    disk: str
    path: Path
    size: int


@dataclass(frozen=True)
class RecoverResult:
    checkpoint: str
    images: tuple[RecoverImage, ...]
    resumed: bool


def backing_spec(socket: Path, disk: str) -> str:
    """The backing file name written into each image: QEMU's NBD client, with reconnection."""
    nbd = {"driver": "nbd", "server": {"type": "unix", "path": str(socket)}, "export": disk, "reconnect-delay": RECONNECT_DELAY}
    return "json:" + json.dumps({"driver": "raw", "file": nbd})


def _read_state(out: Path) -> dict | None:
    try:
        return json.loads((out / STATE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RestoreTargetError(f"{out / STATE} is unreadable: {exc}") from None


def _write_state(out: Path, state: dict) -> None:
    tmp = out / (STATE + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, out / STATE)


def prepare(repo, req: RecoverRequest) -> tuple[str, list[RecoverImage], bool]:
    """Decide: a new recovery (images to create) or the resumption of the one in DIR."""
    out = req.output.absolute()
    socket = out / SOCKET
    if len(os.fsencode(socket)) > SOCKET_MAX:
        raise UsageError(f"--output {out} is too long a path for the server's socket", hint="choose a shorter directory")
    state = _read_state(out) if out.is_dir() else None
    if state is not None:
        if state["vm"] != req.vm or (req.checkpoint not in ("latest", state["checkpoint"])):
            raise RestoreTargetError(f"{out} holds a recovery of {state['vm']} from backup {state['checkpoint']}",
                                     hint="resume it with the same VM and --to, or choose another --output")
        m, chosen = resolve(repo, req.vm, state["checkpoint"], tuple(state["disks"]))
        return m.checkpoint, [RecoverImage(d.id, out / f"{d.id}.qcow2", d.size) for d in chosen], True
    m, chosen = resolve(repo, req.vm, req.checkpoint, req.disks)
    images = [RecoverImage(d.id, out / f"{d.id}.qcow2", d.size) for d in chosen]
    for img in images:
        if img.path.exists() or img.path.is_symlink():
            raise RestoreTargetError(f"{img.path} exists", hint="choose another --output")
    return m.checkpoint, images, False


def create_images(out: Path, vm: str, checkpoint: str, images: list[RecoverImage]) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RestoreTargetError(f"cannot create output directory {out}: {exc.strerror}") from None
    created: list[Path] = []
    try:
        for img in images:
            proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-u", "-F", "raw",
                                   "-b", backing_spec(out / SOCKET, img.disk), str(img.path), str(img.size)],
                                  capture_output=True, text=True, start_new_session=True)
            if proc.returncode != 0:
                raise RestoreTargetError(f"cannot create {img.path}: {proc.stderr.strip()}")
            created.append(img.path)
        _write_state(out, {"vm": vm, "checkpoint": checkpoint, "disks": [i.disk for i in images]})
    except BaseException:
        for p in created:
            p.unlink(missing_ok=True)
        raise


def connect_when_up(qmp: Path, cancel: CancelToken, on_wait: Callable[[], None]) -> QMPSession:
    """The VM's QMP session, waiting (until cancelled) for the administrator to start the VM."""
    told = False
    while True:
        cancel.check()
        session = QMPSession(qmp, connect_timeout=5)
        try:
            session.connect()
            return session
        except VMUnreachable:
            session.close()
            if not told:
                on_wait()
                told = True
            time.sleep(1)


def _nodes_by_file(session: QMPSession) -> dict[str, dict]:
    """Format nodes by the image file they open."""
    found = {}
    for node in session.execute("query-named-block-nodes", {"flat": True}):
        if node.get("drv") == "qcow2":
            found[os.path.realpath(node["file"])] = node
    return found


def stream(session: QMPSession, images: list[RecoverImage], speed: int, cancel: CancelToken,
           on_start: Callable[[int], None], progress: Callable[[int], None], paused_by_us: bool = False,
           on_paused: Callable[[], None] = lambda: None) -> None:
    """block-stream every image that still has its backing file; wait until all are local."""
    deadline = time.monotonic() + 60
    while True:  # the VM may still be opening its disks
        nodes = _nodes_by_file(session)
        missing = [img for img in images if os.path.realpath(img.path) not in nodes]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise VMUnsuitable(f"the VM does not use {missing[0].path}",
                               hint="start it with these images (see `nbdbackup recover --help` and the README)")
        cancel.check()
        time.sleep(POLL)
    jobs = {j["id"]: j for j in session.execute("query-jobs")}
    running = {}
    for img in images:
        node = nodes[os.path.realpath(img.path)]
        job_id = f"nbdbackup-recover-{img.disk}"
        job = jobs.get(job_id)
        if job is not None and job["status"] == "concluded":  # an earlier run's job ended (failed): start over
            session.execute("job-dismiss", {"id": job_id})
            job = None
        if job is not None:
            if job["status"] == "paused":
                session.execute("job-resume", {"id": job_id})
        elif node.get("backing_file_depth", 0) == 0 and not node.get("image", {}).get("backing-filename"):
            continue  # already local
        else:
            args = {"job-id": job_id, "device": node["node-name"], "auto-dismiss": False}
            if speed:
                args["speed"] = speed
            session.execute("block-stream", args)
        running[job_id] = img
    status = session.execute("query-status").get("status")
    if status == "io-error" or (status == "paused" and paused_by_us):
        session.execute("cont")  # paused by rerror/werror=stop while the server was away, or by our Ctrl-C: it is back
    on_start(sum(i.size for i in running.values()))
    try:
        _wait_for_jobs(session, running, cancel, progress)
    except Interrupted:
        if _pause(session, running):
            on_paused()
        raise


def _pause(session: QMPSession, running: dict) -> bool:
    """Stopping on request: pause the VM and the copies before the server goes, so that no guest
    read reaches a vanishing server (QEMU 7.2's NBD client was seen to complete a read issued
    just after its server died without data: see serving.Process)."""
    stopped = False
    try:
        if session.execute("query-status").get("running"):
            session.execute("stop")
            stopped = True
        for job_id in running:
            with contextlib.suppress(QEMUCommandFailed):
                session.execute("job-pause", {"id": job_id})
    except NbdBackupError as exc:
        log.warning("could not pause the VM before stopping the server: %s", exc)
    return stopped


def _wait_for_jobs(session: QMPSession, running: dict, cancel: CancelToken, progress: Callable[[int], None]) -> None:
    done = shown = 0
    while running:
        cancel.check()
        now = 0
        for j in session.execute("query-jobs"):
            if j["id"] not in running:
                continue
            if j["status"] == "concluded":
                img = running.pop(j["id"])
                session.execute("job-dismiss", {"id": j["id"]})
                if "error" in j:
                    raise NbdBackupError(f"copying disk {img.disk} failed: {j['error']}",
                                         hint="run the same `nbdbackup recover` again to resume")
                done += img.size
            else:
                now += j.get("current-progress", 0) * (running[j["id"]].size / max(j.get("total-progress", 1), 1))
        progress(max(0, int(done + now) - shown))
        shown = max(shown, int(done + now))
        time.sleep(POLL)
    if session.execute("query-status").get("status") == "io-error":
        session.execute("cont")


def run_recover(repo, source_for: Callable[[str, tuple[str, ...]], Source], req: RecoverRequest, workdir: Path, cancel: CancelToken,
                *, on_images: Callable[[RecoverResult], None], on_wait: Callable[[], None],
                on_start: Callable[[int], None], progress: Callable[[int], None]) -> RecoverResult:
    out = req.output.absolute()
    checkpoint, images, resumed = prepare(repo, req)
    socket = out / SOCKET
    if out.is_dir():
        deadline = time.monotonic() + SERVER_GONE
        while True:  # the server of a run killed a moment ago may still be exiting
            try:
                check_socket_path(socket)
                break
            except ServeAddressError:
                if time.monotonic() > deadline:
                    raise ServeAddressError(f"another nbdbackup recover serves {out}", hint="wait for it or stop it") from None
                time.sleep(0.2)
    if not resumed:
        create_images(out, req.vm, checkpoint, images)
    result = RecoverResult(checkpoint, tuple(images), resumed)
    with backup_server(source_for(checkpoint, tuple(i.disk for i in images)), Listen(path=socket), workdir) as server:
        on_images(result)
        session = connect_when_up(req.qmp, cancel, on_wait)
        state = _read_state(out) or {}
        try:
            stream(session, images, req.speed, cancel, on_start, _Progress(progress, server),
                   paused_by_us=state.get("paused", False), on_paused=lambda: _write_state(out, {**state, "paused": True}))
        finally:
            session.close()
    socket.unlink(missing_ok=True)
    (out / STATE).unlink(missing_ok=True)
    return result


class _Progress:
    """Progress callback that also notices a dead server."""

    def __init__(self, report: Callable[[int], None], server) -> None:
        self.report = report
        self.server = server

    def __call__(self, n: int) -> None:
        if not self.server.alive():
            self.server.failed()
        if n:
            self.report(n)
