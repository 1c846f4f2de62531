"""Prune orchestration: retention decisions, checkpoints merged away, backups removed,
then garbage collection.  The engine gathers the resources (locks, QMP session)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoints import Checkpoints
from .errors import NbdBackupError, RepositoryDamaged, SomeRunsFailed
from .qmp import QMPSession
from .records import Disk
from .repository import Repository
from .retention import Decision, Policy, decide
from .vm import BlockNodes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GarbageReport:
    done: bool  # False: skipped (see note)
    freed_chunks: int = 0
    freed_bytes: int = 0
    note: str | None = None
    damaged: bool = False  # skipped because a manifest or index is damaged


@dataclass(frozen=True)
class PruneReport:
    decisions: tuple[Decision, ...]
    dry_run: bool
    checkpoints_deleted: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    garbage: GarbageReport | None = None


@dataclass(frozen=True)
class PruneRequest:
    vm: str | None  # None: every VM of the config file that has a retention setting (all_vms)
    all_vms: bool = False
    keep: dict[str, int] = field(default_factory=dict)  # --keep-* given; else each VM's retention setting
    qmp: Path | None = None  # the VM's QMP socket (default: the config file's)
    dry_run: bool = False


@dataclass(frozen=True)
class PruneOutcome:
    """A prune run: each VM's report (or failure, with --all), then the chunks freed once for all."""

    reports: dict[str, PruneReport]
    failures: dict[str, NbdBackupError] = field(default_factory=dict)
    garbage: GarbageReport | None = None

    @property
    def error(self) -> NbdBackupError | None:
        """What the run exits with once the reports are shown: damage (6) first, then the worst failure."""
        if self.garbage is not None and self.garbage.damaged:
            return RepositoryDamaged("the repository has damage: backups were pruned but no chunk was freed",
                                     hint="run `nbdbackup verify VM` for each VM")
        if self.failures:
            return SomeRunsFailed(f"prune failed for {', '.join(self.failures)}", max(e.exit_code for e in self.failures.values()))
        return None


def decide_for(repo: Repository, vm: str, policy: Policy) -> tuple[Decision, ...]:
    """The policy's decisions; the backup at the newest checkpoint (the next incremental's base) is kept."""
    records = repo.checkpoints(vm)
    newest = next((r.name for r in reversed(records) if r.state == "confirmed"), None)
    return tuple(decide(repo.manifests(vm), policy, protect={newest} if newest else set()))


def remove_backups(repo: Repository, vm: str, decisions: Sequence[Decision], session: QMPSession | None,
                   disks: Sequence[Disk], snapshot: BlockNodes | None = None) -> tuple[str, ...]:
    """Delete the checkpoints (in QEMU, when there is a session) and the backups the decisions drop.

    Checkpoints whose backup is gone (now, or pruned earlier while the VM was
    away) hold nothing a backup can build on: they are merged away the seed's
    way, the newest excepted.  Returns the checkpoints deleted.
    """
    deleted: list[str] = []
    if session is not None:
        checkpoints = Checkpoints(repo, session, vm, disks, snapshot=snapshot)
        checkpoints.reconcile()
        kept = {d.manifest.checkpoint for d in decisions if d.keep}
        for r in checkpoints.records()[:-1]:
            if r.name not in kept:
                checkpoints.delete(r.name)
                deleted.append(r.name)
    for d in decisions:
        if not d.keep:
            repo.delete_backup(vm, d.manifest.checkpoint)
    return tuple(deleted)


def free_unreferenced(repo: Repository) -> GarbageReport:
    """Free the chunks no backup of any VM references.  The caller holds the repository lock exclusively."""
    try:
        freed, size = repo.remove_unreferenced()
    except RepositoryDamaged as exc:
        return GarbageReport(False, note=f"chunks were not freed: {exc}; run `nbdbackup verify`", damaged=True)
    return GarbageReport(True, freed, size)
