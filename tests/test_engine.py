"""The engine decides what a run exits with; the CLI only prints and raises it (no QEMU needed)."""

from __future__ import annotations

from nbdbackup.capture import Tuning
from nbdbackup.config import VMConfig
from nbdbackup.engine import BackupOutcome, BatchOutcome, restore_tuning
from nbdbackup.errors import ChainBroken, RepositoryDamaged, SomeRunsFailed, VMUnreachable
from nbdbackup.prune import GarbageReport, PruneOutcome, PruneReport
from nbdbackup.verify import BackupCheck, Problem, VerifyReport


def test_auto_all_exits_with_the_worst_code_and_names_the_failed_vms():
    batch = BatchOutcome((BackupOutcome("a", "auto", failure=ChainBroken("x")), BackupOutcome("b", "auto"),
                          BackupOutcome("c", "auto", failure=VMUnreachable("gone"))))
    assert batch.failed == ["a", "c"]
    error = batch.error
    assert isinstance(error, SomeRunsFailed) and error.exit_code == 4 and error.message == "2 of 3 VMs failed: a, c"
    assert BatchOutcome((BackupOutcome("a", "auto"),)).error is None


def test_prune_exits_for_damage_first_then_for_the_worst_failure():
    report = PruneReport((), dry_run=False)
    damaged = GarbageReport(False, note="damaged", damaged=True)
    assert isinstance(PruneOutcome({"a": report}, {"b": VMUnreachable("x")}, damaged).error, RepositoryDamaged)
    failed = PruneOutcome({"a": report}, {"b": VMUnreachable("x"), "c": ChainBroken("y")}, GarbageReport(True)).error
    assert isinstance(failed, SomeRunsFailed) and failed.exit_code == 4 and "b, c" in failed.message
    assert PruneOutcome({"a": report}, garbage=GarbageReport(False, note="busy")).error is None


def test_verify_exits_6_naming_the_damaged_backups():
    report = VerifyReport("vm1", (BackupCheck("one"), BackupCheck("two", (Problem("manifest unreadable"),))), 0, 0, 0, 0)
    assert isinstance(report.error, RepositoryDamaged) and report.error.message == "1 of 2 backups of vm1 is damaged: two"
    assert VerifyReport("vm1", (BackupCheck("one"),), 0, 0, 0, 0).error is None


def test_a_restore_uses_the_vms_data_path_settings_when_set():
    assert restore_tuning(VMConfig("vm1")) == Tuning()
    tuned = restore_tuning(VMConfig("vm1", workers=2, chunk_mib=1, queue_depth=3, compression=9))
    assert (tuned.workers, tuned.chunk_size, tuned.depth) == (2, 1024 * 1024, 3)
