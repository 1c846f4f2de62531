"""A point-in-time view of every disk, exported over NBD (fleecing).

    with PointInTime(session, disks, checkpoint_actions=..., merges=..., scratch_dir=...,
                     socket_dir=..., names=BlockNames(...)) as pit:
        pit.socket, pit.export_name(disk), pit.export_bitmap(disk)

Entering: one scratch qcow2 overlay per disk (backing: the live disk), then ONE
transaction holding the checkpoint actions, a temporary export bitmap per
disk merged from the chain, and a `blockdev-backup sync=none` job per disk
(from then on the guest's old data is copied to the scratch before it is
overwritten); then an NBD server on a unix socket in a private 0700
directory, one read-only export per disk.

Leaving, on every path, in this order: exports, NBD server, jobs, overlay
nodes (their temporary bitmaps go with them), scratch files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from .errors import NbdBackupError, QEMUCommandFailed, QEMUFailed, VMUnsuitable
from .names import EXPORT_BITMAP, GRANULARITY, BlockNames, nbd_export_name
from .qmp import QMPSession
from .records import Disk
from .vm import BlockNodes, bitmap_add, bitmap_merge, block_nodes

log = logging.getLogger(__name__)


class PointInTime:
    def __init__(
        self,
        session: QMPSession,
        disks: Sequence[Disk],
        *,
        checkpoint_actions: list[tuple[str, dict]],
        merges: Mapping[str, Sequence[str]],
        scratch_dir: Path,
        socket_dir: Path,
        names: BlockNames,
        owner: tuple[int, int] | None = None,
        quiesce: Callable[[], AbstractContextManager] = contextlib.nullcontext,
        scratch_files: ScratchFiles | None = None,
    ) -> None:
        """merges: disk id -> bitmap names (on that disk's node) to merge into its export bitmap;
        disks absent from merges are exported without a bitmap (read in full).
        scratch_files: the overlays' files already being created (else created here, one by one)."""
        self.session = session
        self.disks = list(disks)
        self.checkpoint_actions = checkpoint_actions
        self.merges = merges
        self.scratch_dir = scratch_dir
        self.socket = socket_dir / "nbd.sock"
        self.names = names
        self.owner = owner  # (uid, gid) QEMU runs as, when it is not us: it must open the scratch files
        self.quiesce = quiesce  # e.g. a guest filesystem freeze around the transaction
        self.scratch_files = scratch_files
        self.frozen = False  # True once the transaction (and so the checkpoint) took effect
        self._stack = contextlib.ExitStack()

    def export_name(self, disk: Disk) -> str:
        return nbd_export_name(disk.id)

    def export_bitmap(self, disk: Disk) -> str | None:
        return EXPORT_BITMAP if disk.id in self.merges else None

    def __enter__(self) -> PointInTime:
        try:
            self._build()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _build(self) -> None:
        qmp = self.session
        for d in self.disks:
            if self.scratch_files is not None:
                scratch = self.scratch_files.path(d)
            else:
                scratch = scratch_path(self.scratch_dir, d)
                _create_scratch(scratch, d.size, self.owner)
            self._stack.callback(_unlink, scratch)
            qmp.execute(
                "blockdev-add",
                {"driver": "qcow2", "node-name": self.names.fleece(d.id), "backing": d.node, "discard": "unmap",
                 "file": {"driver": "file", "filename": str(scratch)}},
            )
            self._stack.callback(self._quietly, "blockdev-del", {"node-name": self.names.fleece(d.id)})

        actions = list(self.checkpoint_actions)
        for d in self.disks:
            if d.id in self.merges:
                actions.append(bitmap_add(self.names.fleece(d.id), EXPORT_BITMAP, persistent=False, disabled=True))
                actions.append(bitmap_merge(self.names.fleece(d.id), EXPORT_BITMAP, [(d.node, b) for b in self.merges[d.id]]))
            actions.append(("blockdev-backup", {"job-id": self.names.job(d.id), "device": d.node, "target": self.names.fleece(d.id), "sync": "none"}))
        with self.quiesce():
            qmp.transaction(actions)
            self.frozen = True
        for d in self.disks:
            self._stack.callback(self._cancel_job, self.names.job(d.id))

        start_nbd_server(qmp, self.socket)
        self._stack.callback(self._quietly, "nbd-server-stop", {})
        for d in self.disks:
            args = {"type": "nbd", "id": self.names.export(d.id), "node-name": self.names.fleece(d.id), "name": self.export_name(d), "writable": False}
            if d.id in self.merges:
                args["bitmaps"] = [EXPORT_BITMAP]
            qmp.execute("block-export-add", args)
            self._stack.callback(self._delete_export, self.names.export(d.id))

    # -- cleanup steps: each one must run even if an earlier one failed ---------

    def _quietly(self, command: str, args: dict) -> None:
        if self.session.lost:
            return  # QEMU is gone, and with it everything this would undo
        try:
            self.session.execute(command, args)
        except NbdBackupError as exc:
            _cleanup_failed(self.session, command, exc)

    def _cancel_job(self, job: str) -> None:
        delete_job(self.session, job)

    def _delete_export(self, export: str) -> None:
        delete_export(self.session, export)


def delete_export(session: QMPSession, export: str) -> None:
    if session.lost:
        return
    try:
        session.execute("block-export-del", {"id": export, "mode": "hard"})
        session.wait_event(lambda e: e["event"] == "BLOCK_EXPORT_DELETED" and e["data"].get("id") == export, timeout=30)
    except NbdBackupError as exc:
        _cleanup_failed(session, f"export {export}", exc)


def delete_job(session: QMPSession, job: str) -> None:
    if session.lost:
        return
    try:
        session.execute("block-job-cancel", {"device": job, "force": True})
        session.wait_event(
            lambda e: e["event"] in ("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR") and e["data"].get("device") == job,
            timeout=30,
        )
    except NbdBackupError as exc:
        _cleanup_failed(session, f"job {job}", exc)


def _cleanup_failed(session: QMPSession, what: str, exc: NbdBackupError) -> None:
    """A cleanup step failed: worth a warning, unless QEMU is gone (then the error says so once)."""
    if session.lost:
        log.debug("cleanup: %s: %s", what, exc)
    else:
        log.warning("cleanup: %s: %s", what, exc)


def start_nbd_server(session: QMPSession, socket: Path) -> None:
    args = {"addr": {"type": "unix", "data": {"path": str(socket)}}}
    try:
        session.execute("nbd-server-start", args)
    except QEMUCommandFailed as exc:
        if "already running" not in exc.description:
            raise
        if session.execute("query-block-exports"):
            raise VMUnsuitable("QEMU already runs an NBD server with exports of its own", hint="stop it (nbd-server-stop) or let it finish") from None
        log.warning("stopping an idle NBD server left by an earlier run")
        session.execute("nbd-server-stop")
        session.execute("nbd-server-start", args)


def clear_leftovers(session: QMPSession, names: BlockNames, snapshot: BlockNodes | None = None, *, dry_run: bool = False) -> list[str]:
    """Remove exports, jobs and nodes that an interrupted run (SIGKILL) of this repository left in QEMU.
    snapshot: the block nodes, if already read.  dry_run: only say what would be removed."""
    done = []
    exports = session.execute("query-block-exports")
    ours = [e["id"] for e in exports if names.owns(e["id"])]
    for export in ours:
        if not dry_run:
            delete_export(session, export)
        done.append(f"export {export}")
    if ours and len(ours) == len(exports):
        try:
            if not dry_run:
                session.execute("nbd-server-stop")
            done.append("NBD server")
        except NbdBackupError:
            pass
    for job in session.execute("query-block-jobs"):
        if names.owns(job["device"]):
            if not dry_run:
                delete_job(session, job["device"])
            done.append(f"job {job['device']}")
    for node in (snapshot or block_nodes(session)).names():
        if names.is_fleece(node):
            try:
                if not dry_run:
                    session.execute("blockdev-del", {"node-name": node})
                done.append(f"node {node}")
            except NbdBackupError as exc:
                log.warning("cleanup: node %s: %s", node, exc)
    if not dry_run:
        for line in done:
            log.warning("removed %s left by an interrupted run", line)
    return done


def scratch_path(scratch_dir: Path, disk: Disk) -> Path:
    return scratch_dir / f"{disk.id}.fleece.qcow2"


class ScratchFiles:
    """The overlays' scratch files, created by `qemu-img create` in the background from the
    start of a run, so that its start-up overlaps the QMP queries before the point in time
    (issue 11). `path(disk)` waits for one; leaving waits for (or stops) the rest. The files
    themselves go with PointInTime (or with the run's private scratch directory)."""

    def __init__(self, scratch_dir: Path, disks: Sequence[Disk], owner: tuple[int, int] | None = None) -> None:
        self.owner = owner
        self._procs: dict[str, tuple[Path, subprocess.Popen[str] | None]] = {}
        try:
            for d in disks:
                path = scratch_path(scratch_dir, d)
                _unlink(path)
                self._procs[d.id] = (path, _start_create(path, d.size))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ScratchFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def path(self, disk: Disk) -> Path:
        path, proc = self._procs[disk.id]
        if proc is not None:
            _, err = proc.communicate()
            self._procs[disk.id] = (path, None)
            _created(path, proc.returncode, err, self.owner)
        return path

    def close(self) -> None:
        for _, proc in self._procs.values():
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.communicate()
        self._procs = {k: (p, None) for k, (p, _) in self._procs.items()}


def _start_create(path: Path, size: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={GRANULARITY}", str(path), str(size)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # a terminal's Ctrl-C is ours to handle
    )


def _created(path: Path, returncode: int, stderr: str, owner: tuple[int, int] | None) -> None:
    if returncode != 0:
        raise QEMUFailed(f"cannot create scratch file {path}: {stderr.strip()}", hint="check the scratch directory")
    path.chmod(0o600)
    if owner:
        os.chown(path, *owner)


def _create_scratch(path: Path, size: int, owner: tuple[int, int] | None) -> None:
    _unlink(path)
    proc = _start_create(path, size)
    _, err = proc.communicate()
    _created(path, proc.returncode, err, owner)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
