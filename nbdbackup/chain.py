"""Checkpoint chain maths: pure functions over records and bitmap facts.

The seed thread's scheme: checkpoint C_i owns bitmap B_i.  Only the newest
bitmap records; B_i (i < n) holds the changes from C_i to C_{i+1}.  So

    changes since C_k   = B_k | B_{k+1} | ... | B_n
    delete C_i (i < n)  : merge B_i into B_{i-1}, remove B_i   (oldest: just remove)
    delete C_n          : merge B_n into B_{n-1}, enable B_{n-1}, remove B_n

Nothing here talks to QEMU; checkpoints.py carries the decisions out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ChainBroken, CheckpointUnknown
from .names import twin_bitmap
from .records import Bitmap, CheckpointRecord

# Checkpoint states, as `nbdbackup checkpoints` shows them.
OK, MISSING, INCONSISTENT, BUSY, ALTERED = "ok", "missing", "inconsistent", "busy", "altered"
PENDING, ORPHAN, FOREIGN = "pending", "orphan", "foreign"
# A checkpoint with several problems shows the first of these among them.
PROBLEM_STATES = (MISSING, INCONSISTENT, BUSY, ALTERED)


@dataclass(frozen=True)
class BitmapProblem:
    """Why a checkpoint's bitmap on one disk cannot be trusted: the state it gives the checkpoint, and the words."""

    state: str  # one of PROBLEM_STATES
    text: str


@dataclass(frozen=True)
class DeletePlan:
    """Delete bitmap `remove`; first merge it into bitmap `merge_into` (if any), then enable that if `enable`."""

    remove: str
    merge_into: str | None
    enable: bool
    drop_twin: bool = False  # the only checkpoint goes: its twin goes too (no active bitmap is left to pair with)


def resolve(records: Sequence[CheckpointRecord], name: str) -> CheckpointRecord:
    """The record called name ('latest' = newest confirmed one)."""
    confirmed = [r for r in records if r.state == "confirmed"]
    if name == "latest":
        if not confirmed:
            raise CheckpointUnknown("there is no checkpoint yet", hint="run `nbdbackup full VM` first")
        return confirmed[-1]
    for r in records:
        if r.name == name:
            return r
    known = ", ".join(r.name for r in confirmed[-5:]) or "none"
    raise CheckpointUnknown(f"checkpoint {name!r} is unknown", hint=f"newest checkpoints: {known}")


def since_chain(records: Sequence[CheckpointRecord], since: str) -> list[CheckpointRecord]:
    """Records whose bitmaps together hold the changes since `since`, oldest first."""
    names = [r.name for r in records]
    i = names.index(since)
    return list(records[i:])


def plan_delete(records: Sequence[CheckpointRecord], name: str) -> DeletePlan:
    i = [r.name for r in records].index(name)
    if i == 0:
        return DeletePlan(remove=records[i].bitmap, merge_into=None, enable=False, drop_twin=len(records) == 1)
    return DeletePlan(remove=records[i].bitmap, merge_into=records[i - 1].bitmap, enable=(i == len(records) - 1))


def bitmap_problem(record: CheckpointRecord, disk_id: str, bitmap: Bitmap | None, *, active: bool) -> BitmapProblem | None:
    """Why this disk's bitmap for record cannot be trusted, or None.

    A bitmap that stopped recording must still hold the dirty bytes recorded
    when it stopped (record.counts): clearing or merging by another tool shows.
    """
    name = record.bitmap
    if bitmap is None:
        return BitmapProblem(MISSING, f"bitmap {name} is missing on disk {disk_id}")
    if bitmap.inconsistent:
        return BitmapProblem(INCONSISTENT, f"bitmap {name} on disk {disk_id} is inconsistent (QEMU did not shut down cleanly)")
    if not bitmap.persistent:
        return BitmapProblem(ALTERED, f"bitmap {name} on disk {disk_id} is not persistent")
    if bitmap.busy:
        return BitmapProblem(BUSY, f"bitmap {name} on disk {disk_id} is busy (in use by another operation)")
    if bitmap.recording != active:
        state = "recording" if bitmap.recording else "disabled"
        want = "recording" if active else "disabled"
        return BitmapProblem(ALTERED, f"bitmap {name} on disk {disk_id} is {state} but should be {want} (changed by another tool?)")
    expected = record.counts.get(disk_id)
    if not active and expected is not None and bitmap.count != expected:
        return BitmapProblem(ALTERED, f"bitmap {name} on disk {disk_id} was changed by another tool: it held {expected} "
                                      f"dirty bytes when it stopped recording, it holds {bitmap.count} now")
    return None


def twin_problem(active: CheckpointRecord, disk_id: str, twin: Bitmap | None, counts: tuple[int, int] | None) -> str | None:
    """Why the active bitmap on this disk cannot be trusted, judged by its twin.

    counts: (active, twin) dirty bytes, snapshotted at one instant.
    """
    if twin is None:
        return f"the twin bitmap of checkpoint {active.name} is missing on disk {disk_id}"
    if twin.inconsistent or not twin.persistent or not twin.recording:
        return f"the twin bitmap {twin.name} on disk {disk_id} is unusable (inconsistent, disabled or not persistent)"
    if counts is not None and counts[0] != counts[1]:
        return (f"bitmap {active.bitmap} on disk {disk_id} was changed by another tool (cleared?): it holds {counts[0]} "
                f"dirty bytes, its twin {counts[1]}")
    return None


def check_since(
    records: Sequence[CheckpointRecord],
    since: CheckpointRecord,
    disk_bitmaps: dict[str, dict[str, Bitmap]],
) -> None:
    """Raise ChainBroken unless every bitmap from `since` to the newest is sound on every disk
    that existed at `since` and still exists.  disk_bitmaps: disk id -> bitmap name -> Bitmap."""
    if since.state != "confirmed":
        raise ChainBroken(f"checkpoint {since.name} was never completed")
    chain = since_chain(records, since.name)
    if chain[0].chain != chain[-1].chain:
        raise ChainBroken(f"checkpoint {since.name} belongs to an older chain", hint="a full backup started a new chain since; run `nbdbackup full`")
    for i, record in enumerate(chain):
        if record.state != "confirmed":
            raise ChainBroken(f"checkpoint {record.name} was never completed")
        for disk_id in since.disks:
            if disk_id not in disk_bitmaps:
                continue  # the disk was removed since; nothing to read
            if disk_id not in record.disks:
                raise ChainBroken(f"disk {disk_id} was not part of checkpoint {record.name}")
            problem = bitmap_problem(record, disk_id, disk_bitmaps[disk_id].get(record.bitmap), active=(i == len(chain) - 1))
            if problem:
                raise ChainBroken(problem.text, hint="the chain is broken from there: run `nbdbackup full` (or `auto`)")


@dataclass(frozen=True)
class CheckpointStatus:
    """One row of `nbdbackup checkpoints`."""

    name: str
    created: str
    state: str  # ok | missing | inconsistent | altered | busy | pending | orphan | foreign
    active: bool  # the newest checkpoint: its bitmaps record guest writes now
    usable: bool  # an incremental --since this checkpoint would be accepted
    dirty_bytes: dict[str, int]  # per disk: bytes its bitmap marks (changes until the next checkpoint)
    problems: tuple[str, ...] = ()


def assess(records: Sequence[CheckpointRecord], disk_bitmaps: dict[str, dict[str, Bitmap]], namespace: str,
           others: dict[str, str] | None = None) -> list[CheckpointStatus]:
    """The chain as QEMU and the repository see it, oldest first; then bitmaps of
    this repository's namespace without a record (orphan), those another VM name's
    records own (others: bitmap -> VM; foreign) and those of another repository (foreign)."""
    others = others or {}
    rows: list[CheckpointStatus] = []
    for i, r in enumerate(records):
        newest = i == len(records) - 1
        problems: list[BitmapProblem] = []
        dirty = {}
        for disk_id in r.disks:
            if disk_id not in disk_bitmaps:
                continue
            b = disk_bitmaps[disk_id].get(r.bitmap)
            if b is not None:
                dirty[disk_id] = b.count
            problem = bitmap_problem(r, disk_id, b, active=newest)
            if problem:
                problems.append(problem)
        if r.state == "pending":
            state = PENDING
        elif not problems:
            state = OK
        else:
            state = next(s for s in PROBLEM_STATES if any(p.state == s for p in problems))
        rows.append(CheckpointStatus(r.name, r.created, state, newest and state == OK, False, dirty, tuple(p.text for p in problems)))
    # usable: this one and every later one is ok, all in the newest chain
    usable_from = len(rows)
    while usable_from > 0 and rows[usable_from - 1].state == OK and records[usable_from - 1].chain == records[-1].chain:
        usable_from -= 1
    rows = [CheckpointStatus(**{**row.__dict__, "usable": i >= usable_from}) for i, row in enumerate(rows)]
    known = {r.bitmap for r in records} | {twin_bitmap(namespace)}
    unknown: dict[str, dict[str, int]] = {}
    for disk_id, bitmaps in disk_bitmaps.items():
        for name, b in bitmaps.items():
            if name not in known:
                unknown.setdefault(name, {})[disk_id] = b.count
    for name, dirty in sorted(unknown.items()):
        if name in others:
            rows.append(CheckpointStatus(name, "", FOREIGN, False, False, dirty,
                                         (f"bitmap {name} belongs to VM {others[name]} of this repository; left alone",)))
        elif name.startswith(namespace):
            rows.append(CheckpointStatus(name[len(namespace):], "", ORPHAN, False, False, dirty,
                                         (f"bitmap {name} has no checkpoint record; the next backup removes it",)))
        else:
            rows.append(CheckpointStatus(name, "", FOREIGN, False, False, dirty,
                                         (f"bitmap {name} belongs to another nbdbackup repository; left alone",)))
    return rows
