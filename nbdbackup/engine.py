"""Entry points for the CLI: each takes settings and a request, gathers the
resources the command needs (repository, VM lock, QMP session, private
directories) in the right order, and makes one orchestration call.

The VM lock is taken before connecting to QMP: a VM's backup monitor serves
one client at a time, so a second run must learn of the lock, not hang on QMP.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

from .backup import BackupRequest, BackupResult, run_backup
from .capture import CancelToken, Tuning
from .chain import CheckpointStatus, assess, resolve
from .checkpoints import Checkpoints, disk_bitmaps
from .config import Settings, VMConfig
from .lock import file_lock
from .names import bitmap_namespace, check_name
from .qmp import QMPSession
from .records import Manifest
from .repository import Repository
from .restore import RestoreRequest, run_restore
from .vm import qcow2_disks
from .workdirs import private_dir, remove_stale_dirs

Progress = Callable[[int], None]
Start = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class Observer:
    """How the engine reports progress; the CLI picks a bar or nothing."""

    on_start: Start = lambda total: None
    progress: Progress = lambda n: None


def open_repository(settings: Settings) -> Repository:
    """The repository, created on first use."""
    return Repository.open(settings.repo)


@contextlib.contextmanager
def vm_lock(repo: Repository, vm: str) -> Iterator[None]:
    with file_lock(repo.local_dir("locks") / f"vm-{vm}.lock", what=f"VM {vm}"):
        yield


def tuning_for(vmconf: VMConfig, base: Tuning = Tuning()) -> Tuning:
    changes = {}
    if vmconf.compression is not None:
        changes["level"] = vmconf.compression
    if vmconf.workers is not None:
        changes["workers"] = vmconf.workers
    return dataclasses.replace(base, **changes)


@contextlib.contextmanager
def vm_session(settings: Settings, vmconf: VMConfig) -> Iterator[tuple[Repository, QMPSession]]:
    """The repository, the VM's lock, then its QMP session: what every VM command needs."""
    repo = open_repository(settings)
    with vm_lock(repo, vmconf.name), QMPSession(vmconf.qmp) as session:
        yield repo, session


def backup(settings: Settings, vmconf: VMConfig, req: BackupRequest, *, cancel: CancelToken, observer: Observer = Observer()) -> BackupResult:
    with contextlib.ExitStack() as stack:
        repo, session = stack.enter_context(vm_session(settings, vmconf))
        scratch_base = vmconf.scratch or repo.local_dir("tmp")
        remove_stale_dirs(scratch_base, prefix=f"{vmconf.name}@")  # left by a killed run; we hold the VM's lock
        scratch = stack.enter_context(private_dir(scratch_base, prefix=f"{vmconf.name}@"))
        sockets = stack.enter_context(private_dir())
        return run_backup(repo, session, req, scratch_dir=scratch, socket_dir=sockets, cancel=cancel,
                          progress=observer.progress, on_start=observer.on_start)


def checkpoint_status(settings: Settings, vmconf: VMConfig) -> list[CheckpointStatus]:
    """Read-only: the chain as QEMU and the repository see it."""
    with vm_session(settings, vmconf) as (repo, session):
        disks = qcow2_disks(session, vmconf.disks)
        return assess(repo.checkpoints(vmconf.name), disk_bitmaps(session, disks), bitmap_namespace(repo.id))


def delete_checkpoint(settings: Settings, vmconf: VMConfig, name: str, *, keep_backup: bool) -> None:
    """Delete a checkpoint the seed's way (bitmaps first, record after), and its backup unless kept."""
    check_name("checkpoint", name)
    with vm_session(settings, vmconf) as (repo, session):
        checkpoints = Checkpoints(repo, session, vmconf.name, qcow2_disks(session, vmconf.disks))
        checkpoints.reconcile()
        record = resolve(checkpoints.records(), name)
        checkpoints.delete(record.name)
        if not keep_backup:
            repo.delete_backup(vmconf.name, record.name)


def restore(settings: Settings, req: RestoreRequest, *, tuning: Tuning, cancel: CancelToken, observer: Observer = Observer()) -> list[Path]:
    repo = open_repository(settings)
    with private_dir() as sockets:
        return run_restore(repo, req, socket_dir=sockets, tuning=tuning, cancel=cancel,
                           progress=observer.progress, on_start=observer.on_start)


def list_backups(settings: Settings, vm: str) -> list[Manifest]:
    check_name("VM", vm)
    return open_repository(settings).manifests(vm)
