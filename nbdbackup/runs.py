"""What every run takes before its work, kept apart from the engine so that a command that
needs no QMP (a shut-down VM's rollback) starts without importing it: the repository
(opened, never created by accident), the VM's and the repository's locks, and how a run
reports progress.  engine.py re-exports these names."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings
    from .repository import Repository

Progress = Callable[[int], None]
Start = Callable[[int], None]

# Garbage collection takes seconds; runs that need chunks wait that long for it.
GC_WAIT = 600.0


@dataclasses.dataclass(frozen=True)
class Observer:
    """How the engine reports progress; the CLI picks a bar or nothing."""

    on_start: Start = lambda total: None
    progress: Progress = lambda n: None


def open_repository(settings: Settings, *, create: bool = False) -> Repository:
    """The repository; only backups create it (a typo in --repo must not make a new one)."""
    from .repository import Repository

    return Repository.open(settings.repo, create=create, s3=settings.s3, encryption=settings.encryption)


@contextlib.contextmanager
def vm_lock(repo: Repository, vm: str) -> Iterator[None]:
    with repo.lock(f"vm-{repo.local_name(vm)}", what=f"VM {vm}"):  # keyed name in an encrypted repository
        yield


def repository_lock(repo: Repository, *, exclusive: bool = False, wait: float = GC_WAIT) -> contextlib.AbstractContextManager[None]:
    """Shared by every run that reads or writes chunks; exclusive while chunks are deleted."""
    what = "the repository for garbage collection" if not exclusive else "the repository (a backup or restore is running)"
    return repo.lock("repository", what=what, shared=not exclusive, wait=wait)
