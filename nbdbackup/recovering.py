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

Guest reads while the server is away must fail (and pause the VM), never return
made-up data.  QEMU 7.2's copy-on-read filter, which block-stream puts above
the image, ends a read early *with success* when asking the backing file for
its allocation fails (`bdrv_is_allocated_above` error -> n == 0 -> "end of the
backing file"; seen in our tests: the guest got an unfilled buffer).  So the
backing file never has to be asked: the server offers no block status
(nbdkit --no-sr; QEMU's NBD client then calls everything data without asking),
and before the VM starts, every whole cluster that the backup holds no data
for is written as a zero cluster into the new image (`qemu-io write -z`), so
neither the copy nor the guest ever reads holes over NBD.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .capture import CancelToken
from .errors import (
    Interrupted,
    NbdBackupError,
    QEMUCommandFailed,
    QEMUFailed,
    RestoreTargetError,
    ServeAddressError,
    UsageError,
    VMUnreachable,
    VMUnsuitable,
)
from .qmp import QMPSession
from .restore import find_backup
from .serving import SOCKET_MAX, Listen, Source, backup_server, check_socket_path, resolve

log = logging.getLogger(__name__)

STATE = ".nbdbackup-recover.json"
SOCKET = ".nbdbackup-recover.sock"
RECONNECT_DELAY = 5  # seconds QEMU holds requests while the server is away, before failing them (-> rerror=stop)
POLL = 0.5
CLUSTER = 65536  # of the new images
ZERO_STEP = 1 << 30  # largest qemu-io write -z
STREAM_RETRIES = 3
SERVER_GONE = 10.0  # seconds to wait for the server of a killed run to exit
PAUSE_WAIT = 5.0  # seconds a stopping run waits for its copy jobs to pause
SETTLE_TIMEOUT = 4 * RECONNECT_DELAY + 10  # for a job with a read in flight to pause or end (see _settle_jobs)


@dataclass(frozen=True)
class RecoverRequest:
    vm: str
    checkpoint: str
    output: Path
    qmp: Path | None = None  # the VM's QMP socket (None: the config file's; the engine fills it in)
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


def zero_commands(entries, size: int) -> Iterator[str]:
    """qemu-io `write -z` commands for every whole cluster no index entry touches."""
    pos = 0
    for start, stop in [*((e.offset, e.end) for e in entries), (size, size)]:
        first = -(-pos // CLUSTER) * CLUSTER
        last = size if start >= size else start // CLUSTER * CLUSTER
        while first < last:
            n = min(last - first, ZERO_STEP)
            yield f"write -z {first} {n}"
            first += n
        pos = max(pos, stop)


def zero_holes(path: Path, commands: list[str]) -> None:
    """Mark the holes as zero clusters in the new image (its backing, the server, is up)."""
    if not commands:
        return
    proc = subprocess.run(["qemu-io", "-f", "qcow2", str(path)], input="\n".join(commands) + "\nquit\n",
                          capture_output=True, text=True, start_new_session=True)
    failed = [ln for ln in proc.stdout.splitlines() if " failed: " in ln]
    if proc.returncode != 0 or failed:
        raise RestoreTargetError(f"cannot prepare {path}: {(failed or [proc.stderr.strip()])[0]}")


def create_images(out: Path, vm: str, checkpoint: str, images: list[RecoverImage],
                  prepare_image: Callable[[RecoverImage], None] = lambda img: None) -> None:
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
            prepare_image(img)
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
    finished = _settle_jobs(session, cancel)
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
        if job_id in finished:
            continue
        if job is not None:
            if job["status"] == "paused":
                session.execute("job-resume", {"id": job_id})
        elif node.get("backing_file_depth", 0) == 0 and not node.get("image", {}).get("backing-filename"):
            continue  # already local
        else:
            _start_stream(session, job_id, node["node-name"], speed)
        running[job_id] = (img, node["node-name"])
    status = session.execute("query-status").get("status")
    if status == "io-error" or (status == "paused" and paused_by_us):
        session.execute("cont")  # paused by rerror/werror=stop while the server was away, or by our Ctrl-C: it is back
    on_start(sum(img.size for img, _ in running.values()))
    try:
        _wait_for_jobs(session, running, cancel, progress, speed)
    except Interrupted:
        if _pause(session, running):
            on_paused()
        raise


def _settle_jobs(session: QMPSession, cancel: CancelToken) -> set[str]:
    """The jobs an earlier run left: each paused or dismissed (the ids of those that had finished
    without error), so that none can conclude while the nodes are queried.  QEMU 7.2 crashes
    (SIGSEGV in bdrv_refresh_filename, which query-named-block-nodes calls on every node) while a
    concluded stream job is not yet dismissed: its implicit copy-on-read node has lost its child.
    A job that had a read in flight when the earlier run's server went away pauses, or fails and
    concludes, only once that read ends (QEMU's reconnect delay): it is waited for."""
    finished: set[str] = set()
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        moving = []
        for j in session.execute("query-jobs"):
            if not j["id"].startswith("nbdbackup-recover-"):
                continue
            if j["status"] == "concluded":
                session.execute("job-dismiss", {"id": j["id"]})
                if "error" not in j:
                    finished.add(j["id"])
            elif j["status"] not in ("paused", "standby", "null"):
                moving.append(j["id"])
                with contextlib.suppress(QEMUCommandFailed):  # paused already, on its way to its pause point
                    session.execute("job-pause", {"id": j["id"]})
        if not moving:
            return finished
        if time.monotonic() > deadline:
            raise QEMUFailed(f"the copy job {moving[0]} of an earlier recover neither pauses nor ends",
                             hint="run the same `nbdbackup recover` again")
        cancel.check()
        time.sleep(POLL / 5)


def _start_stream(session: QMPSession, job_id: str, node: str, speed: int) -> None:
    args = {"job-id": job_id, "device": node, "auto-dismiss": False}
    if speed:
        args["speed"] = speed
    session.execute("block-stream", args)


def _pause(session: QMPSession, running: dict) -> bool:
    """Stopping on request: pause the VM and the copies before the server goes, so that the
    guest does not stall on (or, with rerror=stop, pause at) reads the server no longer answers.
    Returns whether we stopped the VM (the next run then continues it)."""
    stopped = False
    try:
        if session.execute("query-status").get("running"):
            session.execute("stop")
            stopped = True
        for j in session.execute("query-jobs"):
            if j["id"] not in running:
                continue
            with contextlib.suppress(QEMUCommandFailed):
                if j["status"] == "concluded":
                    session.execute("job-dismiss", {"id": j["id"]})  # see _settle_jobs
                else:
                    session.execute("job-pause", {"id": j["id"]})
        deadline = time.monotonic() + PAUSE_WAIT  # a job pauses once its read in flight is answered, while the server is up
        while time.monotonic() < deadline and any(j["id"] in running and j["status"] not in ("paused", "concluded")
                                                  for j in session.execute("query-jobs")):
            time.sleep(POLL / 5)
    except NbdBackupError as exc:
        log.warning("could not pause the VM before stopping the server: %s", exc)
    return stopped


def _wait_for_jobs(session: QMPSession, running: dict, cancel: CancelToken, progress: Callable[[int], None],
                   speed: int = 0) -> None:
    done = shown = 0
    retries: dict[str, int] = {}
    while running:
        cancel.check()
        now = 0
        for j in session.execute("query-jobs"):
            if j["id"] not in running:
                continue
            img, node = running[j["id"]]
            if j["status"] == "concluded":
                session.execute("job-dismiss", {"id": j["id"]})
                if "error" in j:
                    # e.g. a job of a killed run that failed while no server answered: what is
                    # local stays local, so a new job continues where it stopped
                    retries[j["id"]] = retries.get(j["id"], 0) + 1
                    if retries[j["id"]] > STREAM_RETRIES:
                        raise QEMUFailed(f"copying disk {img.disk} failed: {j['error']}",
                                         hint="run the same `nbdbackup recover` again to resume")
                    log.info("copying disk %s failed (%s); starting again", img.disk, j["error"])
                    _start_stream(session, j["id"], node, speed)
                    continue
                running.pop(j["id"])
                done += img.size
            else:
                now += j.get("current-progress", 0) * (img.size / max(j.get("total-progress", 1), 1))
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
    result = RecoverResult(checkpoint, tuple(images), resumed)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RestoreTargetError(f"cannot create output directory {out}: {exc.strerror}") from None
    with backup_server(source_for(checkpoint, tuple(i.disk for i in images)), Listen(path=socket), workdir,
                       block_status=False) as server:
        if not resumed:
            m = find_backup(repo, req.vm, checkpoint)
            create_images(out, req.vm, checkpoint, images,
                          lambda img: zero_holes(img.path, list(zero_commands(repo.read_index(m, img.disk)[1], img.size))))
        on_images(result)
        if req.qmp is None:  # the engine gives the config file's
            raise VMUnreachable(f"no QMP socket known for VM {req.vm!r}", hint="pass --qmp SOCKET")
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
