"""Checkpoints in QEMU and in the repository, kept in step.

Crash-safety rules (docs/CHAIN.md):
  create: record (pending) -> bitmaps (in the freeze transaction) -> backup -> record confirmed
  delete: bitmaps first (one transaction, all disks) -> record after
  every run first reconciles: pending records are rolled back (or confirmed when
  their backup was committed), namespaced bitmaps without a record are removed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from . import chain
from .names import bitmap_namespace, is_nbdbackup_bitmap
from .qmp import QMPSession
from .records import Bitmap, CheckpointRecord, Disk
from .repository import Repository
from .vm import node_bitmaps

log = logging.getLogger(__name__)

Action = tuple[str, dict]


def disk_bitmaps(session: QMPSession, disks: Sequence[Disk]) -> dict[str, dict[str, Bitmap]]:
    """disk id -> bitmap name -> Bitmap, for nbdbackup's bitmaps only (any repository's)."""
    per_node = node_bitmaps(session)
    return {d.id: {b.name: b for b in per_node.get(d.node, []) if is_nbdbackup_bitmap(b.name)} for d in disks}


def create_actions(disks: Sequence[Disk], new: CheckpointRecord, previous: CheckpointRecord | None, bitmaps: dict[str, dict[str, Bitmap]]) -> list[Action]:
    """Transaction actions: disable the previous active bitmap, add the new one, on every disk."""
    actions: list[Action] = []
    for d in disks:
        if previous is not None:
            old = bitmaps[d.id].get(previous.bitmap)
            if old is not None and old.recording and not old.inconsistent:
                actions.append(("block-dirty-bitmap-disable", {"node": d.node, "name": old.name}))
        actions.append(
            ("block-dirty-bitmap-add", {"node": d.node, "name": new.bitmap, "persistent": True, "granularity": chain.GRANULARITY})
        )
    return actions


def delete_actions(plan: chain.DeletePlan, disks: Sequence[Disk], bitmaps: dict[str, dict[str, Bitmap]]) -> list[Action]:
    actions: list[Action] = []
    for d in disks:
        have = bitmaps.get(d.id, {})
        victim = have.get(plan.remove)
        if victim is None:
            continue
        target = have.get(plan.merge_into) if plan.merge_into else None
        usable = not victim.inconsistent
        if target is not None and not target.inconsistent and usable:
            actions.append(("block-dirty-bitmap-merge", {"node": d.node, "target": target.name, "bitmaps": [victim.name]}))
            if plan.enable:
                actions.append(("block-dirty-bitmap-enable", {"node": d.node, "name": target.name}))
        actions.append(("block-dirty-bitmap-remove", {"node": d.node, "name": victim.name}))
    return actions


def remove_actions(disks: Sequence[Disk], names: Iterable[str], bitmaps: dict[str, dict[str, Bitmap]]) -> list[Action]:
    """Remove the named bitmaps wherever they are."""
    names = set(names)
    return [
        ("block-dirty-bitmap-remove", {"node": d.node, "name": b})
        for d in disks
        for b in bitmaps.get(d.id, {})
        if b in names
    ]


@dataclass
class Checkpoints:
    """The VM's checkpoint chain: repository records plus QEMU bitmaps."""

    repo: Repository
    session: QMPSession
    vm: str
    disks: Sequence[Disk]

    @property
    def namespace(self) -> str:
        return bitmap_namespace(self.repo.id)

    def new_record(self, name: str, created: str, chain_id: str) -> CheckpointRecord:
        return CheckpointRecord(name=name, created=created, chain=chain_id, disks=tuple(d.id for d in self.disks),
                                bitmap=self.namespace + name)

    def records(self) -> list[CheckpointRecord]:
        return self.repo.checkpoints(self.vm)

    def bitmaps(self) -> dict[str, dict[str, Bitmap]]:
        return disk_bitmaps(self.session, self.disks)

    def reconcile(self) -> list[str]:
        """Bring records and bitmaps back in step after a crash; returns what was done."""
        done: list[str] = []
        records = self.records()
        bitmaps = self.bitmaps()
        for r in [r for r in records if r.state == "pending"]:
            present = any(r.bitmap in b for b in bitmaps.values())
            if present and self.repo.manifest(self.vm, r.name) is not None:
                records = [replace(x, state="confirmed") if x.name == r.name else x for x in records]
                done.append(f"confirmed checkpoint {r.name}: its backup had been committed")
            else:
                if present:
                    self._apply(delete_actions(chain.plan_delete(records, r.name), self.disks, bitmaps))
                    bitmaps = self.bitmaps()
                records = [x for x in records if x.name != r.name]
                done.append(f"rolled back checkpoint {r.name}: its backup never completed")
            self.repo.save_checkpoints(self.vm, records)
        known = {r.bitmap for r in records}
        orphans = sorted({n for b in bitmaps.values() for n in b if n.startswith(self.namespace)} - known)
        if orphans:
            self._apply(remove_actions(self.disks, orphans, bitmaps))
            done.append(f"removed bitmaps without a checkpoint record: {', '.join(orphans)}")
        stale = [r for r in records if records and r.chain != records[-1].chain]
        if stale:
            self.drop_chain([r.name for r in stale])
            done.append(f"removed checkpoints of an older chain: {', '.join(r.name for r in stale)}")
        for line in done:
            log.warning("%s", line)
        return done

    def add_pending(self, record: CheckpointRecord) -> None:
        self.repo.save_checkpoints(self.vm, [*self.records(), record])

    def confirm(self, name: str) -> None:
        self.repo.save_checkpoints(self.vm, [replace(r, state="confirmed") if r.name == name else r for r in self.records()])

    def rollback(self, name: str) -> None:
        """Undo a checkpoint whose backup failed: QEMU's bitmaps as before, record gone."""
        records = self.records()
        if any(r.name == name for r in records):
            self._apply(delete_actions(chain.plan_delete(records, name), self.disks, self.bitmaps()))
            self.repo.save_checkpoints(self.vm, [r for r in records if r.name != name])

    def delete(self, name: str) -> None:
        """Delete a checkpoint anywhere in the chain: bitmaps first, record after."""
        records = self.records()
        self._apply(delete_actions(chain.plan_delete(records, name), self.disks, self.bitmaps()))
        self.repo.save_checkpoints(self.vm, [r for r in records if r.name != name])

    def drop_chain(self, names: Sequence[str]) -> None:
        """Remove whole checkpoints (an old chain after a new full): bitmaps first, records after."""
        gone = set(names)
        self._apply(remove_actions(self.disks, [r.bitmap for r in self.records() if r.name in gone], self.bitmaps()))
        self.repo.save_checkpoints(self.vm, [r for r in self.records() if r.name not in gone])

    def _apply(self, actions: list[Action]) -> None:
        if actions:
            self.session.transaction(actions)
