"""nbdbackup killed (SIGKILL) or stopped (SIGINT, SIGTERM) at every stage of a backup.

Each run pauses at a stage (tests/faults.py: freeze, export, read, index,
manifest, confirm), the test checks that it really is at that stage through
the harness monitor and the repository, lets the guest write meanwhile, and
then injects the signal. Afterwards:

* no partial backup is visible, older backups restore identically;
* SIGINT/SIGTERM: exit 130/143, one line, and the VM exactly as before (no
  export, job, nbdbackup-* node or temporary bitmap; the same checkpoint
  bitmaps in the same recording state);
* SIGKILL: the next `incremental` (or `auto`) removes what the killed run left in QEMU
  and in the repository, and its backup restores byte for byte what the
  guest wrote, including the writes made while the killed run hung (those
  went to the killed checkpoint's bitmap, which must be merged back).
"""

from __future__ import annotations

import signal
import time

import pytest
from faults import (
    AFTER,
    NOTHING_LEFT,
    Run,
    assert_no_partial_backups,
    assert_one_line_error,
    assert_recovers,
    assert_restores,
    backups,
    bitmap_state,
    block_names,
    manifest,
    prepare,
    qemu_leftovers,
    records,
    scratch_left,
    snapshot,
    twin_state,
)

KiB, MiB = 1024, 1024 * 1024



def check_stage(vm, repo, stage: str, before) -> None:
    """The paused run is where the stage says, as QEMU and the repository show it."""
    left = qemu_leftovers(vm)
    pending = [r for r in records(repo) if r["state"] == "pending"]
    assert [r["name"] for r in pending] == ["hung"], records(repo)
    folder = repo / "vms" / "vm1" / "backups" / "hung"
    files = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
    new_bitmap = pending[0]["bitmap"]
    bn = block_names(repo)
    if stage == "freeze":  # fleece nodes added, the transaction not yet sent
        assert left["nodes"] == sorted([bn.fleece("vda"), bn.fleece("vdb")]) and left["jobs"] == [], left
        assert bitmap_state(vm) == before
        return
    assert new_bitmap in [name for name, _, _ in bitmap_state(vm)["vda"]]
    if stage == "export":  # the transaction ran: jobs and the new bitmap, no export yet
        assert left["jobs"] == sorted([bn.job("vda"), bn.job("vdb")]) and left["exports"] == [], left
    elif stage == "read":  # exported, being read, nothing written but chunks
        assert sorted(left["exports"]) == sorted([bn.export("vda"), bn.export("vdb")]), left
        assert files == []
    elif stage == "index":  # vda's index written, vdb read, no manifest
        assert files == ["vda.index"], files
    elif stage == "manifest":  # every index written and synced, no manifest
        assert files == ["vda.index", "vdb.index"], files
    elif stage == "confirm":  # committed, record still pending
        assert files == ["manifest.json", "vda.index", "vdb.index"], files


def active_count(vm, repo, disk: str) -> int:
    """Dirty bytes of the newest checkpoint's bitmap on disk."""
    [count] = [b["count"] for b in vm.bitmaps(disk) if b.get("name") == records(repo)[-1]["bitmap"]]
    return count


def assert_chain_bitmaps(vm, repo) -> None:
    """QEMU holds exactly one bitmap per record on every disk; only the newest one records."""
    recs = records(repo)
    assert all(r["state"] == "confirmed" for r in recs), recs
    want = sorted((r["bitmap"], r is recs[-1], True) for r in recs)
    assert bitmap_state(vm) == {d: want for d in vm.disks}


@pytest.mark.parametrize("stage", ["freeze", "export", "read", "index", "manifest", "confirm"])
def test_sigkill_at_each_stage_then_the_next_incremental_recovers(vm_factory, repo, tmp_path, stage):
    vm, at_one = prepare(vm_factory, repo)
    before = bitmap_state(vm)
    at_freeze = snapshot(vm)
    with Run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "hung", pause=stage, after=AFTER.get(stage, 1)) as run:
        run.wait_paused()
        check_stage(vm, repo, stage, before)
        vm.write("vda", 2 * MiB, 64 * KiB, 0x15)  # the guest goes on while nbdbackup hangs
        vm.write("vdb", 2 * MiB, 64 * KiB, 0x23)
        run.kill()

    if stage == "confirm":  # the manifest was durable: the backup exists and is whole
        assert backups(repo) == ["one", "hung"]
        assert_restores(repo, vm, "hung", at_freeze, tmp_path / "hung")
    else:
        assert backups(repo) == ["one"]
    assert_restores(repo, vm, "one", at_one, tmp_path / "one")

    kind = "auto" if stage in ("read", "manifest") else "incremental"  # both recover; auto without falling back to full
    name = assert_recovers(repo, vm, tmp_path / "next", kind)
    assert manifest(repo, name)["kind"] == "incremental"
    assert manifest(repo, name)["since"] == ("hung" if stage == "confirm" else "one")
    assert [r["name"] for r in records(repo)] == (["one", "hung", name] if stage == "confirm" else ["one", name])
    assert_chain_bitmaps(vm, repo)
    assert_no_partial_backups(repo)  # the killed run's folder is gone too


def wait_for_handler(run, name: str) -> None:
    """Until nbdbackup says it got the signal (its handler ran)."""
    deadline = time.monotonic() + 10
    while f"{name} received" not in (run.dir / "stderr").read_text():
        assert run.proc.poll() is None, run.finish().describe()
        assert time.monotonic() < deadline, "nbdbackup did not report the signal"
        time.sleep(0.005)


# SIGINT while reading: tests/test_full_backup.py::test_sigint_during_full_backup_leaves_nothing_behind
CASES = [(stage, sig) for stage in ("freeze", "export", "read", "index") for sig in (signal.SIGINT, signal.SIGTERM)
         if (stage, sig) != ("read", signal.SIGINT)]


@pytest.mark.parametrize("stage,signum", CASES, ids=[f"{s}-{signal.Signals(g).name}" for s, g in CASES])
def test_signal_at_each_stage_aborts_and_leaves_the_vm_as_before(vm_factory, repo, tmp_path, stage, signum):
    vm, at_one = prepare(vm_factory, repo)
    before = bitmap_state(vm)
    name = signal.Signals(signum).name
    with Run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "hung", pause=stage, after=AFTER.get(stage, 1)) as run:
        run.wait_paused()
        check_stage(vm, repo, stage, before)
        vm.write("vda", 2 * MiB, 64 * KiB, 0x15)
        run.signal(signum)
        wait_for_handler(run, name)
        result = run.finish()

    line = assert_one_line_error(result, 128 + signum)
    assert name in line, result.describe()
    assert qemu_leftovers(vm) == NOTHING_LEFT
    assert bitmap_state(vm) == before  # the checkpoint rolled back, the old bitmap records again
    assert twin_state(vm) == {d: [(True, True, active_count(vm, repo, d))] for d in vm.disks}  # the twin as before: recording what the active one does
    assert backups(repo) == ["one"] and scratch_left(repo) == []
    assert [r["name"] for r in records(repo)] == ["one"]
    assert_restores(repo, vm, "one", at_one, tmp_path / "one")
    # Nothing the guest wrote is lost for the next incremental (since "one").
    assert_recovers(repo, vm, tmp_path / "next")
    assert_no_partial_backups(repo)  # the aborted run's own folder is gone too


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_while_the_manifest_is_written_gives_a_consistent_outcome(vm_factory, repo, tmp_path, signum):
    """Past the last cancellation point the backup is either completed (exit 0, listed,
    restorable) or abandoned (exit 128+n, nothing listed, VM as before); never a mix."""
    vm, at_one = prepare(vm_factory, repo)
    before = bitmap_state(vm)
    at_freeze = snapshot(vm)
    with Run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "hung", pause="manifest") as run:
        run.wait_paused()
        check_stage(vm, repo, "manifest", before)
        run.signal(signum)
        wait_for_handler(run, signal.Signals(signum).name)
        result = run.finish()

    assert qemu_leftovers(vm) == NOTHING_LEFT and scratch_left(repo) == []
    if result.returncode == 0:
        assert result.stdout.strip() == "hung", result.describe()
        assert backups(repo) == ["one", "hung"]
        assert_chain_bitmaps(vm, repo)
        assert_restores(repo, vm, "hung", at_freeze, tmp_path / "hung")
    else:
        assert_one_line_error(result, 128 + signum)
        assert backups(repo) == ["one"] and bitmap_state(vm) == before
    print(f"{signal.Signals(signum).name} while writing the manifest: exit {result.returncode}")
    assert_recovers(repo, vm, tmp_path / "next")
    assert_no_partial_backups(repo)
