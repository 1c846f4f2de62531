"""The only orchestration API: the entry points of the CLI (and of the nbdkit plugin).

Each takes the settings and ONE request object (what the user asked; the VM's
settings in the config file are resolved here, not by the caller), gathers the
resources the command needs (repository, VM lock, QMP session, private
directories) in the right order, makes one orchestration call and returns a
typed result.  Where a run goes on after a failure (auto --all, prune --all)
the result holds every failure and the error to exit with (worst exit code);
the CLI prints the result, then raises that error.

The VM lock is taken before connecting to QMP: a VM's backup monitor serves
one client at a time, so a second run must learn of the lock, not hang on QMP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import prune as pruning
from .backup import BackupRequest, BackupResult, run_backup
from .capture import CancelToken, Tuning, default_workers
from .chain import CheckpointStatus, assess, resolve
from .checkpoints import Checkpoints
from .config import Settings, VMConfig
from .errors import Interrupted, LockHeld, NbdBackupError, SomeRunsFailed, UsageError, VMUnreachable
from .names import bitmap_namespace, check_name
from .prune import GarbageReport, PruneOutcome, PruneReport, PruneRequest, decide_for, remove_backups
from .qmp import QMPSession
from .records import Manifest
from .repository import Repository
from .retention import Policy
from .units import human_size, plural
from .vm import block_nodes, qcow2_disks
from .workdirs import foreign_owner, private_dir, remove_stale_dirs, scratch_base

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # imported where used: a backup's start-up does without them (issue 11)
    from .bootcheck import BootRequest, BootResult
    from .copy import CopyReport, CopyRequest
    from .keyring import InitResult, KeyInfo
    from .mounting import MountRequest, MountResult
    from .recovering import RecoverRequest, RecoverResult
    from .repository.keys import Unlocked
    from .restore import RestoredImage, RestoreRequest
    from .rollback import RollbackRequest, RollbackResult
    from .serving import ServeRequest
    from .verify import VerifyReport, VerifyRequest

Progress = Callable[[int], None]
Start = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class Observer:
    """How the engine reports progress; the CLI picks a bar or nothing."""

    on_start: Start = lambda total: None
    progress: Progress = lambda n: None
    on_stage: Callable[[str], None] = lambda what: None  # a new step (another VM, a boot check's restore) begins
    on_phase: Callable[[str], None] = lambda text: None  # what a boot check is doing (for --debug)


def _check_names(vm: str, disks: Sequence[str] = ()) -> None:
    """Names from the command line, checked before anything is opened."""
    check_name("VM", vm)
    for d in disks:
        check_name("disk", d)


def open_repository(settings: Settings, *, create: bool = False) -> Repository:
    """The repository; only backups create it (a typo in --repo must not make a new one)."""
    return Repository.open(settings.repo, create=create, s3=settings.s3_for(settings.repo), encryption=settings.encryption)


@contextlib.contextmanager
def vm_lock(repo: Repository, vm: str) -> Iterator[None]:
    with repo.lock(f"vm-{repo.local_name(vm)}", what=f"VM {vm}"):  # keyed name in an encrypted repository
        yield


# Garbage collection takes seconds; runs that need chunks wait that long for it.
GC_WAIT = 600.0


def repository_lock(repo: Repository, *, exclusive: bool = False, wait: float = GC_WAIT) -> contextlib.AbstractContextManager[None]:
    """Shared by every run that reads or writes chunks; exclusive while chunks are deleted."""
    what = "the repository for garbage collection" if not exclusive else "the repository (a backup or restore is running)"
    return repo.lock("repository", what=what, shared=not exclusive, wait=wait)


def tuning_for(vmconf: VMConfig, base: Tuning = Tuning()) -> Tuning:
    changes = {}
    if vmconf.compression is not None:
        changes["level"] = vmconf.compression
    changes["workers"] = vmconf.workers if vmconf.workers is not None else default_workers()
    if vmconf.chunk_mib is not None:
        changes["chunk_size"] = vmconf.chunk_mib * 1024 * 1024
    if vmconf.queue_depth is not None:
        changes["depth"] = vmconf.queue_depth
    return dataclasses.replace(base, **changes)


@contextlib.contextmanager
def vm_session(settings: Settings, vmconf: VMConfig, *, create: bool = False) -> Iterator[tuple[Repository, QMPSession]]:
    """The repository, the VM's lock, then its QMP session: what every VM command needs."""
    if vmconf.qmp is None:  # Settings.vm(name) says so, with where it looked
        raise VMUnreachable(f"no QMP socket known for VM {vmconf.name!r}", hint="pass --qmp SOCKET")
    repo = open_repository(settings, create=create)
    with vm_lock(repo, vmconf.name), repository_lock(repo), QMPSession(vmconf.qmp) as session:
        yield repo, session


def backup(settings: Settings, req: BackupRequest, *, cancel: CancelToken, observer: Observer = Observer(),
           on_backup: Callable[[BackupOutcome], None] = lambda outcome: None) -> BackupOutcome:
    """Back up one VM; then, for `auto` with verify_boot (the request's or the config file's), boot the new backup.

    Failures are the outcome's (an interruption is raised); on_backup(outcome) as soon as the backup
    itself is done, before any boot.  The metrics file, if any, is updated (not for a dry run)."""
    started = time.monotonic()
    try:
        result = _backup(settings, req, cancel=cancel, observer=observer)
    except Interrupted as exc:
        _record(settings, req, exc.exit_code, time.monotonic() - started)
        raise
    except NbdBackupError as exc:
        _record(settings, req, exc.exit_code, time.monotonic() - started)
        outcome = BackupOutcome(req.vm, req.mode, failure=exc)
        on_backup(outcome)
        return outcome
    m = result.manifest
    if m is not None:
        _record(settings, req, 0, m.duration, m.read_bytes, m.stored_bytes)
    outcome = BackupOutcome(req.vm, req.mode, result=result)
    on_backup(outcome)
    if m is not None and req.mode == "auto" and (req.verify_boot or settings.vm(req.vm, required=False).verify_boot):
        from .bootcheck import BootRequest

        try:
            boot = verify_boot(settings, BootRequest(vm=req.vm, checkpoint=m.checkpoint), cancel=cancel, observer=observer)
        except Interrupted:
            raise
        except NbdBackupError as exc:
            return dataclasses.replace(outcome, failure=exc, failed_step="verify --boot")
        return dataclasses.replace(outcome, boot=boot)
    return outcome


def backup_all(settings: Settings, req: BackupRequest, *, jobs: int = 1, cancel: CancelToken, observer: Observer = Observer(),
               on_backup: Callable[[BackupOutcome], None] = lambda outcome: None) -> BatchOutcome:
    """`auto --all`: every VM of the config file (jobs at once); one VM's failure does not stop the others.
    req: the options for each VM (its vm field is ignored).  Boot checks follow all backups."""
    if req.qmp or req.qga or req.checkpoint:
        raise UsageError("--qmp, --qga and --checkpoint name one VM; with --all they come from the config file")
    if settings.config_file is None:
        raise UsageError(f"--all: there is no config file (looked for {' and '.join(map(str, settings.config_searched))})",
                         hint="create one with a [vm.NAME] table per VM, or pass --config FILE")
    if not settings.vms:
        raise UsageError(f"--all: the config file {settings.config_file} names no VM", hint="add a [vm.NAME] table per VM")
    one = dataclasses.replace(req, verify_boot=False)

    def run(name: str) -> BackupOutcome:
        cancel.check()
        observer.on_stage(name)
        return backup(settings, dataclasses.replace(one, vm=name), cancel=cancel, observer=observer, on_backup=on_backup)

    names = sorted(settings.vms)
    if jobs == 1:
        outcomes = [run(name) for name in names]
    else:
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(jobs, "auto") as pool:
            outcomes = list(pool.map(run, names))
    booted = []
    for o in outcomes:
        if not o.exit_code and o.result is not None and o.result.manifest is not None and (req.verify_boot or settings.vms[o.vm].verify_boot):
            from .bootcheck import BootRequest

            try:
                o = dataclasses.replace(o, boot=verify_boot(settings, BootRequest(vm=o.vm, checkpoint=o.result.manifest.checkpoint),
                                                             cancel=cancel, observer=observer))
            except Interrupted:
                raise
            except NbdBackupError as exc:
                o = dataclasses.replace(o, failure=exc, failed_step="verify --boot")
        booted.append(o)
    return BatchOutcome(tuple(booted))


@dataclasses.dataclass(frozen=True)
class BackupOutcome:
    """One VM's backup run: its result, and the failure of the backup or of the boot check after it."""

    vm: str
    mode: str
    result: BackupResult | None = None  # the backup, if it was made
    failure: NbdBackupError | None = None
    failed_step: str = ""  # "verify --boot" when the backup was made but did not boot; else the backup failed
    boot: BootResult | None = None

    @property
    def exit_code(self) -> int:
        return self.failure.exit_code if self.failure else 0


@dataclasses.dataclass(frozen=True)
class BatchOutcome:
    """`auto --all`: each VM's outcome; the exit code is the worst one."""

    outcomes: tuple[BackupOutcome, ...]

    @property
    def failed(self) -> list[str]:
        return [o.vm for o in self.outcomes if o.exit_code]

    @property
    def error(self) -> SomeRunsFailed | None:
        """The run's error (worst exit code), or None when every VM succeeded."""
        worst = max((o.exit_code for o in self.outcomes), default=0)
        if not worst:
            return None
        return SomeRunsFailed(f"{len(self.failed)} of {plural(len(self.outcomes), 'VM')} failed: {', '.join(self.failed)}", worst)


def _record(settings: Settings, req: BackupRequest, code: int, duration: float, read: int = 0, stored: int = 0) -> None:
    """Update the metrics file (not for a dry run); a metrics problem is a warning, never a failed backup."""
    if settings.metrics_file is None or req.dry_run:
        return
    from .metrics import RunMetrics, update

    try:
        update(settings.metrics_file, RunMetrics(req.vm, code, duration, read, stored))
    except (OSError, NbdBackupError) as exc:
        log.warning("cannot update metrics file %s: %s", settings.metrics_file, exc)


def _backup(settings: Settings, req: BackupRequest, *, cancel: CancelToken, observer: Observer) -> BackupResult:
    vmconf = settings.vm(req.vm, str(req.qmp) if req.qmp else None)
    for value in (req.checkpoint, req.since):
        if value is not None and value != "latest":
            check_name("checkpoint", value)  # before touching the VM
    req = dataclasses.replace(req, disks=vmconf.disks, exclude=vmconf.exclude, tuning=tuning_for(vmconf))
    quiesce: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if (req.fsfreeze or req.require_fsfreeze) and not req.dry_run:
        from .guestagent import fsfreeze as freeze_guest

        quiesce = functools.partial(freeze_guest, req.qga or vmconf.qga, required=req.require_fsfreeze)
    if req.dry_run:  # no repository is created, no scratch or socket directory made or cleared
        with vm_session(settings, vmconf) as (repository, session):
            return run_backup(repository, session, req, scratch_dir=Path("/nonexistent"), socket_dir=Path("/nonexistent"),  # unused by a dry run
                              cancel=cancel)
    repo: Repository | None = None
    try:
        with contextlib.ExitStack() as stack:
            repo, session = stack.enter_context(vm_session(settings, vmconf, create=True))
            owner = foreign_owner(session.peer_user())  # QEMU must reach the scratch files and create the NBD socket
            base = scratch_base(vmconf.scratch, lambda: repo.local_dir("tmp"), owner)
            prefix = f"{repo.local_name(vmconf.name)}@"  # keyed in an encrypted repository: no VM name in file names
            remove_stale_dirs(base, prefix=prefix)  # left by a killed run; we hold the VM's lock
            scratch = stack.enter_context(private_dir(base, prefix=prefix, owner=owner))
            sockets = stack.enter_context(private_dir(owner=owner))
            return run_backup(repo, session, req, scratch_dir=scratch, socket_dir=sockets, cancel=cancel,
                              progress=observer.progress, on_start=observer.on_start, quiesce=quiesce, owner=owner)
    except BaseException:
        if repo is not None:  # every lock of the run is released by now
            discard_new_chunks(repo)
        raise


def discard_new_chunks(repo: Repository) -> None:
    """After a failed or interrupted backup: remove the chunks it created that no backup references.

    The rule of docs/FORMAT.md ("Deleting chunks"): only under the exclusive repository lock, so
    that no other run that may have found one of these chunks already stored (and counts on it)
    is still running; a run that has finished references it from its manifest and keeps it.
    When another run holds the repository, the chunks stay and the next prune removes them."""
    created = set(repo.new_chunks)
    if not created:
        return
    repo.new_chunks.clear()
    try:
        with repository_lock(repo, exclusive=True, wait=0):
            freed, size = repo.remove_unreferenced(created)
        log.info("removed the %s (%s) this run had stored", plural(freed, "chunk"), human_size(size))
    except LockHeld:
        _left(repo, created, "another backup or restore is using the repository")
    except Exception as exc:  # never hide the run's own error
        _left(repo, created, f"removing them failed: {exc}")


def _left(repo: Repository, created: set[bytes], why: str) -> None:
    log.warning("left %s (up to %s) that this run stored and no backup uses (%s): "
                "`nbdbackup prune` or the next failed run removes them",
                plural(len(created), "chunk"), human_size(repo.stored_size(created)), why)


@dataclasses.dataclass(frozen=True)
class CheckpointsRequest:
    vm: str
    qmp: Path | None = None  # the VM's QMP socket (default: the config file's)


@dataclasses.dataclass(frozen=True)
class DeleteRequest:
    vm: str
    checkpoint: str
    keep_backup: bool = False  # keep the backup made at the checkpoint
    qmp: Path | None = None


def checkpoint_status(settings: Settings, req: CheckpointsRequest) -> list[CheckpointStatus]:
    """The chain as QEMU and the repository see it.  Changes nothing that lasts: the twin check
    of the active checkpoint copies two bitmaps per disk into temporary ones, removed at once."""
    vmconf = settings.vm(req.vm, str(req.qmp) if req.qmp else None)
    with vm_session(settings, vmconf) as (repo, session):
        snapshot = block_nodes(session)
        disks = qcow2_disks(session, vmconf.disks, vmconf.exclude, snapshot)
        checkpoints = Checkpoints(repo, session, vmconf.name, disks, snapshot=snapshot)
        records, bitmaps = checkpoints.records(), checkpoints.bitmaps()
        rows = assess(records, bitmaps, bitmap_namespace(repo.id), checkpoints.other_owners(bitmaps))
        active = next((r for r in rows if r.active), None)
        problem = checkpoints.twin_check(records[-1]) if active is not None else None
        if problem:
            rows = [dataclasses.replace(r, state="altered", active=False, problems=(*r.problems, problem)) if r is active else r
                    for r in rows]
            rows = [dataclasses.replace(r, usable=False) for r in rows]
        return rows


def delete_checkpoint(settings: Settings, req: DeleteRequest) -> None:
    """Delete a checkpoint the seed's way (bitmaps first, record after), and its backup unless kept."""
    check_name("checkpoint", req.checkpoint)
    vmconf = settings.vm(req.vm, str(req.qmp) if req.qmp else None)
    with vm_session(settings, vmconf) as (repo, session):
        snapshot = block_nodes(session)
        checkpoints = Checkpoints(repo, session, vmconf.name, qcow2_disks(session, vmconf.disks, vmconf.exclude, snapshot), snapshot=snapshot)
        checkpoints.reconcile()
        record = resolve(checkpoints.records(), req.checkpoint)
        checkpoints.delete(record.name)
        if not req.keep_backup:
            repo.delete_backup(vmconf.name, record.name)


def restore(settings: Settings, req: RestoreRequest, *, cancel: CancelToken, observer: Observer = Observer()) -> list[RestoredImage]:
    """Write the images of a backup point (with the VM's data-path settings from the config file, if any)."""
    from .restore import run_restore
    _check_names(req.vm, req.disks)
    tuning = restore_tuning(settings.vm(req.vm, required=False))
    repo = open_repository(settings)
    with repository_lock(repo), private_dir() as sockets:
        return run_restore(repo, req, socket_dir=sockets, tuning=tuning, cancel=cancel,
                           progress=observer.progress, on_start=observer.on_start)


def restore_tuning(vmconf: VMConfig) -> Tuning:
    """A restore's data path: what the VM's settings configure (workers, queue depth, chunk size), else the defaults."""
    changes = {}
    if vmconf.workers is not None:
        changes["workers"] = vmconf.workers
    if vmconf.chunk_mib is not None:
        changes["chunk_size"] = vmconf.chunk_mib * 1024 * 1024
    if vmconf.queue_depth is not None:
        changes["depth"] = vmconf.queue_depth
    return dataclasses.replace(Tuning(), **changes)


def copy(settings: Settings, req: CopyRequest, *, cancel: CancelToken, observer: Observer = Observer()) -> CopyReport:
    """Copy backups of req.vm to the repository req.target (created if new, like a backup creates one).
    Source: shared lock (no garbage collection meanwhile); target: the VM's lock and a shared lock."""
    from .copy import copy_backups
    from .repository.keys import copy_target_source
    from .repository.location import parse_location

    check_name("VM", req.vm)
    if req.every and req.checkpoint:
        raise UsageError("give --checkpoint or --all, not both")
    target = parse_location(req.target)
    source = open_repository(settings)
    dest = Repository.open(target, create=True, s3=settings.s3_for(target), like=source, encryption=settings.encryption,
                           passphrase_source=copy_target_source())
    with repository_lock(source), vm_lock(dest, req.vm), repository_lock(dest):
        return copy_backups(source, dest, req, cancel=cancel, progress=observer.progress)


def verify(settings: Settings, req: VerifyRequest, *, observer: Observer = Observer()) -> VerifyReport:
    """Read back the backups of req.vm and check every byte they reference (report.error: what to exit with)."""
    from .verify import run_verify
    repo = open_repository(settings)
    # Shared, as backups and restores hold it: garbage collection must not delete chunks under us.
    with repository_lock(repo):
        return run_verify(repo, req, on_start=observer.on_start, progress=observer.progress)


def list_backups(settings: Settings, vm: str) -> list[Manifest]:
    check_name("VM", vm)
    return open_repository(settings).manifests(vm)


@dataclasses.dataclass(frozen=True)
class VMSummary:
    """One VM of the repository, as `nbdbackup list` shows it."""

    vm: str
    backups: int
    newest: Manifest | None
    stored_bytes: int


def list_vms(settings: Settings) -> list[VMSummary]:
    """The VMs that have backups in the repository."""
    repo = open_repository(settings)
    rows = []
    for name in repo.vms():
        manifests = repo.manifests(name)
        rows.append(VMSummary(name, len(manifests), manifests[-1] if manifests else None, sum(m.stored_bytes for m in manifests)))
    return rows


def prune(settings: Settings, req: PruneRequest) -> PruneOutcome:
    """Apply the retention policy (--keep-* or each VM's retention setting) to one VM, or with
    all_vms to every VM of the config file that has one (a VM's failure does not stop the
    others); then free the chunks no backup references, once.  outcome.error: what to exit with."""
    if req.all_vms == (req.vm is not None):
        raise UsageError("give either a VM or --all")
    if req.vm is not None:  # not all_vms
        report = prune_vm(settings, settings.vm(req.vm, str(req.qmp) if req.qmp else None, required=False), req, collect=True)
        return PruneOutcome({req.vm: report}, garbage=report.garbage)
    if req.qmp:
        raise UsageError("--qmp names one VM; with --all the sockets come from the config file")
    names = [n for n, c in sorted(settings.vms.items()) if req.keep or c.retention]
    if not names:
        raise UsageError("--all: no VM of the config file has a retention setting", hint="add retention = { daily = 7 } to [vm.NAME]")
    reports: dict[str, PruneReport] = {}
    failures: dict[str, NbdBackupError] = {}
    for name in names:
        try:
            reports[name] = prune_vm(settings, settings.vm(name, required=False), req, collect=False)
        except NbdBackupError as exc:
            failures[name] = exc
    garbage = None if req.dry_run else collect_garbage(settings)  # once, after every VM
    return PruneOutcome(reports, failures, garbage)


def prune_vm(settings: Settings, vmconf: VMConfig, req: PruneRequest, *, collect: bool = True) -> PruneReport:
    """Remove the backups outside the policy and their checkpoints in QEMU (the seed's way,
    when the VM is reachable); then, if collect, the chunks no backup references any more."""
    policy = Policy(**(req.keep or vmconf.retention))
    repo = open_repository(settings)
    notes: list[str] = []
    with vm_lock(repo, vmconf.name):
        decisions = decide_for(repo, vmconf.name, policy)
        if req.dry_run:
            return PruneReport(decisions, dry_run=True)
        with contextlib.ExitStack() as stack:
            session = _try_session(stack, vmconf, notes)
            snapshot = block_nodes(session) if session else None
            disks = qcow2_disks(session, vmconf.disks, vmconf.exclude, snapshot) if session else []
            deleted = remove_backups(repo, vmconf.name, decisions, session, disks, snapshot)
    garbage = collect_garbage(settings) if collect else None
    return PruneReport(decisions, False, deleted, tuple(notes), garbage)


def collect_garbage(settings: Settings, *, wait: float = 60.0) -> GarbageReport:
    """Free the chunks that no backup of any VM references, under the exclusive repository lock."""
    repo = open_repository(settings)
    try:
        with repository_lock(repo, exclusive=True, wait=wait):
            return pruning.free_unreferenced(repo)
    except LockHeld:
        return GarbageReport(False, note="chunks were not freed: backups or restores are running; the next prune frees them")


def _try_session(stack: contextlib.ExitStack, vmconf: VMConfig, notes: list[str]) -> QMPSession | None:
    if vmconf.qmp is None:
        notes.append("no QMP socket known: checkpoints in QEMU were left as they are")
        return None
    try:
        return stack.enter_context(QMPSession(vmconf.qmp))
    except VMUnreachable as exc:
        notes.append(f"VM unreachable ({exc.message}): its checkpoints are merged away by the next prune")
        return None


def serve(settings: Settings, req: ServeRequest, *, cancel: CancelToken, on_ready: Callable) -> None:
    """Serve a backup point over NBD until cancelled (a signal); on_ready(manifest, exports) once serving."""
    import time

    from .serving import remove_dead_server_dirs, serving
    from .workdirs import runtime_base

    _check_names(req.vm, req.disks)
    repo = open_repository(settings)
    remove_dead_server_dirs(runtime_base(), "nbdbackup-serve-")  # left by killed runs
    with repository_lock(repo), private_dir(prefix="nbdbackup-serve-") as work, _forget_server_locks(repo):
        with serving(repo, str(settings.repo), settings.config_file, req, work) as (m, exports, servers):
            cancel.check()
            on_ready(m, exports)
            while cancel.signum is None:
                for server in servers:
                    if not server.alive():
                        server.failed()
                time.sleep(0.2)


def open_backup(repo_location: str, config_file: str | None, vm: str, checkpoint: str, disks: Sequence[str],
                key: Unlocked | None = None):
    """The nbdkit plugin's entry point (nbdkit_plugin.py, in nbdkit's process): the repository
    (opened with the key nbdbackup handed over), its shared lock (held while serving; the
    caller releases it) and a BackupImage per disk."""
    from .backupimage import BackupImage
    from .config import load
    from .restore import find_backup

    settings = load(config_file, repo_location)
    repo = Repository.open(settings.repo, create=False, s3=settings.s3_for(settings.repo), encryption=settings.encryption, unlocked=key)
    lock = repository_lock(repo)
    lock.__enter__()
    m = find_backup(repo, vm, checkpoint)
    return repo, lock, {d: BackupImage(repo, m, d) for d in disks}


def mount(settings: Settings, req: MountRequest, *, cancel: CancelToken) -> MountResult:
    """Mount the guest filesystems of a backup point read-only (see mounting.py)."""
    from .mounting import run_mount
    from .serving import Source

    _check_names(req.vm, req.disks)
    repo = open_repository(settings)
    with repository_lock(repo):  # nbdkit takes its own shared lock for as long as the mount lives
        return run_mount(repo, lambda checkpoint, disks: Source(str(settings.repo), settings.config_file, req.vm, checkpoint, disks, repo.unlocked_key()),
                         req, cancel)


def recover(settings: Settings, req: RecoverRequest, *, cancel: CancelToken, observer: Observer = Observer(),
            on_images: Callable = lambda result: None, on_wait: Callable[[Path], None] = lambda socket: None) -> RecoverResult:
    """Instant recovery (see recovering.py): images backed by the served backup, streamed home.
    The VM's QMP socket: the request's, else the config file's; on_wait(socket) while waiting for it."""
    from .recovering import run_recover
    from .serving import Source
    from .workdirs import runtime_base

    qmp = settings.vm(req.vm, str(req.qmp) if req.qmp else None).qmp
    if qmp is None:  # Settings.vm says so first, with where it looked
        raise VMUnreachable(f"no QMP socket known for VM {req.vm!r}", hint="pass --qmp SOCKET")
    req = dataclasses.replace(req, qmp=qmp)
    for d in req.disks:
        check_name("disk", d)
    repo = open_repository(settings)
    prefix = f"nbdbackup-recover-{repo.id[:8]}-{req.vm}@"
    with vm_lock(repo, req.vm), repository_lock(repo):
        remove_stale_dirs(runtime_base(), prefix=prefix)  # left by a killed run; we hold the VM's lock
        with private_dir(prefix=prefix) as work, _forget_server_locks(repo):
            return run_recover(repo, lambda checkpoint, disks: Source(str(settings.repo), settings.config_file, req.vm, checkpoint, disks, repo.unlocked_key()),
                               req, work, cancel, on_images=on_images, on_wait=lambda: on_wait(qmp),
                               on_start=observer.on_start, progress=observer.progress)


@contextlib.contextmanager
def _forget_server_locks(repo: Repository) -> Iterator[None]:
    """On the way out: the lock objects of the nbdkit we killed (it cannot release them)."""
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # never hide the run's own error
            repo.remove_dead_locks("repository")


def umount(directory: Path) -> None:
    """Unmount what `mount` set up at directory and stop its servers."""
    from .mounting import run_umount

    run_umount(directory)


def rollback(settings: Settings, req: RollbackRequest, *, cancel: CancelToken, observer: Observer = Observer()) -> RollbackResult:
    """Under the VM's lock (no backup of it meanwhile): the shut-down VM's images through
    qemu-storage-daemon, or the paused VM's disks through its QEMU.  The images: the request's
    (--image), over the config file's; the QMP socket likewise."""
    from .rollback import rollback_live, run_rollback, running_qemu

    _check_names(req.vm, req.disks)
    vmconf = settings.vm(req.vm, str(req.qmp) if req.qmp else None, required=False)
    req = dataclasses.replace(req, images={**vmconf.images, **req.images})
    tuning = restore_tuning(vmconf)
    repo = open_repository(settings)
    with vm_lock(repo, req.vm), repository_lock(repo):
        with running_qemu(vmconf) as qemu:
            if qemu is not None:
                return rollback_live(repo, vmconf, qemu, req, cancel=cancel, observer=observer, pause=req.pause, reset=req.reset,
                                     tuning=tuning)
        with private_dir() as sockets:
            return run_rollback(repo, req, socket_dir=sockets, tuning=tuning, cancel=cancel,
                                progress=observer.progress, on_start=observer.on_start)


# -- repositories and their keys (keyring.py does the work) -----------------------------


def init_repository(settings: Settings, encryption: str | None) -> InitResult:
    from .keyring import init

    return init(settings, encryption)


def list_keys(settings: Settings) -> list[KeyInfo]:
    from .keyring import list_keys

    return list_keys(settings)


def add_key(settings: Settings) -> str:
    from .keyring import add_key

    return add_key(settings)


def remove_key(settings: Settings, key_id: str) -> None:
    from .keyring import remove_key

    remove_key(settings, key_id)


def change_passphrase(settings: Settings) -> str:
    from .keyring import change_passphrase

    return change_passphrase(settings)


def export_key(settings: Settings, target: Path | None) -> bytes:
    from .keyring import export_key

    return export_key(settings, target)


# verify --boot restores here unless the VM's scratch directory is configured: large, not tmpfs.
BOOT_SCRATCH = Path("/var/tmp")


def verify_boot(settings: Settings, req: BootRequest, *, cancel: CancelToken, observer: Observer = Observer()) -> BootResult:
    """Restore a backup point into a private temporary directory and boot it (the repository is only read,
    and only locked while the point is restored: the boot may take minutes).  The VM's settings give the
    QEMU arguments, the timeout (unless the request has one) and where to restore."""
    from .bootcheck import DEFAULT_TIMEOUT, boot_point, restore_point
    vmconf = settings.vm(req.vm, required=False)
    req = dataclasses.replace(req, timeout=req.timeout or vmconf.boot_timeout or DEFAULT_TIMEOUT, qemu_args=vmconf.boot)
    repo = open_repository(settings)
    base = vmconf.scratch or BOOT_SCRATCH
    observer.on_stage("restore for boot")
    # The images in the scratch directory (keyed name when encrypted); the sockets in a short private
    # directory (a configured scratch directory's path may be too long for one).
    with private_dir(base, prefix=f"{repo.local_name(vmconf.name)}-boot-") as workdir, private_dir() as sockets:
        with repository_lock(repo):
            checkpoint, images = restore_point(repo, req, workdir, sockets=sockets, tuning=tuning_for(vmconf), cancel=cancel,
                                               on_start=observer.on_start, progress=observer.progress)
        return boot_point(req, checkpoint, images, workdir, sockets=sockets, cancel=cancel, on_phase=observer.on_phase)
