"""The backup plan is decided from facts alone (no QEMU): what to read per disk, and why."""

from __future__ import annotations

import pytest

from nbdbackup.backup import BackupRequest, Facts, make_plan
from nbdbackup.errors import ChainBroken
from nbdbackup.records import Bitmap, CheckpointRecord, Disk
from nbdbackup.repository import Repository
from nbdbackup.repository.memory import MemoryBackend

MiB = 1024 * 1024
DISKS = (Disk("vda", "vda-fmt", 4 * MiB, "qcow2", ""), Disk("vdb", "vdb-fmt", 2 * MiB, "qcow2", ""))


def chain_of_one(count: int = 65536):
    """Checkpoint one, confirmed and active, with sound bitmaps on both disks (no backup in the repository)."""
    record = CheckpointRecord("one", "2026-11-30T00:00:00.000Z", "c1", ("vda", "vdb"), "nbdbackup.ns.one", state="confirmed")
    bitmaps = {d.id: {record.bitmap: Bitmap(d.node, record.bitmap, count, True, True, False, False)} for d in DISKS}
    return (record,), bitmaps


def test_a_full_plan_reads_every_disk_whole():
    plan = make_plan(Repository.open(MemoryBackend(), create=True), BackupRequest("vm1", "full"), "two", Facts(DISKS, (), {}))
    assert (plan.kind, plan.checkpoint, plan.since, plan.notes) == ("full", "two", None, ())
    assert [(p.disk.id, p.merges, p.estimate, p.reason) for p in plan.disks] == [
        ("vda", None, 4 * MiB, "full backup"), ("vdb", None, 2 * MiB, "full backup")]


def test_the_first_auto_backup_is_a_full_one_without_a_note():
    plan = make_plan(Repository.open(MemoryBackend(), create=True), BackupRequest("vm1", "auto"), "one", Facts(DISKS, (), {}))
    assert plan.kind == "full" and plan.notes == ()


def test_a_failed_twin_check_refuses_the_incremental_and_auto_says_why_it_makes_a_full():
    records, bitmaps = chain_of_one()
    facts = Facts(DISKS, records, bitmaps, twin_problem="bitmap X on disk vdb was changed by another tool (cleared?)", twin_checked=True,
                  repairs=("remove bitmaps without a checkpoint record: nbdbackup.ns.stray",))
    repo = Repository.open(MemoryBackend(), create=True)
    with pytest.raises(ChainBroken, match="changed by another tool"):
        make_plan(repo, BackupRequest("vm1", "incremental"), "two", facts)
    plan = make_plan(repo, BackupRequest("vm1", "auto"), "two", facts)
    assert plan.kind == "full" and plan.notes == ("full backup instead of an incremental one: bitmap X on disk vdb was changed by "
                                                  "another tool (cleared?)",)
    assert plan.repairs == facts.repairs and plan.twin_checked


def test_an_incremental_needs_the_backup_at_its_base():
    records, bitmaps = chain_of_one()
    with pytest.raises(ChainBroken, match="no complete backup at checkpoint one"):
        make_plan(Repository.open(MemoryBackend(), create=True), BackupRequest("vm1", "incremental"), "two", Facts(DISKS, records, bitmaps))
