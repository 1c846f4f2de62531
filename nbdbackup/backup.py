"""Backup orchestration: full and incremental, from plan to committed manifest.

    1. look:    the VM's qcow2 disks; clear what an interrupted run left behind;
                reconcile checkpoint records with QEMU's bitmaps
    2. plan:    full, or incremental since K after checking the whole chain
    3. record:  the new checkpoint, pending
    4. freeze:  one transaction (checkpoint + export bitmaps + fleecing), export
    5. capture: read what the plan says, store chunks, write complete indexes
    6. commit:  sync, manifest; confirm the checkpoint; a full drops the old chain
    Any failure after 4 rolls the checkpoint back: QEMU's bitmaps end as before.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from . import chain
from .capture import CancelToken, Tuning, capture
from .checkpoints import Checkpoints, create_actions
from .errors import ChainBroken, ChainError, Interrupted, NbdBackupError, RepositoryDamaged, UsageError, VMUnreachable
from .names import BlockNames, block_namespace, check_name, new_checkpoint_name, utc_now
from .nbdio import BASE_ALLOCATION, NbdEndpoint, dirty_bitmap_context, dirty_extents
from .pointintime import PointInTime, ScratchFiles, clear_leftovers
from .qmp import QMPSession
from .records import CheckpointRecord, Disk, DiskBackup, Extent, IndexEntry, Manifest
from .repository import Repository
from .repository.index import overlay
from .vm import qcow2_disks

log = logging.getLogger(__name__)

Mode = Literal["full", "incremental", "auto"]


@dataclass(frozen=True)
class BackupRequest:
    vm: str
    mode: Mode
    checkpoint: str | None = None
    since: str | None = None  # incremental: None means the newest checkpoint
    disks: tuple[str, ...] = ()  # only these disks (default: every qcow2 disk)
    exclude: tuple[str, ...] = ()  # never these disks
    tuning: Tuning = Tuning()
    force_new_chain: bool = False  # full: take over a QEMU whose checkpoints belong to another VM name


@dataclass(frozen=True)
class DiskPlan:
    disk: Disk
    merges: tuple[str, ...] | None  # bitmaps holding its changes; None: read it all
    base_entries: tuple[IndexEntry, ...] = ()
    base_size: int = 0
    reason: str = ""


@dataclass(frozen=True)
class BackupPlan:
    kind: Literal["full", "incremental"]
    chain_id: str
    since: CheckpointRecord | None
    disks: tuple[DiskPlan, ...]
    removed_disks: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class BackupResult:
    manifest: Manifest
    notes: tuple[str, ...] = field(default=())


def run_backup(
    repo: Repository,
    session: QMPSession,
    req: BackupRequest,
    *,
    scratch_dir: Path,
    socket_dir: Path,
    cancel: CancelToken = CancelToken(),
    progress: Callable[[int], None] = lambda n: None,
    on_start: Callable[[int], None] = lambda total: None,
    quiesce: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    owner: tuple[int, int] | None = None,
) -> BackupResult:
    started = time.monotonic()
    vm = check_name("VM", req.vm)
    disks = qcow2_disks(session, req.disks, req.exclude)
    with ScratchFiles(scratch_dir, disks, owner) as scratch_files:  # created while the next steps ask QEMU
        return _run_backup(repo, session, req, vm, disks, started, scratch_files, scratch_dir=scratch_dir, socket_dir=socket_dir,
                           cancel=cancel, progress=progress, on_start=on_start, quiesce=quiesce, owner=owner)


def _run_backup(
    repo: Repository,
    session: QMPSession,
    req: BackupRequest,
    vm: str,
    disks: list[Disk],
    started: float,
    scratch_files: ScratchFiles,
    *,
    scratch_dir: Path,
    socket_dir: Path,
    cancel: CancelToken,
    progress: Callable[[int], None],
    on_start: Callable[[int], None],
    quiesce: Callable[[], AbstractContextManager],
    owner: tuple[int, int] | None,
) -> BackupResult:
    # 1. look
    clear_leftovers(session, BlockNames(block_namespace(repo.id)))
    for stale in repo.incomplete_backups(vm):
        log.warning("removing backup %s of %s: it never completed", stale, vm)
        repo.delete_backup(vm, stale)
    if req.force_new_chain and req.mode != "full":
        raise UsageError("--force-new-chain starts a new chain: it goes with a full backup only")
    checkpoints = Checkpoints(repo, session, vm, disks, force_new_chain=req.force_new_chain)
    checkpoints.reconcile()
    records = checkpoints.records()

    name = check_name("checkpoint", req.checkpoint) if req.checkpoint else new_checkpoint_name()
    if name == "latest" or any(r.name == name for r in records) or repo.manifest(vm, name) is not None:
        raise UsageError(f"checkpoint {name!r} already exists for VM {vm}", hint="choose another --checkpoint name")
    cancel.check()

    # 2. plan
    plan = make_plan(repo, checkpoints, req, disks, records)
    previous = records[-1] if records else None

    # 3. record
    record = checkpoints.new_record(name, utc_now(), plan.chain_id)
    checkpoints.add_pending(record)

    pit = PointInTime(
        session,
        disks,
        checkpoint_actions=create_actions(disks, record, previous, checkpoints.bitmaps(), checkpoints.twin),
        merges={p.disk.id: p.merges for p in plan.disks if p.merges is not None},
        scratch_dir=scratch_dir,
        socket_dir=socket_dir,
        names=BlockNames(block_namespace(repo.id)),
        owner=owner,
        quiesce=quiesce,
        scratch_files=scratch_files,
    )
    try:
        # 4. freeze and export
        with pit:
            checkpoints.record_final_counts()  # the previous bitmap stopped recording in the freeze
            cancel.check()
            disk_results = []
            regions = {p.disk.id: _regions(p, pit) for p in plan.disks}
            on_start(sum(r.length for rs in regions.values() for r in rs))
            # 5. capture
            for p in plan.disks:
                connect = functools.partial(NbdEndpoint, pit.socket, pit.export_name(p.disk))
                t0 = time.monotonic()
                got = capture(repo, connect, regions[p.disk.id], tuning=req.tuning, cancel=cancel, progress=progress)
                log.debug("disk %s: read %d bytes, stored %d bytes in %.2fs", p.disk.id, got.read_bytes, got.stored_bytes, time.monotonic() - t0)
                entries = overlay(p.base_entries, regions[p.disk.id], got.entries, p.disk.size)
                digest = repo.write_index(vm, name, p.disk.id, p.disk.size, entries)
                disk_results.append((p, got, entries, digest))
        cancel.check()
        # 6. commit
        manifest = Manifest(
            vm=vm,
            checkpoint=name,
            kind=plan.kind,
            since=plan.since.name if plan.since else None,
            created=record.created,
            chain=plan.chain_id,
            disks=tuple(
                DiskBackup(id=p.disk.id, size=p.disk.size, index_sha256=digest, data_bytes=sum(e.length for e in entries),
                           read_bytes=got.read_bytes, full_read=p.merges is None)
                for p, got, entries, digest in disk_results
            ),
            removed_disks=plan.removed_disks,
            stored_bytes=sum(got.stored_bytes for _, got, _, _ in disk_results),
            read_bytes=sum(got.read_bytes for _, got, _, _ in disk_results),
            duration=time.monotonic() - started,
        )
        t0 = time.monotonic()
        repo.commit(manifest)
        log.debug("committed backup %s in %.2fs", name, time.monotonic() - t0)
    except BaseException as exc:
        qemu_gone = isinstance(exc, NbdBackupError) and not isinstance(exc, Interrupted) and not session.alive()
        _abandon(checkpoints, repo, vm, name, pit.frozen)
        if qemu_gone:
            raise VMUnreachable("the VM's QEMU went away during the backup; nothing was recorded",
                                hint="start the VM again: the next run checks its bitmaps (`auto` makes a full backup if they were lost)") from exc
        raise
    checkpoints.confirm(name)
    if plan.kind == "full":
        old = [r.name for r in records if r.chain != plan.chain_id]
        if old:
            checkpoints.drop_chain(old)
    return BackupResult(manifest, plan.notes)


def _abandon(checkpoints: Checkpoints, repo: Repository, vm: str, name: str, frozen: bool) -> None:
    """Undo a failed backup: checkpoint rolled back in QEMU, record and partial backup gone."""
    if checkpoints.session.lost:
        # QEMU is gone: a bitmap it had not saved is gone too; one it saved is rolled
        # back by the next run's reconciliation, which finds this record pending.
        repo.delete_backup(vm, name)
        return
    try:
        if frozen:
            checkpoints.rollback(name)
        else:
            repo.save_checkpoints(vm, [r for r in checkpoints.records() if r.name != name])
        repo.delete_backup(vm, name)
    except Exception as exc:  # never hide the original error; the next run reconciles
        log.warning("could not roll back checkpoint %s (the next run will): %s", name, exc)


def make_plan(repo: Repository, checkpoints: Checkpoints, req: BackupRequest, disks: list[Disk], records: list[CheckpointRecord]) -> BackupPlan:
    if req.mode == "full":
        return _full_plan(disks)
    try:
        return _incremental_plan(repo, checkpoints, req, disks, records)
    except (ChainError, RepositoryDamaged) as exc:
        if req.mode != "auto":
            raise
        if not records and not repo.backup_names(req.vm):
            return _full_plan(disks)  # the VM's first backup: nothing to fall back from, nothing to warn about
        note = f"full backup instead of an incremental one: {exc.message}"  # not exc: its hint says to run a full
        return _full_plan(disks, notes=(note,))


def _full_plan(disks: list[Disk], notes: tuple[str, ...] = ()) -> BackupPlan:
    return BackupPlan(kind="full", chain_id=uuid.uuid4().hex, since=None,
                      disks=tuple(DiskPlan(d, None, reason="full backup") for d in disks), notes=notes)


def _incremental_plan(repo: Repository, checkpoints: Checkpoints, req: BackupRequest, disks: list[Disk], records: list[CheckpointRecord]) -> BackupPlan:
    since = chain.resolve(records, req.since or "latest")
    bitmaps = checkpoints.bitmaps()
    chain.check_since(records, since, bitmaps)
    checkpoints.verify_active(records[-1])
    base = repo.manifest(req.vm, since.name)
    if base is None:
        raise ChainBroken(f"the repository holds no complete backup at checkpoint {since.name}", hint="run `nbdbackup full`")
    if base.chain != since.chain:
        raise ChainBroken(f"the backup at {since.name} belongs to another chain", hint="run `nbdbackup full`")
    merges = tuple(r.bitmap for r in chain.since_chain(records, since.name))
    plans = []
    for d in disks:
        at_base = base.disk(d.id)
        if at_base is None or d.id not in since.disks:
            plans.append(DiskPlan(d, None, reason="disk added since the base checkpoint"))
            continue
        _, entries = repo.read_index(base, d.id)
        if d.size < at_base.size:
            plans.append(DiskPlan(d, None, reason=f"disk shrank from {at_base.size} to {d.size} bytes"))
            continue
        plans.append(DiskPlan(d, merges, tuple(entries), at_base.size,
                              reason="changed since " + since.name + (f"; grew from {at_base.size} bytes" if d.size > at_base.size else "")))
    removed = tuple(sorted({d.id for d in base.disks} - {d.id for d in disks}))
    return BackupPlan(kind="incremental", chain_id=since.chain, since=since, disks=tuple(plans), removed_disks=removed)


def _regions(p: DiskPlan, pit: PointInTime) -> list[Extent]:
    """What to read from disk p: all of it, or what its export bitmap marks (plus any grown area)."""
    size = p.disk.size
    bitmap = pit.export_bitmap(p.disk)  # None when p.merges is None: exported without a bitmap
    if bitmap is None:
        return [Extent(0, size)] if size else []
    with NbdEndpoint(pit.socket, pit.export_name(p.disk), contexts=(BASE_ALLOCATION, dirty_bitmap_context(bitmap))) as ep:
        dirty = [Extent(e.offset, min(e.end, p.base_size) - e.offset) for e in dirty_extents(ep, bitmap, size) if e.offset < p.base_size]
    if size > p.base_size:
        dirty.append(Extent(p.base_size, size - p.base_size))
    return dirty
