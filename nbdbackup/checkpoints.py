"""Checkpoints in QEMU and in the repository, kept in step.

Crash-safety rules (docs/CHAIN.md):
  create: record (pending) -> bitmaps (in the freeze transaction) -> backup -> record confirmed
  delete: bitmaps first (one transaction, all disks) -> record after
  every run first reconciles: pending records are rolled back (or confirmed when
  their backup was committed), namespaced bitmaps without a record are removed.

Tamper evidence (another tool clearing or merging into our bitmaps):
  a disabled bitmap must keep the dirty count recorded when it stopped recording;
  the active bitmap has a twin that records the same writes (cleared together in
  the freeze transaction, merged together on delete); they are compared in one
  atomic snapshot before every incremental.

State loaded once: a Checkpoints object reads the records (checkpoints.json) and the
bitmaps (query-named-block-nodes, or the snapshot it is given) the first time they are
needed, keeps the records it saves, and reads the bitmaps again only after a transaction
of its own (or refresh(), after the caller's freeze) changed them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from . import chain
from .errors import ChainBroken, ChainOfAnotherVM, NbdBackupError
from .names import bitmap_namespace, check_bitmaps, checkpoint_bitmap, is_nbdbackup_bitmap, twin_bitmap
from .qmp import QMPSession
from .records import Bitmap, CheckpointRecord, Disk
from .repository import Repository
from .vm import (
    Action,
    BlockNodes,
    bitmap_add,
    bitmap_clear,
    bitmap_disable,
    bitmap_enable,
    bitmap_merge,
    bitmap_remove,
    block_nodes,
    qemu_identity,
)

log = logging.getLogger(__name__)


def disk_bitmaps(session: QMPSession, disks: Sequence[Disk], snapshot: BlockNodes | None = None) -> dict[str, dict[str, Bitmap]]:
    """disk id -> bitmap name -> Bitmap, for nbdbackup's bitmaps only (any repository's).
    snapshot: the block nodes already read (else read now)."""
    per_node = (snapshot or block_nodes(session)).bitmaps()
    return {d.id: {b.name: b for b in per_node.get(d.node, []) if is_nbdbackup_bitmap(b.name)} for d in disks}


def create_actions(disks: Sequence[Disk], new: CheckpointRecord, previous: CheckpointRecord | None,
                   bitmaps: dict[str, dict[str, Bitmap]], twin: str) -> list[Action]:
    """Transaction actions, on every disk: disable the previous active bitmap, add the new one,
    and start its twin afresh (cleared, or added if missing) at the same instant."""
    actions: list[Action] = []
    for d in disks:
        if previous is not None:
            old = bitmaps[d.id].get(previous.bitmap)
            if old is not None and old.recording and not old.inconsistent:
                actions.append(bitmap_disable(d.node, old.name))
        actions.append(bitmap_add(d.node, new.bitmap))
        current = bitmaps[d.id].get(twin)
        if current is None:
            actions.append(bitmap_add(d.node, twin))
        else:
            actions.append(bitmap_clear(d.node, twin))
            if not current.recording:
                actions.append(bitmap_enable(d.node, twin))
    return actions


def delete_actions(plan: chain.DeletePlan, disks: Sequence[Disk], bitmaps: dict[str, dict[str, Bitmap]], twin: str) -> list[Action]:
    """Delete a checkpoint's bitmap the seed's way; when the newest goes, the previous one
    becomes active and its twin takes in the previous one's bits too."""
    actions: list[Action] = []
    for d in disks:
        have = bitmaps.get(d.id, {})
        if plan.drop_twin and twin in have:
            actions.append(("block-dirty-bitmap-remove", {"node": d.node, "name": twin}))
        victim = have.get(plan.remove)
        if victim is None:
            continue
        target = have.get(plan.merge_into) if plan.merge_into else None
        usable = not victim.inconsistent
        if target is not None and not target.inconsistent and usable:
            actions.append(bitmap_merge(d.node, target.name, [victim.name]))
            if plan.enable:
                actions.append(bitmap_enable(d.node, target.name))
                if twin in have and not have[twin].inconsistent:
                    actions.append(bitmap_merge(d.node, twin, [target.name]))
        actions.append(bitmap_remove(d.node, victim.name))
    return actions


def remove_actions(disks: Sequence[Disk], names: Iterable[str], bitmaps: dict[str, dict[str, Bitmap]]) -> list[Action]:
    """Remove the named bitmaps wherever they are."""
    names = set(names)
    return [
        bitmap_remove(d.node, b)
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
    force_new_chain: bool = False  # take over a QEMU whose checkpoints belong to another VM name
    snapshot: BlockNodes | None = None  # the block nodes, if the caller read them already
    _records: list[CheckpointRecord] | None = field(default=None, init=False, repr=False)
    _bitmaps: dict[str, dict[str, Bitmap]] | None = field(default=None, init=False, repr=False)
    reconciled: dict[str, dict[str, Bitmap]] | None = field(default=None, init=False, repr=False)  # the bitmaps as reconcile() leaves them

    @property
    def namespace(self) -> str:
        return bitmap_namespace(self.repo.id)

    @property
    def twin(self) -> str:
        return twin_bitmap(self.namespace)

    def new_record(self, name: str, created: str, chain_id: str) -> CheckpointRecord:
        return CheckpointRecord(name=name, created=created, chain=chain_id, disks=tuple(d.id for d in self.disks),
                                bitmap=checkpoint_bitmap(self.namespace, name))

    def records(self) -> list[CheckpointRecord]:
        """The VM's checkpoint records: read once, then those this object saved."""
        if self._records is None:
            self._records = self.repo.checkpoints(self.vm)
        return list(self._records)

    def bitmaps(self) -> dict[str, dict[str, Bitmap]]:
        """nbdbackup's bitmaps per disk: from the snapshot, or read again after a change."""
        if self._bitmaps is None:
            self._bitmaps = disk_bitmaps(self.session, self.disks, self.snapshot)
            self.snapshot = None  # used once: a later read must see QEMU as it is then
        return self._bitmaps

    def refresh(self) -> None:
        """QEMU's bitmaps changed outside this object (the backup's freeze): read them again when next needed."""
        self._bitmaps = None
        self.snapshot = None

    def _save(self, records: Sequence[CheckpointRecord]) -> None:
        self.repo.save_checkpoints(self.vm, records)
        self._records = list(records)

    def other_owners(self, bitmaps: dict[str, dict[str, Bitmap]] | None = None) -> dict[str, str]:
        """Bitmaps of this repository on the VM's disks that another VM name's checkpoint
        records own (bitmap name -> VM name): the QEMU holds that VM's chain."""
        bitmaps = self.bitmaps() if bitmaps is None else bitmaps
        present = {n for b in bitmaps.values() for n in b if n.startswith(self.namespace)}
        owners: dict[str, str] = {}
        if not present:
            return owners
        for vm in self.repo.vms():
            if vm == self.vm:
                continue
            try:
                theirs = {r.bitmap for r in self.repo.checkpoints(vm)}
            except NbdBackupError as exc:  # cannot tell: assume nothing, say so
                log.warning("cannot read the checkpoints of VM %s: %s", vm, exc)
                continue
            owners.update({name: vm for name in present & theirs})
        return owners

    def check_owner(self, bitmaps: dict[str, dict[str, Bitmap]]) -> dict[str, str]:
        """ChainOfAnotherVM if the QEMU holds another VM name's chain, unless force_new_chain:
        then returns that chain's bitmaps (name -> VM), to be removed (its records stay; its
        next backup here is refused in turn)."""
        owners = self.other_owners(bitmaps)
        if not owners or self.force_new_chain:
            return owners
        others = sorted(set(owners.values()))
        who = " and ".join(repr(v) for v in others)
        raise ChainOfAnotherVM(
            f"this {qemu_identity(self.session)} holds the checkpoints of VM {who}, not of {self.vm!r}: "
            f"nothing was changed",
            hint=f"if it is {others[0]!r}, back it up under that name; if {self.vm!r} is right (renamed VM, copied disks), "
                 f"start a new chain with `nbdbackup full --force-new-chain {self.vm}`",
        )

    def reconcile(self, *, dry_run: bool = False) -> list[str]:
        """Bring records and bitmaps back in step after a crash; returns what was done.
        First of all ChainOfAnotherVM if the QEMU holds another VM name's chain.
        dry_run: change nothing; return what would be done (records() then gives the records
        it would leave; QEMU's bitmaps stay as they are: the plan sees them as the steps would
        leave them, the dirty counts of merges excepted)."""
        done: list[str] = []
        records = self.records()
        bitmaps = self.bitmaps()

        def step(did: str, todo: str, change=None) -> None:
            done.append(todo if dry_run else did)
            if change is not None and not dry_run:
                change()

        def without(names, disks=None) -> dict[str, dict[str, Bitmap]]:
            """The bitmaps as a step that removes names (on disks, default all) leaves them:
            read again, or (dry run) assumed."""
            if not dry_run:
                return self.bitmaps()
            gone = set(names)
            return {d: {n: b for n, b in have.items() if n not in gone or (disks is not None and d not in disks)}
                    for d, have in bitmaps.items()}

        taken = self.check_owner(bitmaps)
        if taken:
            others = " and ".join(repr(v) for v in sorted(set(taken.values())))
            step(f"started a new chain for VM {self.vm!r}: removed the checkpoints of VM {others} from this QEMU",
                 f"remove the checkpoints of VM {others} from this QEMU (a new chain for VM {self.vm!r})",
                 lambda: self._apply(remove_actions(self.disks, taken, bitmaps)))
            bitmaps = without(taken)
        for r in [r for r in records if r.state == "pending"]:
            present = any(r.bitmap in b for b in bitmaps.values())
            if present and self.repo.manifest(self.vm, r.name) is not None:
                records = [replace(x, state="confirmed") if x.name == r.name else x for x in records]
                step(f"confirmed checkpoint {r.name}: its backup had been committed", f"confirm checkpoint {r.name}: its backup was committed")
            else:
                if present and not dry_run:
                    plan = chain.plan_delete(records, r.name)
                    self._apply(delete_actions(plan, self.disks, bitmaps, self.twin))
                    bitmaps = self.bitmaps()
                    records = self._recount(records, plan, bitmaps)
                elif present:  # a dry run: its bitmap would be merged into the previous one and removed
                    plan = chain.plan_delete(records, r.name)
                    bitmaps = _after_delete(without([r.bitmap]), plan)
                    records = [replace(x, counts={}) if x.bitmap == plan.merge_into else x for x in records]  # counts: not known yet
                records = [x for x in records if x.name != r.name]
                step(f"rolled back checkpoint {r.name}: its backup never completed", f"roll back checkpoint {r.name}: its backup never completed")
            if not dry_run:
                self._save(records)
        broken_twins = [(d, b[self.twin]) for d, b in bitmaps.items()
                        if self.twin in b and (b[self.twin].inconsistent or not b[self.twin].persistent)]
        if broken_twins:  # cannot be cleared: removed, and the next full backup starts a new one
            which = ", ".join(d for d, _ in broken_twins)
            step(f"removed the unusable twin bitmap on disk {which}", f"remove the unusable twin bitmap on disk {which}",
                 lambda: self._apply([bitmap_remove(t.node, t.name) for _, t in broken_twins]))
            bitmaps = without([self.twin], {d for d, _ in broken_twins})
        known = {r.bitmap for r in records} | {self.twin}
        orphans = sorted({n for b in bitmaps.values() for n in b if n.startswith(self.namespace)} - known)
        if orphans:
            step(f"removed bitmaps without a checkpoint record: {', '.join(orphans)}",
                 f"remove bitmaps without a checkpoint record: {', '.join(orphans)}",
                 lambda: self._apply(remove_actions(self.disks, orphans, bitmaps)))
        stale = [r for r in records if records and r.chain != records[-1].chain]
        if stale:
            names = ", ".join(r.name for r in stale)
            step(f"removed checkpoints of an older chain: {names}", f"remove checkpoints of an older chain: {names}",
                 lambda: self.drop_chain([r.name for r in stale]))
            records = [r for r in records if r not in stale]
        if dry_run:
            self._records = records  # what the run would plan with
        self.reconciled = bitmaps if dry_run else self.bitmaps()
        for line in done:
            if not dry_run:
                log.warning("%s", line)
        return done

    def add_pending(self, record: CheckpointRecord) -> None:
        self._save([*self.records(), record])

    def discard_pending(self, name: str) -> None:
        """Drop the record of a checkpoint whose bitmaps were never created (the freeze did not happen)."""
        self._save([r for r in self.records() if r.name != name])

    def record_final_counts(self) -> None:
        """Right after the freeze: bitmaps that stopped recording get their final counts."""
        records = self.records()
        needy = {r.name for r in records[:-1] if not r.counts}
        if not needy:
            return
        bitmaps = self.bitmaps()
        self._save([replace(r, counts=_counts(r, bitmaps)) if r.name in needy else r for r in records])

    def confirm(self, name: str) -> None:
        """The backup at name is committed."""
        self.record_final_counts()  # no-op unless the run was interrupted in between
        self._save([replace(r, state="confirmed") if r.name == name else r for r in self.records()])

    def rollback(self, name: str) -> None:
        """Undo a checkpoint whose backup failed: QEMU's bitmaps as before, record gone."""
        if any(r.name == name for r in self.records()):
            self.delete(name)

    def delete(self, name: str) -> None:
        """Delete a checkpoint anywhere in the chain: bitmaps first, record after."""
        records = self.records()
        plan = chain.plan_delete(records, name)
        self._apply(delete_actions(plan, self.disks, self.bitmaps(), self.twin))
        records = self._recount(records, plan, self.bitmaps())
        self._save([r for r in records if r.name != name])

    def _recount(self, records: list[CheckpointRecord], plan: chain.DeletePlan, bitmaps: dict[str, dict[str, Bitmap]]) -> list[CheckpointRecord]:
        """After our merge into plan.merge_into: its new final counts, or none if it records again."""
        return [replace(r, counts={} if plan.enable else _counts(r, bitmaps)) if r.bitmap == plan.merge_into else r for r in records]

    def verify_active(self, active: CheckpointRecord, bitmaps: dict[str, dict[str, Bitmap]] | None = None, *,
                      quiescent: bool = False) -> None:
        """ChainBroken unless the active bitmap equals its twin on every disk (one atomic snapshot)."""
        problem = self.twin_check(active, bitmaps, quiescent=quiescent)
        if problem:
            raise ChainBroken(problem, hint="the chain cannot be trusted: run `nbdbackup full` (or `auto`)")

    def twin_check(self, active: CheckpointRecord, bitmaps: dict[str, dict[str, Bitmap]] | None = None, *,
                   quiescent: bool = False) -> str | None:
        """Why the active bitmap cannot be trusted, judged by its twin, or None (docs/CHAIN.md).

        Not read-only: QEMU copies both, at one instant, into two temporary bitmaps
        per disk (not persistent), which are removed at once; QEMU ends as it was.
        quiescent: nothing writes to the disks (images opened by nbdbackup alone), so the
        counts in bitmaps (the bitmaps now) are already one instant's: no temporary bitmaps."""
        bitmaps = self.bitmaps() if bitmaps is None else bitmaps
        sound = [d for d in self.disks if _usable(bitmaps[d.id].get(active.bitmap)) and _usable(bitmaps[d.id].get(self.twin))]
        if quiescent:
            counts = {d.id: (bitmaps[d.id][active.bitmap].count, bitmaps[d.id][self.twin].count) for d in sound}
        else:
            counts = self._snapshot_counts(sound, active.bitmap, bitmaps) if sound else {}
        for d in self.disks:
            if d.id in active.disks:
                problem = chain.twin_problem(active, d.id, bitmaps[d.id].get(self.twin), counts.get(d.id))
                if problem:
                    return problem
        return None

    def _snapshot_counts(self, disks: Sequence[Disk], active: str, left: dict[str, dict[str, Bitmap]]) -> dict[str, tuple[int, int]]:
        """(active, twin) dirty bytes per disk, copied at one instant into temporary bitmaps.
        left: the bitmaps now, to remove check bitmaps a run killed during a check left behind."""
        a, t = check_bitmaps(self.namespace)
        self._apply([bitmap_remove(d.node, n) for d in disks for n in (a, t) if n in left[d.id]])
        actions: list[Action] = []
        for d in disks:
            for temp, source in ((a, active), (t, self.twin)):
                actions.append(bitmap_add(d.node, temp, persistent=False, disabled=True))
                actions.append(bitmap_merge(d.node, temp, [source]))
        self._apply(actions)
        try:
            snapshot = self.bitmaps()
            return {d.id: (snapshot[d.id][a].count, snapshot[d.id][t].count) for d in disks}
        finally:
            try:
                self._apply([bitmap_remove(d.node, n) for d in disks for n in (a, t)])
                # QEMU's bitmaps are as before the check (the recording ones went on counting, as they always do)
                self._bitmaps = {d: {n: b for n, b in have.items() if n not in (a, t)} for d, have in left.items()}
            except NbdBackupError as exc:  # non-persistent: they go with QEMU anyway
                log.warning("could not remove temporary bitmaps: %s", exc)

    def drop_chain(self, names: Sequence[str]) -> None:
        """Remove whole checkpoints (an old chain after a new full): bitmaps first, records after."""
        gone = set(names)
        self._apply(remove_actions(self.disks, [r.bitmap for r in self.records() if r.name in gone], self.bitmaps()))
        self._save([r for r in self.records() if r.name not in gone])

    def _apply(self, actions: list[Action]) -> None:
        if actions:
            self.refresh()  # also when it fails: QEMU's answer is what counts
            self.session.transaction(actions)


def _after_delete(bitmaps: dict[str, dict[str, Bitmap]], plan: chain.DeletePlan) -> dict[str, dict[str, Bitmap]]:
    """The bitmaps as deleting plan.remove leaves them, as far as a plan needs them (a dry run's
    view): the bitmap merged into records again if it becomes the active one."""
    if not plan.merge_into or not plan.enable:
        return bitmaps
    return {d: {n: replace(b, recording=True) if n == plan.merge_into else b for n, b in have.items()} for d, have in bitmaps.items()}


def _usable(bitmap: Bitmap | None) -> bool:
    """Can be copied into a temporary bitmap (QEMU refuses a busy one)."""
    return bitmap is not None and not bitmap.inconsistent and not bitmap.busy


def _counts(record: CheckpointRecord, bitmaps: dict[str, dict[str, Bitmap]]) -> dict[str, int]:
    return {disk: b[record.bitmap].count for disk, b in bitmaps.items() if record.bitmap in b and disk in record.disks}
