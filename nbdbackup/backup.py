"""Backup orchestration: full and incremental, from plan to committed manifest.

    1. look:    the VM's qcow2 disks and QEMU's bitmaps (one snapshot of the block nodes)
    2. prepare: clear what an interrupted run left behind; reconcile checkpoint records
                with QEMU's bitmaps; for an incremental, the twin check (two temporary
                bitmaps per disk, removed at once).  A dry run only lists the repairs.
    3. plan:    full, or incremental since K after checking the whole chain: what to read
                per disk, and why.  Side-effect free (it reads the repository); a dry
                run stops here.
    4. execute: record the new checkpoint, pending; freeze (one transaction: checkpoint
                + export bitmaps + fleecing), export; capture what the plan says, store
                chunks, write complete indexes; commit: sync, manifest; confirm the
                checkpoint; a full drops the old chain.
    Any failure after the freeze rolls the checkpoint back: QEMU's bitmaps end as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from .records import Bitmap, CheckpointRecord, Disk, DiskBackup, Extent, IndexEntry, Manifest
from .repository import Repository
from .repository.index import overlay
from .vm import block_nodes, qcow2_disks

log = logging.getLogger(__name__)

Mode = Literal["full", "incremental", "auto"]
TWIN_HINT = "the chain cannot be trusted: run `nbdbackup full` (or `auto`)"


@dataclass(frozen=True)
class BackupRequest:
    """A backup as asked for on the command line; the engine fills in the VM's settings."""

    vm: str
    mode: Mode
    checkpoint: str | None = None
    since: str | None = None  # incremental: None means the newest checkpoint
    force_new_chain: bool = False  # full: take over a QEMU whose checkpoints belong to another VM name
    dry_run: bool = False  # plan only: change nothing in QEMU or the repository
    qmp: Path | None = None  # the VM's QMP socket (default: the config file's)
    qga: Path | None = None  # its guest agent's socket (default: the config file's)
    fsfreeze: bool = False  # freeze the guest's filesystems around the point in time
    require_fsfreeze: bool = False  # fail if they cannot be frozen
    verify_boot: bool = False  # auto: then boot the new backup (also the config file's verify_boot)
    # From the VM's settings in the config file (engine.backup fills them in):
    disks: tuple[str, ...] = ()  # only these disks (default: every qcow2 disk)
    exclude: tuple[str, ...] = ()  # never these disks
    tuning: Tuning = Tuning()


@dataclass(frozen=True)
class DiskPlan:
    disk: Disk
    merges: tuple[str, ...] | None  # bitmaps holding its changes; None: read it all
    base_entries: tuple[IndexEntry, ...] = ()
    base_size: int = 0
    reason: str = ""  # why it is read this way, as `--dry-run` prints it
    estimate: int = 0  # bytes to read at most, when planned (the guest may write more until the freeze)


@dataclass(frozen=True)
class BackupPlan:
    vm: str
    checkpoint: str  # the new checkpoint's name
    kind: Literal["full", "incremental"]
    chain_id: str
    since: CheckpointRecord | None
    disks: tuple[DiskPlan, ...]
    removed_disks: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    repairs: tuple[str, ...] = ()  # what the run did first (a dry run: would do) after an interrupted run
    twin_checked: bool = False  # the active bitmap was compared with its twin (temporary bitmaps, removed at once)


@dataclass(frozen=True)
class BackupResult:
    manifest: Manifest | None  # None: a dry run
    notes: tuple[str, ...] = field(default=())
    plan: BackupPlan | None = None


@dataclass(frozen=True)
class Facts:
    """What a plan is made from, gathered (and repaired) before it."""

    disks: tuple[Disk, ...]
    records: tuple[CheckpointRecord, ...]
    bitmaps: dict[str, dict[str, Bitmap]]
    twin_problem: str | None = None
    twin_checked: bool = False
    repairs: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


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
    check_name("VM", req.vm)
    if req.force_new_chain and req.mode != "full":
        raise UsageError("--force-new-chain starts a new chain: it goes with a full backup only")
    snapshot = block_nodes(session)  # 1. look
    disks = qcow2_disks(session, req.disks, req.exclude, snapshot)
    with ScratchFiles(scratch_dir, disks, owner) if not req.dry_run else contextlib.nullcontext() as scratch_files:
        # created while the next steps ask QEMU
        checkpoints = Checkpoints(repo, session, req.vm, disks, force_new_chain=req.force_new_chain, snapshot=snapshot)
        facts = prepare(repo, session, checkpoints, req)  # 2.
        name = check_name("checkpoint", req.checkpoint) if req.checkpoint else new_checkpoint_name()
        if name == "latest" or any(r.name == name for r in facts.records) or repo.manifest(req.vm, name) is not None:
            raise UsageError(f"checkpoint {name!r} already exists for VM {req.vm}", hint="choose another --checkpoint name")
        cancel.check()
        plan = make_plan(repo, req, name, facts)  # 3.
        if req.dry_run:
            return BackupResult(None, plan.notes, plan)
        return execute(repo, session, checkpoints, req, plan, started, scratch_files, scratch_dir=scratch_dir,  # 4.
                       socket_dir=socket_dir, cancel=cancel, progress=progress, on_start=on_start, quiesce=quiesce, owner=owner)


def prepare(repo: Repository, session: QMPSession, checkpoints: Checkpoints, req: BackupRequest) -> Facts:
    """The named steps before a plan that may change things: leftovers of an interrupted run
    removed, incomplete backups deleted, records and bitmaps reconciled (a dry run only lists
    them); then, for an incremental whose chain checks out, the twin check."""
    left = clear_leftovers(session, BlockNames(block_namespace(repo.id)), checkpoints.snapshot, dry_run=req.dry_run)
    repairs = [f"remove the {what} left by an interrupted run" for what in left]
    if left and not req.dry_run:
        checkpoints.refresh()  # we changed QEMU: read it again
    for stale in repo.incomplete_backups(req.vm):
        repairs.append(f"remove backup {stale}: it never completed")
        if not req.dry_run:
            log.warning("removing backup %s of %s: it never completed", stale, req.vm)
            repo.delete_backup(req.vm, stale)
    pending = any(r.state == "pending" for r in checkpoints.records())
    repairs += checkpoints.reconcile(dry_run=req.dry_run)
    records = checkpoints.records()
    bitmaps = checkpoints.reconciled if checkpoints.reconciled is not None else checkpoints.bitmaps()  # a dry run's: as if repaired
    active = _twin_check_due(req, records, bitmaps)
    if active is not None and req.dry_run and pending:  # the twin takes in a rolled-back checkpoint's bits first
        return Facts(tuple(checkpoints.disks), tuple(records), bitmaps, None, False, tuple(repairs),
                     notes=("the active bitmap is compared with its twin after the repairs, by the real run",))
    problem = checkpoints.twin_check(active, bitmaps) if active is not None else None
    return Facts(tuple(checkpoints.disks), tuple(records), bitmaps, problem, active is not None, tuple(repairs))


def _twin_check_due(req: BackupRequest, records: list[CheckpointRecord], bitmaps: dict[str, dict[str, Bitmap]]) -> CheckpointRecord | None:
    """The active checkpoint, when the plan will want its twin check: an incremental whose chain
    passes every other check (otherwise the plan fails, or falls back to a full, without it)."""
    if req.mode == "full" or not records:
        return None
    try:
        chain.check_since(records, chain.resolve(records, req.since or "latest"), bitmaps)
    except ChainError:
        return None
    return records[-1]


def execute(
    repo: Repository,
    session: QMPSession,
    checkpoints: Checkpoints,
    req: BackupRequest,
    plan: BackupPlan,
    started: float,
    scratch_files: ScratchFiles | None,
    *,
    scratch_dir: Path,
    socket_dir: Path,
    cancel: CancelToken,
    progress: Callable[[int], None],
    on_start: Callable[[int], None],
    quiesce: Callable[[], AbstractContextManager],
    owner: tuple[int, int] | None,
) -> BackupResult:
    """Carry the plan out: record, freeze, capture, commit."""
    vm, name = plan.vm, plan.checkpoint
    records = checkpoints.records()
    previous = records[-1] if records else None
    disks = [p.disk for p in plan.disks]
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
        # freeze and export
        with pit:
            checkpoints.refresh()  # the freeze changed the bitmaps
            checkpoints.record_final_counts()  # the previous bitmap stopped recording in the freeze
            cancel.check()
            disk_results = []
            regions = {p.disk.id: _regions(p, pit) for p in plan.disks}
            on_start(sum(r.length for rs in regions.values() for r in rs))
            # capture
            for p in plan.disks:
                connect = functools.partial(NbdEndpoint, pit.socket, pit.export_name(p.disk))
                t0 = time.monotonic()
                got = capture(repo, connect, regions[p.disk.id], tuning=req.tuning, cancel=cancel, progress=progress)
                log.debug("disk %s: read %d bytes, stored %d bytes in %.2fs", p.disk.id, got.read_bytes, got.stored_bytes, time.monotonic() - t0)
                entries = overlay(p.base_entries, regions[p.disk.id], got.entries, p.disk.size)
                digest = repo.write_index(vm, name, p.disk.id, p.disk.size, entries)
                disk_results.append((p, got, entries, digest))
        cancel.check()
        # commit
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
    return BackupResult(manifest, plan.notes, plan)


def _abandon(checkpoints: Checkpoints, repo: Repository, vm: str, name: str, frozen: bool) -> None:
    """Undo a failed backup: checkpoint rolled back in QEMU, record and partial backup gone."""
    if checkpoints.session.lost:
        # QEMU is gone: a bitmap it had not saved is gone too; one it saved is rolled
        # back by the next run's reconciliation, which finds this record pending.
        repo.delete_backup(vm, name)
        return
    try:
        if frozen:
            checkpoints.refresh()  # the freeze changed the bitmaps
            checkpoints.rollback(name)
        else:
            checkpoints.discard_pending(name)
        repo.delete_backup(vm, name)
    except Exception as exc:  # never hide the original error; the next run reconciles
        log.warning("could not roll back checkpoint %s (the next run will): %s", name, exc)


def make_plan(repo: Repository, req: BackupRequest, name: str, facts: Facts) -> BackupPlan:
    """What to read, per disk, and why.  Side-effect free: it only reads the repository."""
    plan = _plan(repo, req, name, facts)
    return dataclasses.replace(plan, repairs=facts.repairs, twin_checked=facts.twin_checked, notes=(*plan.notes, *facts.notes))


def _plan(repo: Repository, req: BackupRequest, name: str, facts: Facts) -> BackupPlan:
    if req.mode == "full":
        return _full_plan(req.vm, name, facts.disks)
    try:
        return _incremental_plan(repo, req, name, facts)
    except (ChainError, RepositoryDamaged) as exc:
        if req.mode != "auto":
            raise
        if not facts.records and not repo.backup_names(req.vm):
            return _full_plan(req.vm, name, facts.disks)  # the VM's first backup: nothing to fall back from, nothing to warn about
        note = f"full backup instead of an incremental one: {exc.message}"  # not exc: its hint says to run a full
        return _full_plan(req.vm, name, facts.disks, notes=(note,))


def _full_plan(vm: str, name: str, disks: tuple[Disk, ...], notes: tuple[str, ...] = ()) -> BackupPlan:
    return BackupPlan(vm=vm, checkpoint=name, kind="full", chain_id=uuid.uuid4().hex, since=None,
                      disks=tuple(DiskPlan(d, None, reason="full backup", estimate=d.size) for d in disks), notes=notes)


def _incremental_plan(repo: Repository, req: BackupRequest, name: str, facts: Facts) -> BackupPlan:
    records = list(facts.records)
    since = chain.resolve(records, req.since or "latest")
    chain.check_since(records, since, facts.bitmaps)
    if facts.twin_problem:
        raise ChainBroken(facts.twin_problem, hint=TWIN_HINT)
    base = repo.manifest(req.vm, since.name)
    if base is None:
        raise ChainBroken(f"the repository holds no complete backup at checkpoint {since.name}", hint="run `nbdbackup full`")
    if base.chain != since.chain:
        raise ChainBroken(f"the backup at {since.name} belongs to another chain", hint="run `nbdbackup full`")
    merges = tuple(r.bitmap for r in chain.since_chain(records, since.name))
    plans = []
    for d in facts.disks:
        at_base = base.disk(d.id)
        if at_base is None or d.id not in since.disks:
            plans.append(DiskPlan(d, None, reason="disk added since the base checkpoint", estimate=d.size))
            continue
        _, entries = repo.read_index(base, d.id)
        if d.size < at_base.size:
            plans.append(DiskPlan(d, None, reason=f"disk shrank from {at_base.size} to {d.size} bytes", estimate=d.size))
            continue
        have = facts.bitmaps.get(d.id, {})
        dirty = sum(have[b].count for b in merges if b in have)  # at most: bitmaps may overlap
        plans.append(DiskPlan(d, merges, tuple(entries), at_base.size,
                              reason="changed since " + since.name + (f"; grew from {at_base.size} bytes" if d.size > at_base.size else ""),
                              estimate=min(dirty, at_base.size) + max(0, d.size - at_base.size)))
    removed = tuple(sorted({d.id for d in base.disks} - {d.id for d in facts.disks}))
    return BackupPlan(vm=req.vm, checkpoint=name, kind="incremental", chain_id=since.chain, since=since, disks=tuple(plans),
                      removed_disks=removed)


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
