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
               (which may punch holes).  The active bitmap and its twin record the writes
               like guest writes, so the next incremental backs them up.
    5. close:  flush; the daemon quits, which stores the bitmaps in the images.

Re-running is always safe: what a stopped run wrote is recorded by the active bitmap,
so the next run's changed ranges include it and write CP's content there again.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import chain
from .capture import CancelToken, Tuning, pieces
from .checkpoints import Checkpoints
from .errors import (ChainBroken, ImageInUse, Interrupted, NbdBackupError, RestoreTargetError, RollbackIncomplete,
                     UsageError, VMUnreachable)
from .names import check_name, utc_now
from .nbdio import MAX_REQUEST, NbdEndpoint, dirty_bitmap_context, dirty_extents
from .pipeline import Pipeline
from .qmp import QMPSession
from .records import Disk, DiskBackup, Extent, IndexEntry, Manifest
from .repository import Repository
from .restore import find_backup
from .storage_daemon import StorageDaemon, TargetImage

log = logging.getLogger(__name__)

CHANGED, FULL = "changed-blocks", "full"
TEMP_BITMAP = "nbdbackup-rollback"  # non-persistent, on the daemon's node: gone when it quits
ZERO_BLOCK = 64 * 1024
CHUNK_CACHE = 4


@dataclass(frozen=True)
class RollbackRequest:
    vm: str
    checkpoint: str
    images: dict[str, Path]  # disk id -> image file
    disks: tuple[str, ...] = ()  # only these disks (default: every disk of the backup)
    full: bool = False  # rewrite whole disks instead of the changed blocks
    dry_run: bool = False


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
    """rollbacks/<vm>.json in the repository's local directory: present while a rollback writes."""

    def __init__(self, repo: Repository, vm: str) -> None:
        self.path = repo.local_dir("rollbacks") / f"{vm}.json"

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"checkpoint": "?"}

    def write(self, plan: RollbackPlan) -> None:
        tmp = self.path.with_suffix(".tmp")
        data = {"checkpoint": plan.checkpoint, "disks": [d.disk for d in plan.disks], "started": utc_now()}
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


# -- orchestration -----------------------------------------------------------------------


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
    started = time.monotonic()
    m = find_backup(repo, req.vm, req.checkpoint)
    chosen = choose_disks(m, req)
    marker = Marker(repo, req.vm)
    unfinished = marker.read()
    images = [TargetImage(d.id, path, "qcow2", d.size) for d, path in chosen]
    writing = False
    try:
        with StorageDaemon(images, socket_dir, exports=False, read_only=req.dry_run) as daemon, daemon.session() as session:
            disks = _daemon_disks(session, daemon, images)
            plan = make_plan(repo, session, daemon, req, m, disks, [path for _, path in chosen])
            if unfinished is not None:
                plan = dataclasses.replace(plan, resumed=unfinished.get("checkpoint", "?"))
            if req.dry_run:
                return RollbackResult(plan, True, seconds=time.monotonic() - started)
            cancel.check()
            marker.write(plan)
            writing = True
            written, zeroed = _execute(repo, session, daemon, m, plan, disks, tuning, cancel, progress, on_start)
        # the daemon quit cleanly: data flushed, bitmaps stored in the images
        marker.clear()
        return RollbackResult(plan, False, written, zeroed, time.monotonic() - started)
    except Interrupted as exc:
        state = (f"the disks are partly rolled back to {m.checkpoint}: run the same command again to complete the rollback"
                 if writing else "nothing was written")
        exc.message = f"interrupted by {signal.Signals(exc.signum).name}; {state}"
        raise
    except NbdBackupError as exc:
        if not writing:
            raise
        raise RollbackIncomplete(f"the rollback to {m.checkpoint} stopped partway ({exc}); the disks are partly rolled back",
                                 hint="fix the cause and run the same command again: it completes the rollback") from exc


def choose_disks(m: Manifest, req: RollbackRequest) -> list[tuple[DiskBackup, Path]]:
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


def _daemon_disks(session: QMPSession, daemon: StorageDaemon, images: Sequence[TargetImage]) -> list[Disk]:
    nodes = {n["node-name"]: n for n in session.execute("query-named-block-nodes", {"flat": True})}
    disks = []
    for i, img in enumerate(images):
        node = nodes[daemon.node(i)]
        disks.append(Disk(id=img.export, node=node["node-name"], size=int(node["image"]["virtual-size"]),
                          format=node.get("drv", "qcow2"), filename=str(img.path)))
    return disks


def make_plan(repo: Repository, session: QMPSession, daemon: StorageDaemon, req: RollbackRequest, m: Manifest,
              disks: list[Disk], paths: list[Path]) -> RollbackPlan:
    """Validate every disk, then find what to write on each.  Changes nothing on the images."""
    at = {d.id: d for d in m.disks}
    if req.full:
        return RollbackPlan(req.vm, m.checkpoint, tuple(
            DiskRollback(d.id, p, FULL, (Extent(0, at[d.id].size),) if at[d.id].size else (), d.size, at[d.id].size,
                         "--full: the whole disk" + (f"; resized from {d.size} back to {at[d.id].size} bytes" if d.size != at[d.id].size else ""))
            for d, p in zip(disks, paths)))
    merges = validate(repo, session, req.vm, m, disks)
    plans = []
    for d, p in zip(disks, paths):
        _export(session, d, merges, writable=not req.dry_run)
        with NbdEndpoint(daemon.socket, d.id, contexts=(dirty_bitmap_context(TEMP_BITMAP),)) as ep:
            regions = tuple(dirty_extents(ep, TEMP_BITMAP, d.size))
        plans.append(DiskRollback(d.id, p, CHANGED, regions, d.size, d.size, f"changed since {m.checkpoint}"))
    return RollbackPlan(req.vm, m.checkpoint, tuple(plans))


def validate(repo: Repository, session: QMPSession, vm: str, m: Manifest, disks: list[Disk]) -> tuple[str, ...]:
    """The bitmaps that together hold every change since m's checkpoint, after the same checks
    as an incremental since it; ChainBroken (exit 4, pointing at --full) otherwise."""
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
        size = m.disk(d.id).size
        if d.size != size:
            raise ChainBroken(f"disk {d.id} was resized since checkpoint {m.checkpoint} (from {size} to {d.size} bytes)", hint=hint)
    checkpoints = Checkpoints(repo, session, vm, disks)
    try:
        chain.check_since(records, record, checkpoints.bitmaps())
        checkpoints.verify_active(records[-1])
    except ChainBroken as exc:
        raise ChainBroken(exc.message, hint=hint) from None
    return tuple(r.bitmap for r in chain.since_chain(records, record.name))


def _export(session: QMPSession, disk: Disk, merges: Sequence[str] = (), *, writable: bool) -> None:
    """An NBD export of the disk's node named after the disk; with merges, also the temporary
    bitmap holding their union (disabled: it does not record the rollback's own writes)."""
    args: dict = {"type": "nbd", "id": f"rollback-{disk.id}", "node-name": disk.node, "name": disk.id, "writable": writable}
    if merges:
        session.transaction([
            ("block-dirty-bitmap-add", {"node": disk.node, "name": TEMP_BITMAP, "persistent": False, "disabled": True,
                                        "granularity": chain.GRANULARITY}),
            ("block-dirty-bitmap-merge", {"node": disk.node, "target": TEMP_BITMAP, "bitmaps": list(merges)}),
        ])
        args["bitmaps"] = [TEMP_BITMAP]
    session.execute("block-export-add", args)


def _execute(repo: Repository, session: QMPSession, daemon: StorageDaemon, m: Manifest, plan: RollbackPlan, disks: list[Disk],
             tuning: Tuning, cancel: CancelToken, progress: Callable[[int], None],
             on_start: Callable[[int], None]) -> tuple[dict[str, int], dict[str, int]]:
    by_id = {d.id: d for d in disks}
    for p in plan.disks:
        if p.mode == FULL:
            if p.size_now != p.size_at:
                session.execute("block_resize", {"node-name": by_id[p.disk].node, "size": p.size_at})
            _export(session, by_id[p.disk], writable=True)
    entries = {p.disk: repo.read_index(m, p.disk)[1] for p in plan.disks}
    on_start(sum(p.bytes for p in plan.disks))
    written, zeroed = {}, {}
    for p in plan.disks:
        t0 = time.monotonic()
        written[p.disk], zeroed[p.disk] = write_disk(repo, m, p, entries[p.disk], daemon.socket, tuning, cancel, progress)
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


def runs(offset: int, data: memoryview) -> Iterator[tuple[int, int, bool]]:
    """(start, stop, all zero) disk ranges of data, in ZERO_BLOCK-aligned steps, at most MAX_REQUEST each."""
    end = offset + len(data)
    zero = bytes(ZERO_BLOCK)
    run: list = []  # [start, is_zero]
    pos = offset
    while pos < end:
        stop = min(end, (pos // ZERO_BLOCK + 1) * ZERO_BLOCK)
        is_zero = data[pos - offset:stop - offset] == zero[:stop - pos]
        if run and (run[1] != is_zero or pos - run[0] >= MAX_REQUEST):
            yield run[0], pos, run[1]
            run = []
        if not run:
            run = [pos, is_zero]
        pos = stop
    if run:
        yield run[0], end, run[1]


def write_disk(repo: Repository, m: Manifest, p: DiskRollback, entries: list[IndexEntry], socket: Path, tuning: Tuning,
               cancel: CancelToken, progress: Callable[[int], None]) -> tuple[int, int]:
    """Write p's regions from the backup's index; (data bytes written, bytes zeroed)."""
    starts = [e.offset for e in entries]
    totals = [0, 0]

    def chunk(cid: bytes, offset: int) -> bytes:
        cache: OrderedDict[bytes, bytes] = pipe.local().__dict__.setdefault("chunks", OrderedDict())
        if cid in cache:
            cache.move_to_end(cid)
            return cache[cid]
        data = repo.get_chunk(cid, f"backup {m.checkpoint}, disk {p.disk}, offset {offset}")
        cache[cid] = data
        if len(cache) > CHUNK_CACHE:
            cache.popitem(last=False)
        return data

    def work(piece: Extent) -> tuple[int, int]:
        if cancel.signum is not None:
            return 0, 0
        ep = pipe.endpoint()
        written = zeroed = 0
        for sub, e in sources(piece, entries, starts):
            if e is None:
                ep.zero(sub.length, sub.offset)
                zeroed += sub.length
                continue
            begin = e.chunk_offset + sub.offset - e.offset
            data = memoryview(chunk(e.chunk, e.offset))[begin:begin + sub.length]
            if len(data) != sub.length:
                from .errors import RepositoryDamaged

                raise RepositoryDamaged(f"chunk {e.chunk.hex()} is shorter than its index says (backup {m.checkpoint}, disk {p.disk}, offset {e.offset})")
            for start, stop, is_zero in runs(sub.offset, data):
                if is_zero:
                    ep.zero(stop - start, start)
                    zeroed += stop - start
                else:
                    ep.pwrite(data[start - sub.offset:stop - sub.offset], start)
                    written += stop - start
        return written, zeroed

    def done(result: tuple[int, int], _: object) -> None:
        totals[0] += result[0]
        totals[1] += result[1]
        progress(result[0] + result[1])

    connect = functools.partial(NbdEndpoint, socket, p.disk, writable=True)
    with Pipeline(tuning.workers, tuning.depth, connect, done, "rollback") as pipe:
        for piece in pieces(p.regions, tuning.chunk_size):
            cancel.check()
            pipe.submit(work, piece, None)
        pipe.drain()
        cancel.check()
        pipe.endpoint().flush()
    return totals[0], totals[1]


# -- entry point: the resources a rollback needs ----------------------------------------------


def rollback(settings, vmconf, req: RollbackRequest, *, cancel: CancelToken, observer=None, pause: bool = False,
             reset: bool = True, tuning: Tuning = Tuning()) -> RollbackResult:
    """Under the VM's lock (no backup of it meanwhile): refuse a running QEMU, then roll back."""
    from .engine import Observer, open_repository, repository_lock, vm_lock
    from .workdirs import private_dir

    observer = observer or Observer()
    check_name("VM", req.vm)
    repo = open_repository(settings)
    with vm_lock(repo, req.vm), repository_lock(repo):
        with _running_qemu(vmconf) as qemu:
            if qemu is not None:
                refuse_running(qemu, req.vm, pause=pause)
        with private_dir() as sockets:
            return run_rollback(repo, req, socket_dir=sockets, tuning=tuning, cancel=cancel,
                                progress=observer.progress, on_start=observer.on_start)


@contextlib.contextmanager
def _running_qemu(vmconf) -> Iterator[QMPSession | None]:
    """A session with the VM's QEMU if it answers on its QMP socket; None if it does not (shut down)."""
    if vmconf.qmp is None:
        yield None
        return
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


def refuse_running(qemu: QMPSession, vm: str, *, pause: bool) -> None:
    """A running QEMU: refused (see docs/CHAIN.md, "Rolling back a running VM")."""
    status = qemu.execute("query-status").get("status", "?")
    if status == "running" and not pause:
        raise ImageInUse(f"VM {vm} is running: its disks cannot be rolled back under a running guest",
                         hint="shut the VM down first (--pause would pause it, but see the next error)")
    raise ImageInUse(f"VM {vm}'s QEMU is {'running' if status == 'running' else status}: QEMU 7.2 gives no safe way to write into "
                     "a disk its device has attached, paused or not (docs/CHAIN.md)",
                     hint="shut the VM down (its QEMU must exit), then run the rollback again")
