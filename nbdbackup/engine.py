"""Entry points for the CLI: each takes settings and a request, gathers the
resources the command needs (repository, VM lock, QMP session, private
directories) in the right order, and makes one orchestration call.

The VM lock is taken before connecting to QMP: a VM's backup monitor serves
one client at a time, so a second run must learn of the lock, not hang on QMP.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Callable, Iterator

from .backup import BackupRequest, BackupResult, run_backup
from .capture import CancelToken, Tuning
from .config import Settings, VMConfig
from .lock import file_lock
from .qmp import QMPSession
from .records import Manifest
from .repository import Repository
from .restore import RestoreRequest, run_restore
from .workdirs import private_dir

Progress = Callable[[int], None]
Start = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class Observer:
    """How the engine reports progress; the CLI picks a bar or nothing."""

    on_start: Start = lambda total: None
    progress: Progress = lambda n: None


def open_repository(settings: Settings, *, create: bool = True) -> Repository:
    return Repository.open(settings.repo, create=create)


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


def backup(settings: Settings, vmconf: VMConfig, req: BackupRequest, *, cancel: CancelToken, observer: Observer = Observer()) -> BackupResult:
    repo = open_repository(settings)
    with contextlib.ExitStack() as stack:
        stack.enter_context(vm_lock(repo, vmconf.name))
        session = stack.enter_context(QMPSession(vmconf.qmp))
        scratch = stack.enter_context(private_dir(vmconf.scratch or repo.local_dir("tmp"), prefix=f"{vmconf.name}-"))
        sockets = stack.enter_context(private_dir())
        return run_backup(repo, session, req, scratch_dir=scratch, socket_dir=sockets, cancel=cancel,
                          progress=observer.progress, on_start=observer.on_start)


def restore(settings: Settings, req: RestoreRequest, *, tuning: Tuning, cancel: CancelToken, observer: Observer = Observer()) -> list[Path]:
    repo = open_repository(settings, create=False)
    with private_dir() as sockets:
        return run_restore(repo, req, socket_dir=sockets, tuning=tuning, cancel=cancel,
                           progress=observer.progress, on_start=observer.on_start)


def list_backups(settings: Settings, vm: str) -> list[Manifest]:
    repo = open_repository(settings, create=False)
    return repo.manifests(vm)
