"""Rolling back the disks of a paused VM whose QEMU runs: through an overlay, committed.

QEMU 7.2's permission system refuses a second writer on a node a device uses, paused or
not (`block-export-add writable=true` on it: "Permission conflict").  What works
(docs/CHAIN.md, "Rolling back a paused VM"):

    1. read the changed ranges: a temporary bitmap (the merge of CP..active) on the disk's
       node, exported read-only (reading is shared)
    2. a new qcow2 overlay O per disk (same size, 64 KiB clusters, no backing), added with
       blockdev-add and exported writable: nbdbackup writes CP's content of the changed
       granules into O (whole clusters, so O needs no backing to fill in)
    3. blockdev-snapshot node=<disk node> overlay=O: the device now sits on O, O's backing
       is the disk node
    4. block-commit device=O (an active commit: the base is the disk node), wait for READY,
       block-job-complete: O's clusters are written into the disk node by the job, which
       may write there; the device goes back onto the disk node; blockdev-del O
    The job's writes set bits in the disk node's recording bitmaps (the active one and its
    twin) like guest writes, so the chain stays true as after a shut-down rollback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .capture import CancelToken
from .checkpoints import disk_bitmaps
from .errors import ImageInUse, NbdBackupError, QEMUFailed
from .pointintime import delete_export, start_nbd_server
from .qmp import QMPSession
from .records import Bitmap, Disk
from .rollback import FULL, TEMP_BITMAP, DiskRollback, _export
from .storage_daemon import TargetImage, create_image

log = logging.getLogger(__name__)

COMMIT_TIMEOUT = 3600.0


def _job_event(job: str, *events: str) -> Callable[[dict], bool]:
    """A match for wait_event: one of these events, of the block job called job."""
    return lambda e: e["event"] in events and e["data"].get("device") == job


class LiveTarget:
    """The disks of a paused VM, written through overlays that are committed at the end.
    A context manager: on exit, whatever it added to QEMU is removed (overlays not yet
    committed are dropped: the disks are then unchanged)."""

    writes_directly = False
    quiescent = False  # paused, but another client (a block job) might still write

    def __init__(self, session: QMPSession, disks: Sequence[Disk], namespace: str, scratch: Path, socket_dir: Path,
                 owner: tuple[int, int] | None) -> None:
        self.session, self.disks = session, list(disks)
        self.namespace, self.scratch, self.owner = namespace, scratch, owner
        self.socket = socket_dir / "nbd.sock"
        self._exports: list[str] = []
        self._bitmaps: list[Disk] = []
        self._overlays: dict[str, tuple[str, Path]] = {}  # disk id -> (node, file), not yet committed
        self._server = False
        self.touched = False  # a commit into the disks began

    def __enter__(self) -> LiveTarget:
        start_nbd_server(self.session, self.socket)
        self._server = True
        return self

    def bitmaps(self) -> dict[str, dict[str, Bitmap]]:
        return disk_bitmaps(self.session, self.disks)

    def _name(self, what: str, disk: Disk) -> str:
        return f"{self.namespace}{what}-{self.disks.index(disk)}"  # short: node names have at most 31 characters

    def export_changed(self, disk: Disk, merges: Sequence[str], *, writable: bool) -> str:
        name = self._name("rbread", disk)
        self._bitmaps.append(disk)
        self._exports.append(name)
        _export(self.session, disk, name, merges, writable=False)
        return name

    def writable_export(self, disk: Disk, p: DiskRollback) -> str:
        if p.mode == FULL and p.size_now != p.size_at:
            raise ImageInUse(f"disk {disk.id} was resized since the checkpoint: a paused VM's disk cannot be resized back",
                             hint="shut the VM down and run the rollback with --full again")
        node, path = self._name("rbovl", disk), self.scratch / f"{disk.id}.rollback.qcow2"
        create_image(TargetImage(disk.id, path, "qcow2", disk.size))
        if self.owner:
            os.chown(path, *self.owner)
        self.session.execute("blockdev-add", {"driver": "qcow2", "node-name": node, "backing": None,
                                              "file": {"driver": "file", "filename": str(path)}, "discard": "unmap"})
        self._overlays[disk.id] = (node, path)
        name = self._name("rbwrite", disk)
        self._exports.append(name)
        _export(self.session, disk, name, writable=True, node=node)
        return name

    def finish(self, cancel: CancelToken) -> None:
        """Commit every overlay into its disk.  Not interruptible: a signal waits for the end."""
        for name in list(self._exports):
            delete_export(self.session, name)
            self._exports.remove(name)
        for d in self.disks:
            if d.id not in self._overlays:
                continue
            node, path = self._overlays[d.id]
            job = self._name("rbjob", d)
            self.touched = True
            self.session.execute("blockdev-snapshot", {"node": d.node, "overlay": node})
            self.session.execute("block-commit", {"job-id": job, "device": node})
            event = self.session.wait_event(_job_event(job, "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR"),
                                            timeout=COMMIT_TIMEOUT)
            if event["event"] != "BLOCK_JOB_READY":
                raise QEMUFailed(f"committing the rollback of disk {d.id} failed: {event['data'].get('error', event['event'])}",
                                 hint=f"the VM's device may still use the overlay {path}; see docs/CHAIN.md")
            self.session.execute("block-job-complete", {"device": job})
            event = self.session.wait_event(_job_event(job, "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR"), timeout=COMMIT_TIMEOUT)
            if event["data"].get("error"):
                raise QEMUFailed(f"committing the rollback of disk {d.id} failed: {event['data']['error']}")
            self.session.execute("blockdev-del", {"node-name": node})
            del self._overlays[d.id]
            path.unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        if self.session.lost:
            return
        for name in self._exports:
            delete_export(self.session, name)
        for d in self._bitmaps:
            self._quietly("block-dirty-bitmap-remove", {"node": d.node, "name": TEMP_BITMAP})
        if self._server:
            self._quietly("nbd-server-stop", {})
        for node, path in self._overlays.values():
            self._quietly("blockdev-del", {"node-name": node})
            path.unlink(missing_ok=True)

    def _quietly(self, command: str, args: dict) -> None:
        try:
            self.session.execute(command, args)
        except NbdBackupError as exc:
            log.warning("cleanup: %s: %s", command, exc)
