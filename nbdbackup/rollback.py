"""Rollback: put a VM's own disks back to their content at a checkpoint, in place.

    1. find:   the backup at CP, the images (config `images` or --image), the chosen disks
    2. open:   the images in qemu-storage-daemon, which loads their persistent bitmaps
               (a QEMU that still has them open holds their locks: refused, exit 16)
    3. plan:   every disk is validated before anything is written: the chain from CP to
               the active bitmap as for an incremental (plus the twin check) and the disk's
               size at CP.  The changed ranges are CP's bitmap merged with every later one
               into a temporary bitmap, read over NBD (qemu:dirty-bitmap:).  --full: the
               whole disk.  Nothing changes on the images (--dry-run stops here).
    4. write:  those ranges from the backup at CP: data as data, zeroes as zero writes
               (which may punch holes); each chunk needed is read once, its writes all in
               flight at once (in a version 3 repository only its 256 KiB pieces that hold
               the ranges are decoded and checked: a 64 KiB change costs 256 KiB, not 4 MiB).
               The active bitmap and its twin record the writes like guest writes, so the
               next incremental backs them up.  A disk without changes since CP is not touched.
    5. close:  the daemon quits: it flushes the writes and stores the bitmaps in the images.

Re-running is always safe: what a stopped run wrote is recorded by the active bitmap,
so the next run's changed ranges include it and write CP's content there again.

A paused VM whose QEMU runs is rolled back the same way on another target
(rollback_live.LiveTarget): QEMU itself, with the writes going through an overlay
that QEMU commits into each disk at the end.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import mmap
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .capture import CancelToken, Tuning
from .errors import (
    ChainBroken,
    ImageInUse,
    Interrupted,
    NbdBackupError,
    RestoreTargetError,
    RollbackIncomplete,
    UsageError,
    VMUnreachable,
)
from .names import GRANULARITY, utc_now
from .nbdio import NbdEndpoint, data_runs, dirty_bitmap_context, dirty_extents
from .pipeline import Pipeline
from .records import Bitmap, Disk, DiskBackup, Extent, IndexEntry, Manifest
from .repository import Repository
from .repository.chunks import STEP
from .restore import find_backup
from .storage_daemon import StorageDaemon, TargetImage
from .units import human_size

if TYPE_CHECKING:  # and imported where used: they load while the daemon starts (run_rollback)
    from .qmp import QMPSession

log = logging.getLogger(__name__)

CHANGED, FULL = "changed-blocks", "full"
TEMP_BITMAP = "nbdbackup-rollback"  # non-persistent, on the daemon's node: gone when it quits
ZERO_BATCH = 256  # zero ranges per job
BUFFER_STEP = 1024 * 1024  # a writer's buffers grow in steps of this


@dataclass(frozen=True)
class RollbackRequest:
    vm: str
    checkpoint: str
    images: dict[str, Path]  # disk id -> image file (the engine adds the config file's for disks not given)
    disks: tuple[str, ...] = ()  # only these disks (default: every disk of the backup)
    full: bool = False  # rewrite whole disks instead of the changed blocks
    dry_run: bool = False
    qmp: Path | None = None  # the VM's QMP socket (default: the config file's)
    pause: bool = False  # pause a running guest first
    reset: bool = True  # reset a paused guest afterwards (its cache holds the old content)
    # asked (a terminal's user) when the chain cannot tell what changed: True rewrites whole disks as --full does
    confirm_full: Callable[[str], bool] | None = None


@dataclass(frozen=True)
class DiskRollback:
    """What a rollback writes on one disk."""

    disk: str
    image: Path
    mode: str  # changed-blocks | full
    regions: tuple[Extent, ...]
    size_now: int
    size_at: int  # at the checkpoint
    reason: str = ""

    @property
    def bytes(self) -> int:
        return sum(r.length for r in self.regions)

    @property
    def changes(self) -> bool:
        """Whether the disk differs from the checkpoint (something to write, or a size to set back)."""
        return bool(self.regions) or self.size_now != self.size_at


@dataclass(frozen=True)
class RollbackPlan:
    vm: str
    checkpoint: str
    disks: tuple[DiskRollback, ...]
    resumed: str | None = None  # an interrupted rollback (to this checkpoint) found unfinished


@dataclass(frozen=True)
class RollbackResult:
    plan: RollbackPlan
    dry_run: bool
    written: dict[str, int] = field(default_factory=dict)  # data bytes written, per disk
    zeroed: dict[str, int] = field(default_factory=dict)  # bytes made zero, per disk
    seconds: float = 0.0

    def as_json(self) -> dict:
        return {
            "vm": self.plan.vm, "checkpoint": self.plan.checkpoint, "dry_run": self.dry_run,
            "completed_interrupted_rollback": self.plan.resumed,
            "disks": [{"disk": d.disk, "image": str(d.image), "mode": d.mode, "bytes": d.bytes, "reason": d.reason,
                       "written": self.written.get(d.disk, 0), "zeroed": self.zeroed.get(d.disk, 0)} for d in self.plan.disks],
            "bytes": sum(d.bytes for d in self.plan.disks),
            "seconds": round(self.seconds, 3),
        }


# -- the unfinished-rollback marker ----------------------------------------------------


class Marker:
    """rollbacks/<vm>.json in the repository's local directory: present while a rollback writes.
    In an encrypted repository the name is keyed and the content an encrypted object (no VM,
    checkpoint or disk name in the repository's files)."""

    def __init__(self, repo: Repository, vm: str) -> None:
        self.path = repo.local_dir("rollbacks") / f"{repo.local_name(vm)}.json"
        self.cipher = repo.cipher
        self.logical = f"rollbacks/{vm}.json"  # bound to its VM as associated data

    def read(self) -> dict | None:
        try:
            blob = self.path.read_bytes()
            return json.loads(self.cipher.open(self.logical, blob) if self.cipher is not None else blob)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, NbdBackupError):  # NbdBackupError: fails authentication
            return {"checkpoint": "?"}

    def write(self, plan: RollbackPlan) -> None:
        tmp = self.path.with_suffix(".tmp")
        data = json.dumps({"checkpoint": plan.checkpoint, "disks": [d.disk for d in plan.disks], "started": utc_now()}).encode()
        with open(tmp, "wb") as f:
            f.write(self.cipher.seal(self.logical, data) if self.cipher is not None else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


# -- orchestration -----------------------------------------------------------------------


class RollbackTarget(Protocol):
    """Where a rollback reads the bitmaps and writes: the disks opened by someone with QMP and NBD."""

    session: QMPSession
    socket: Path  # the NBD server's socket
    disks: list[Disk]
    writes_directly: bool  # False: nothing reaches the disks before finish()
    quiescent: bool  # True: nothing else writes to the disks, so one query sees one instant

    def bitmaps(self) -> dict[str, dict[str, Bitmap]]:
        """disk id -> bitmap name -> Bitmap, as the disks hold them before the rollback."""

    def export_changed(self, disk: Disk, merges: Sequence[str], *, writable: bool) -> str:
        """Export the disk with the temporary bitmap (the union of merges); the export's name."""

    def writable_export(self, disk: Disk, p: DiskRollback) -> str:
        """An export to write p's ranges into; its name."""

    def finish(self, cancel: CancelToken) -> None:
        """Make the writes reach the disks (durably, with the bitmaps that recorded them)."""


class ImageTarget:
    """The shut-down VM's images, opened by qemu-storage-daemon (which loads their bitmaps).
    Writes go straight into the images: every disk's export is writable from the start."""

    writes_directly = True
    quiescent = True  # nothing else can write to the images while the daemon has them open

    def __init__(self, daemon: StorageDaemon, session: QMPSession, images: Sequence[TargetImage]) -> None:
        from .vm import block_nodes

        self.daemon, self.session, self.socket = daemon, session, daemon.socket
        self._nodes = block_nodes(session)  # once: the state until we change it
        nodes = {n["node-name"]: n for n in self._nodes.nodes}
        self.disks = []
        for i, img in enumerate(images):
            node = nodes[daemon.node(i)]
            self.disks.append(Disk(id=img.export, node=node["node-name"], size=int(node["image"]["virtual-size"]),
                                   format=node.get("drv", "qcow2"), filename=str(img.path)))

    def bitmaps(self) -> dict[str, dict[str, Bitmap]]:
        from .checkpoints import disk_bitmaps

        return disk_bitmaps(self.session, self.disks, self._nodes)

    def export_changed(self, disk: Disk, merges: Sequence[str], *, writable: bool) -> str:
        _export(self.session, disk, disk.id, merges, writable=writable)
        return disk.id

    def writable_export(self, disk: Disk, p: DiskRollback) -> str:
        if p.mode == FULL:
            if p.size_now != p.size_at:
                self.session.execute("block_resize", {"node-name": disk.node, "size": p.size_at})
            _export(self.session, disk, disk.id, writable=True)
        return disk.id

    def finish(self, cancel: CancelToken) -> None:
        """The daemon quits: it flushes the writes into the images and stores the bitmaps there."""
        self.daemon.quit(self.session)


def run_rollback(
    repo: Repository,
    req: RollbackRequest,
    *,
    socket_dir: Path,
    tuning: Tuning = Tuning(),
    cancel: CancelToken = CancelToken(),
    progress: Callable[[int], None] = lambda n: None,
    on_start: Callable[[int], None] = lambda total: None,
) -> RollbackResult:
    """Roll the shut-down VM's images back to req.checkpoint (caller holds the VM's lock)."""
    m = find_backup(repo, req.vm, req.checkpoint)
    chosen = choose_disks(m, req)
    images = [TargetImage(d.id, path, "qcow2", d.size) for d, path in chosen]
    with StorageDaemon(images, socket_dir, exports=False, read_only=req.dry_run, wait=False) as daemon:
        # What the plan and the writes need loads while the daemon starts (20-30 ms, in its own process);
        # session() waits for it, then connects.
        from . import checkpoints, qmp, vm  # noqa: F401
        from .nbdio import load_bindings

        load_bindings()
        with daemon.session() as session:
            return roll_back(repo, req, m, ImageTarget(daemon, session, images), tuning=tuning, cancel=cancel, progress=progress,
                             on_start=on_start)


def roll_back(repo: Repository, req: RollbackRequest, m: Manifest, target: RollbackTarget, *, tuning: Tuning, cancel: CancelToken,
              progress: Callable[[int], None], on_start: Callable[[int], None]) -> RollbackResult:
    """Plan (validating every disk), then write: on a target that has the disks open (ImageTarget,
    or rollback_live.LiveTarget for a paused VM).  The caller closes the target afterwards."""
    started = time.monotonic()
    marker = Marker(repo, req.vm)
    unfinished = marker.read()
    writing = False
    try:
        plan = make_plan(repo, target, req, m)
        if unfinished is not None:
            plan = dataclasses.replace(plan, resumed=unfinished.get("checkpoint", "?"))
        if req.dry_run:
            return RollbackResult(plan, True, seconds=time.monotonic() - started)
        cancel.check()
        todo = [d for d in plan.disks if d.changes]  # a disk without changes since CP is left alone
        if todo:
            if target.writes_directly:
                marker.write(plan)
                writing = True
            written, zeroed = _execute(repo, target, m, todo, tuning, cancel, progress, on_start)
            if not target.writes_directly:
                marker.write(plan)
                writing = True
            target.finish(cancel)
        else:
            written, zeroed = {}, {}
        marker.clear()
        return RollbackResult(plan, False, written, zeroed, time.monotonic() - started)
    except Interrupted as exc:
        state = (f"the disks are partly rolled back to {m.checkpoint}: run the same command again to complete the rollback"
                 if writing else "nothing was written to the disks")
        exc.message = f"interrupted by {signal.Signals(exc.signum).name}; {state}"
        raise
    except NbdBackupError as exc:
        if not writing:
            raise
        raise RollbackIncomplete(f"the rollback to {m.checkpoint} stopped partway ({exc}); the disks are partly rolled back",
                                 hint="fix the cause and run the same command again: it completes the rollback") from exc


def choose_disks(m: Manifest, req: RollbackRequest) -> list[tuple[DiskBackup, Path]]:
    """The backup's disks to roll back, with their images."""
    by_id = {d.id: d for d in m.disks}
    unknown = set(req.disks) - set(by_id)
    if unknown:
        raise UsageError(f"backup {m.checkpoint} has no disk {', '.join(sorted(unknown))}", hint=f"its disks: {', '.join(by_id)}")
    wanted = [d for d in m.disks if not req.disks or d.id in req.disks]
    missing = [d.id for d in wanted if d.id not in req.images]
    if missing:
        raise UsageError(f"no image known for disk {', '.join(missing)} of VM {req.vm}",
                         hint=f'give --image {missing[0]}=PATH, add [vm.{req.vm}] images = {{{missing[0]} = "PATH"}} to the config file, '
                              "or choose disks with --disk")
    for d in wanted:
        path = req.images[d.id]
        if not path.is_file():
            raise RestoreTargetError(f"image {path} of disk {d.id} does not exist or is not a file")
    return [(d, req.images[d.id]) for d in wanted]


def make_plan(repo: Repository, target: RollbackTarget, req: RollbackRequest, m: Manifest) -> RollbackPlan:
    """Validate every disk, then find what to write on each.  Changes nothing on the disks."""
    from .checkpoints import Checkpoints

    at = {d.id: d for d in m.disks}
    disks = target.disks
    paths = [Path(d.filename) for d in disks]
    bitmaps = target.bitmaps()
    # disks holding another VM name's checkpoints are another VM's (wrong images?): refused, even with --full
    Checkpoints(repo, target.session, req.vm, disks).check_owner(bitmaps)

    def full(reason: str) -> RollbackPlan:
        return RollbackPlan(req.vm, m.checkpoint, tuple(
            DiskRollback(d.id, p, FULL, (Extent(0, at[d.id].size),) if at[d.id].size else (), d.size, at[d.id].size,
                         reason + (f"; resized from {d.size} back to {at[d.id].size} bytes" if d.size != at[d.id].size else ""))
            for d, p in zip(disks, paths, strict=True)))

    if req.full:
        return full("--full: the whole disk")
    try:
        merges = validate(repo, target.session, req.vm, m, disks, bitmaps, quiescent=target.quiescent)
    except ChainBroken as exc:
        if req.confirm_full is None or req.dry_run:
            raise
        size = human_size(sum(at[d.id].size for d in disks))
        if not req.confirm_full(f"{exc.message}: what changed since {m.checkpoint} is unknown. Rewrite the whole of "
                                f"{', '.join(d.id for d in disks)} ({size}) from the backup at {m.checkpoint} instead?"):
            raise
        return full(f"confirmed full rewrite: {exc.message}")
    plans = []
    for d, p in zip(disks, paths, strict=True):
        name = target.export_changed(d, merges, writable=not req.dry_run)
        with NbdEndpoint(target.socket, name, contexts=(dirty_bitmap_context(TEMP_BITMAP),)) as ep:
            regions = tuple(dirty_extents(ep, TEMP_BITMAP, d.size))
        plans.append(DiskRollback(d.id, p, CHANGED, regions, d.size, d.size, f"changed since {m.checkpoint}"))
    return RollbackPlan(req.vm, m.checkpoint, tuple(plans))


def validate(repo: Repository, session: QMPSession, vm: str, m: Manifest, disks: list[Disk], bitmaps: dict[str, dict[str, Bitmap]], *,
             quiescent: bool) -> tuple[str, ...]:
    """The bitmaps that together hold every change since m's checkpoint, after the same checks
    as an incremental since it; ChainBroken (exit 4, pointing at --full) otherwise.
    bitmaps: the disks' bitmaps now; quiescent: nothing else writes to the disks."""
    from . import chain
    from .checkpoints import Checkpoints

    hint = f"`--full` rewrites the whole disk from the backup at {m.checkpoint} instead"
    records = repo.checkpoints(vm)
    record = next((r for r in records if r.name == m.checkpoint), None)
    if record is None:
        raise ChainBroken(f"checkpoint {m.checkpoint} is no longer in the VM's checkpoint chain, so what changed since is unknown", hint=hint)
    if record.chain != m.chain:
        raise ChainBroken(f"the backup at {m.checkpoint} belongs to another chain", hint=hint)
    for d in disks:
        if d.id not in record.disks:
            raise ChainBroken(f"disk {d.id} has no bitmap of checkpoint {m.checkpoint}", hint=hint)
        backed = m.disk(d.id)
        if backed is None:  # the disks to roll back are chosen among the backup's: not seen
            raise ChainBroken(f"the backup at {m.checkpoint} has no disk {d.id}", hint=hint)
        size = backed.size
        if d.size != size:
            raise ChainBroken(f"disk {d.id} was resized since checkpoint {m.checkpoint} (from {size} to {d.size} bytes)", hint=hint)
    checkpoints = Checkpoints(repo, session, vm, disks)
    try:
        chain.check_since(records, record, bitmaps)
        checkpoints.verify_active(records[-1], bitmaps, quiescent=quiescent)
    except ChainBroken as exc:
        raise ChainBroken(exc.message, hint=hint) from None
    return tuple(r.bitmap for r in chain.since_chain(records, record.name))


def _export(session: QMPSession, disk: Disk, name: str, merges: Sequence[str] = (), *, writable: bool, node: str | None = None) -> None:
    """An NBD export `name` of the disk's node (or `node`); with merges, also the temporary bitmap
    holding their union, on the disk's node (disabled: it does not record the rollback's own writes)."""
    args: dict = {"type": "nbd", "id": name, "node-name": node or disk.node, "name": name, "writable": writable}
    if merges:
        session.transaction([
            ("block-dirty-bitmap-add", {"node": disk.node, "name": TEMP_BITMAP, "persistent": False, "disabled": True,
                                        "granularity": GRANULARITY}),
            ("block-dirty-bitmap-merge", {"node": disk.node, "target": TEMP_BITMAP, "bitmaps": list(merges)}),
        ])
        args["bitmaps"] = [TEMP_BITMAP]
    session.execute("block-export-add", args)


def _execute(repo: Repository, target: RollbackTarget, m: Manifest, todo: Sequence[DiskRollback], tuning: Tuning, cancel: CancelToken,
             progress: Callable[[int], None], on_start: Callable[[int], None]) -> tuple[dict[str, int], dict[str, int]]:
    by_id = {d.id: d for d in target.disks}
    exports = {p.disk: target.writable_export(by_id[p.disk], p) for p in todo}
    entries = {p.disk: repo.read_index(m, p.disk)[1] for p in todo}
    on_start(sum(p.bytes for p in todo))
    written, zeroed = {}, {}
    for p in todo:
        t0 = time.monotonic()
        written[p.disk], zeroed[p.disk] = write_disk(repo, m, p, entries[p.disk], target.socket, exports[p.disk], tuning, cancel, progress)
        log.debug("disk %s: wrote %d bytes, zeroed %d in %.2fs", p.disk, written[p.disk], zeroed[p.disk], time.monotonic() - t0)
    return written, zeroed


# -- the data path -------------------------------------------------------------------------


def sources(piece: Extent, entries: Sequence[IndexEntry], starts: Sequence[int]) -> Iterator[tuple[Extent, IndexEntry | None]]:
    """piece cut where the index changes: (range, the entry holding it) or (range, None) for zeroes."""
    i = max(0, bisect.bisect_right(starts, piece.offset) - 1)
    pos = piece.offset
    while pos < piece.end:
        while i < len(entries) and entries[i].end <= pos:
            i += 1
        if i < len(entries) and entries[i].offset <= pos:
            stop = min(entries[i].end, piece.end)
            yield Extent(pos, stop - pos), entries[i]
        else:
            stop = min(entries[i].offset if i < len(entries) else piece.end, piece.end)
            yield Extent(pos, stop - pos), None
        pos = stop



@dataclass(frozen=True)
class Job:
    """One writer's task: disk ranges copied from one chunk, or (chunk None) made zero."""

    chunk: bytes | None
    copies: tuple[tuple[int, int, int], ...]  # (disk offset, offset in the chunk, length)


def jobs(regions: Sequence[Extent], entries: Sequence[IndexEntry]) -> list[Job]:
    """The regions as jobs: each chunk they need read and decoded once (even when several
    ranges, or dedup'd entries, use it), the ranges the index has no data for in batches of zeroes."""
    starts = [e.offset for e in entries]
    by_chunk: dict[bytes, list[tuple[int, int, int]]] = {}
    zeros: list[tuple[int, int, int]] = []
    for region in regions:
        for sub, e in sources(region, entries, starts):
            if e is None:
                zeros.append((sub.offset, 0, sub.length))
            else:
                by_chunk.setdefault(e.chunk, []).append((sub.offset, e.chunk_offset + sub.offset - e.offset, sub.length))
    out = [Job(None, tuple(zeros[i:i + ZERO_BATCH])) for i in range(0, len(zeros), ZERO_BATCH)]
    return out + [Job(cid, tuple(copies)) for cid, copies in by_chunk.items()]


def chunk_spans(copies: Sequence[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """The parts of a chunk that copies (disk offset, offset in the chunk, length) need, as
    (offset in the chunk, length), sorted and merged: each byte of the chunk at most once,
    however many disk ranges hold the same data (a deduplicated chunk may serve thousands)."""
    spans: list[tuple[int, int]] = []
    for at, stop in sorted((at, at + length) for _, at, length in copies):
        if spans and at <= spans[-1][0] + spans[-1][1]:
            last_at, last_length = spans[-1]
            spans[-1] = (last_at, max(last_length, stop - last_at))
        else:
            spans.append((at, stop - at))
    return spans


def write_disk(repo: Repository, m: Manifest, p: DiskRollback, entries: list[IndexEntry], socket: Path, export: str,
               tuning: Tuning, cancel: CancelToken, progress: Callable[[int], None]) -> tuple[int, int]:
    """Write p's regions from the backup's index; (data bytes written, bytes zeroed).  Each
    writer reads one chunk at a time, keeping only the ranges it needs of it (checked: the pieces
    holding them, or the whole chunk in repositories before version 3), and then has all of their
    writes in flight at once."""
    totals = [0, 0]

    def buffer(name: str, length: int) -> memoryview:
        """This writer's buffer `name`, at least length bytes, reused: no fresh memory per chunk
        (the kernel faults in and clears every new page, about 1 µs per 4 KiB here)."""
        local = pipe.local().__dict__
        if len(local.get(name, b"")) < length:
            local[name] = mmap.mmap(-1, -(-length // BUFFER_STEP) * BUFFER_STEP)
        return memoryview(local[name])

    def work(job: Job) -> tuple[int, int]:
        if cancel.signum is not None:
            return 0, 0
        if job.chunk is None:
            pipe.endpoint().write_batch([(offset, length, None) for offset, _, length in job.copies])
            return 0, sum(length for _, _, length in job.copies)
        where = f"backup {m.checkpoint}, disk {p.disk}, offset {job.copies[0][0]}"
        spans = chunk_spans(job.copies)
        out = buffer("ranges", sum(length for _, length in spans))
        # every byte is checked before any of it is written
        repo.read_chunk_ranges(job.chunk, where, spans, out, buffer("step", STEP))
        starts = [at for at, _ in spans]
        places = list(itertools.accumulate((length for _, length in spans), initial=0))
        requests: list[tuple[int, int, memoryview | None]] = []
        written = zeroed = 0
        for offset, at, length in job.copies:
            i = bisect.bisect_right(starts, at) - 1  # the span holding this copy's bytes
            pos = places[i] + at - starts[i]
            data = out[pos:pos + length]
            for start, stop, is_zero in data_runs(offset, data):
                if is_zero:  # zeroes in the data: a hole, as a restore leaves them
                    requests.append((start, stop - start, None))
                    zeroed += stop - start
                else:
                    requests.append((start, stop - start, data[start - offset:stop - offset]))
                    written += stop - start
        pipe.endpoint().write_batch(requests)
        return written, zeroed

    def done(result: tuple[int, int], _: object) -> None:
        totals[0] += result[0]
        totals[1] += result[1]
        progress(result[0] + result[1])

    connect = functools.partial(NbdEndpoint, socket, export, writable=True)
    with Pipeline(tuning.workers, tuning.depth, connect, done, "rollback") as pipe:
        for job in jobs(p.regions, entries):
            cancel.check()
            pipe.submit(work, job, None)
        pipe.drain()
        cancel.check()
    return totals[0], totals[1]


# -- the VM's QEMU, when it runs (engine.rollback gathers the resources) ----------------------------


def rollback_live(repo: Repository, vmconf, qemu: QMPSession, req: RollbackRequest, *, cancel: CancelToken, observer,
                   pause: bool, reset: bool, tuning: Tuning) -> RollbackResult:
    """The VM's QEMU runs: only with the guest paused (--pause pauses it); afterwards the guest
    is reset (its page cache holds the old content) unless reset is False, and resumed if we paused it."""
    from .names import block_namespace
    from .rollback_live import LiveTarget
    from .vm import qcow2_disks
    from .workdirs import foreign_owner, private_dir, scratch_base

    status = qemu.execute("query-status")
    if status.get("running") and not pause:
        raise ImageInUse(f"VM {req.vm} is running: its disks cannot be rolled back under a running guest",
                         hint="shut the VM down, or pass --pause to pause it (it is reset and resumed afterwards)")
    if status.get("status") in ("inmigrate", "postmigrate", "finish-migrate", "save-vm", "restore-vm"):
        raise ImageInUse(f"VM {req.vm} is migrating or saving its state ({status['status']})", hint="wait for it to finish")
    m = find_backup(repo, req.vm, req.checkpoint)
    wanted = {d.id for d in m.disks if not req.disks or d.id in req.disks}
    unknown = set(req.disks) - {d.id for d in m.disks}
    if unknown:
        raise UsageError(f"backup {m.checkpoint} has no disk {', '.join(sorted(unknown))}", hint=f"its disks: {', '.join(d.id for d in m.disks)}")
    disks = [d for d in qcow2_disks(qemu) if d.id in wanted]
    gone = wanted - {d.id for d in disks}
    if gone:
        raise UsageError(f"the VM has no qcow2 disk {', '.join(sorted(gone))} (it is in the backup at {m.checkpoint})",
                         hint="choose disks with --disk")
    paused_here = False
    if status.get("running"):
        qemu.execute("stop")
        paused_here = True
    target = None
    done = False
    try:
        owner = foreign_owner(qemu.peer_user())
        base = scratch_base(vmconf.scratch, lambda: repo.local_dir("tmp"), owner)
        with private_dir(base, prefix=f"{repo.local_name(req.vm)}@", owner=owner) as scratch, private_dir(owner=owner) as sockets:
            target = LiveTarget(qemu, disks, block_namespace(repo.id), scratch, sockets, owner)
            with target:
                result = roll_back(repo, req, m, target, tuning=tuning, cancel=cancel, progress=observer.progress, on_start=observer.on_start)
        if not req.dry_run and reset:
            qemu.execute("system_reset")
        done = True
        return result
    finally:
        if paused_here and not qemu.lost and (done or target is None or not target.touched):
            qemu.execute("cont")  # a guest whose disks are partly rolled back stays paused


@contextlib.contextmanager
def running_qemu(vmconf) -> Iterator[QMPSession | None]:
    """A session with the VM's QEMU if it answers on its QMP socket; None if it does not (shut down)."""
    if vmconf.qmp is None:
        yield None
        return
    from .qmp import QMPSession

    try:
        session = QMPSession(vmconf.qmp)
        session.connect()
    except VMUnreachable as exc:
        log.debug("VM %s is not reachable over QMP (%s): treated as shut down", vmconf.name, exc.message)
        yield None
        return
    try:
        yield session
    finally:
        session.close()
