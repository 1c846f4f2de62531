"""Faults around nbdbackup: QEMU dies, the NBD connection drops (backup and restore), the
repository's filesystem fills up or is read-only.

Every failure must be one line on stderr with a non-zero status, leave no
backup visible and no restored image behind, keep older backups restorable,
and the next run must work by itself.
"""

from __future__ import annotations

import os
import random
import signal
import time

import cli
from faults import (
    NOTHING_LEFT,
    SIZES,
    Run,
    assert_no_partial_backups,
    assert_one_line_error,
    assert_recovers,
    assert_restores,
    backup,
    backups,
    bitmap_state,
    block_names,
    child_pids,
    command_name,
    grow_filesystem,
    prepare,
    qemu_leftovers,
    records,
    remount,
    scratch_left,
    small_filesystem,
    snapshot,
    write_data,
)

KiB, MiB = 1024, 1024 * 1024



# -- QEMU dies ------------------------------------------------------------------------


def test_qemu_killed_while_a_backup_reads(vm_factory, repo, tmp_path):
    """SIGKILL to QEMU mid-backup: one error line, no backup; after QEMU restarts,
    `incremental` refuses the broken chain, `auto` makes a full, the next incremental is exact."""
    vm, at_one = prepare(vm_factory, repo)
    vm.restart()  # "one"'s bitmaps are now in the images: they come back inconsistent after the kill
    vm.write("vdb", 2 * MiB, 64 * KiB, 0x23)
    backup(repo, vm, "incremental", "--checkpoint", "two")
    at_two = snapshot(vm)
    vm.write("vda", 6 * MiB, 64 * KiB, 0x15)
    with Run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "hung", pause="read") as run:
        run.wait_paused()
        vm.kill()
        result = run.finish(timeout=90)
    assert_one_line_error(result)
    assert backups(repo) == ["one", "two"]

    vm.start()
    vm.write("vdb", 3 * MiB, 64 * KiB, 0x24)
    proc = cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, expect=4)
    assert "nbdbackup." in proc.stderr, proc.stderr
    assert backups(repo) == ["one", "two"]
    proc = cli.run(repo, "auto", "vm1", "--qmp", vm.qmp_socket)
    full = proc.stdout.strip()
    assert "full" in proc.stderr, proc.stderr
    assert backups(repo) == ["one", "two", full]
    assert_restores(repo, vm, full, snapshot(vm), tmp_path / "full")
    assert_restores(repo, vm, "one", at_one, tmp_path / "one")
    assert_restores(repo, vm, "two", at_two, tmp_path / "two")
    assert [r["name"] for r in records(repo)] == [full]  # the broken chain's records and bitmaps are gone
    assert bitmap_state(vm) == {d: [(records(repo)[0]["bitmap"], True, True)] for d in vm.disks}

    vm.write("vda", 7 * MiB, 64 * KiB, 0x16)
    assert_recovers(repo, vm, tmp_path / "next")
    assert cli.backups(repo)[-1]["kind"] == "incremental" and cli.backups(repo)[-1]["since"] == full
    assert_no_partial_backups(repo)
    # The failure was reported in one line, not with a warning per cleanup step that could not reach QEMU.
    assert len(result.stderr.splitlines()) == 1, result.describe()


def test_qemu_quitting_cleanly_while_a_backup_reads_keeps_the_chain(vm_factory, repo, tmp_path):
    """QEMU quits (SIGTERM-like, bitmaps saved, the new checkpoint's too) while nbdbackup reads:
    one error line, no backup; after QEMU restarts, the next run rolls the pending checkpoint
    back the seed's way (its bitmap merged into the previous one, and the twin with it) and
    the chain goes on: an incremental, exact."""
    vm, at_one = prepare(vm_factory, repo)
    with Run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "hung", pause="read") as run:
        run.wait_paused()
        vm.stop()
        result = run.finish(timeout=90)
    assert_one_line_error(result)
    assert backups(repo) == ["one"]
    vm.start()
    vm.write("vdb", 3 * MiB, 64 * KiB, 0x24)
    proc = cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "two")
    assert "rolled back checkpoint hung" in proc.stderr, proc.stderr
    assert cli.backups(repo)[-1]["since"] == "one"
    assert_restores(repo, vm, "two", snapshot(vm), tmp_path / "two")
    assert [r["name"] for r in records(repo)] == ["one", "two"]


# -- the NBD connection drops -----------------------------------------------------------


def test_export_deleted_under_the_reader(vm_factory, repo, tmp_path):
    """Another client removes our export (block-export-del mode hard) while nbdbackup reads it."""
    vm, at_one = prepare(vm_factory, repo)
    before = bitmap_state(vm)
    with Run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "hung", pause="read") as run:
        run.wait_paused()
        vm.qmp("block-export-del", id=block_names(repo).export("vda"), mode="hard")
        result = run.finish()
    line = assert_one_line_error(result)
    assert "vda" in line, line
    assert qemu_leftovers(vm) == NOTHING_LEFT
    assert bitmap_state(vm) == before
    assert backups(repo) == ["one"] and scratch_left(repo) == []
    assert [r["name"] for r in records(repo)] == ["one"]
    assert_restores(repo, vm, "one", at_one, tmp_path / "one")
    assert_recovers(repo, vm, tmp_path / "next")
    assert_no_partial_backups(repo)


def full_backup_for_restore(vm_factory, repo):
    """A backup whose restore makes several NBD writes per disk."""
    vm = vm_factory(SIZES)
    vm.start()
    for i in range(4):
        vm.write("vda", i * 2 * MiB, 256 * KiB, 0x30 + i)
    vm.write("vdb", 1 * MiB, 1 * MiB, 0x40)
    return vm, backup(repo, vm, "full")


def daemon_alive(pid: int) -> bool:
    return command_name(pid).endswith("qemu-storage-daemon")  # "" once gone (or a zombie)


def storage_daemons(run):
    return [pid for pid in child_pids(run.pid) if command_name(pid).endswith("qemu-storage-daemon")]


def test_storage_daemon_killed_while_restoring(vm_factory, repo, tmp_path):
    """The restore target's qemu-storage-daemon dies mid-write: one error line, no image left
    in the output directory (not even a partial one), and a second restore works."""
    vm, name = full_backup_for_restore(vm_factory, repo)
    out = tmp_path / "out"
    with Run(repo, "restore", "vm1", "--to", name, "--output", out, pause="write", after=2) as run:
        run.wait_paused()
        [daemon] = storage_daemons(run)
        os.kill(daemon, signal.SIGKILL)
        result = run.finish()
    assert_one_line_error(result, 8)
    assert sorted(p.name for p in out.iterdir()) == []
    assert_restores(repo, vm, name, snapshot(vm), tmp_path / "again")


def test_sigterm_while_restoring_removes_everything(vm_factory, repo, tmp_path):
    vm, name = full_backup_for_restore(vm_factory, repo)
    out = tmp_path / "out"
    with Run(repo, "restore", "vm1", "--to", name, "--output", out, pause="write", after=2) as run:
        run.wait_paused()
        [daemon] = storage_daemons(run)
        run.signal(signal.SIGTERM)
        result = run.finish()
    assert_one_line_error(result, 143)
    assert sorted(p.name for p in out.iterdir()) == []
    assert not daemon_alive(daemon), "qemu-storage-daemon outlived the restore"


def test_sigkill_while_restoring_leaves_no_image_and_no_daemon(vm_factory, repo, tmp_path):
    """nbdbackup killed mid-restore: no image appears under its final name, and the
    qemu-storage-daemon it started does not live on (holding the image and its socket)."""
    vm, name = full_backup_for_restore(vm_factory, repo)
    out = tmp_path / "out"
    with Run(repo, "restore", "vm1", "--to", name, "--output", out, pause="write", after=2) as run:
        run.wait_paused()
        [daemon] = storage_daemons(run)
        run.kill()
        assert not [p.name for p in out.iterdir() if not p.name.startswith(".")]
        deadline = time.monotonic() + 2  # time for the daemon to notice
        while (alive := daemon_alive(daemon)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not alive, f"qemu-storage-daemon (pid {daemon}) still runs after nbdbackup was killed"
    assert_restores(repo, vm, name, snapshot(vm), tmp_path / "again")


# -- the repository's filesystem fills up ---------------------------------------------------


def test_repository_filesystem_full(vm_factory, tmp_path):
    """A 20 MiB tmpfs as the repository; a backup of more (incompressible) data than fits fails
    with exit 7 and one line; the older backup restores identically; with more room the next run works."""
    rng = random.Random(7)
    vm = vm_factory({"vda": 48 * MiB})
    vm.start()
    write_data(vm, "vda", 0, rng.randbytes(6 * MiB))
    with small_filesystem(tmp_path / "small", 20) as mount:
        repo = mount / "repo"
        backup(repo, vm, "full", "--checkpoint", "one")
        at_one = snapshot(vm)
        before = bitmap_state(vm)
        write_data(vm, "vda", 8 * MiB, rng.randbytes(20 * MiB))

        proc = cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, expect=7)
        assert "full" in proc.stderr, proc.stderr
        assert qemu_leftovers(vm) == NOTHING_LEFT
        assert bitmap_state(vm) == before
        assert backups(repo) == ["one"]
        assert_restores(repo, vm, "one", at_one, tmp_path / "one")
        # no temporary files left behind (a ".*.tmp-*" per failed write would eat the room)
        temporaries = [str(p) for p in repo.rglob(".*") if ".tmp-" in p.name]
        assert temporaries == []

        grow_filesystem(mount, 64)
        assert_recovers(repo, vm, tmp_path / "next")
        assert_no_partial_backups(repo)


def test_read_only_repository(vm_factory, tmp_path):
    """The repository's filesystem is read-only: restores and `list` work; backups fail with
    exit 7 and one line, the VM as before; read-write again, the next run works."""
    vm = vm_factory({"vda": 4 * MiB})
    vm.start()
    vm.write("vda", 0, 1 * MiB, 0x11)
    with small_filesystem(tmp_path / "small", 20) as mount:
        repo = mount / "repo"
        backup(repo, vm, "full", "--checkpoint", "one")
        at_one = snapshot(vm)
        before = bitmap_state(vm)
        vm.write("vda", 2 * MiB, 64 * KiB, 0x12)
        remount(mount, "ro")
        assert_restores(repo, vm, "one", at_one, tmp_path / "one")  # e.g. from a read-only copy
        assert backups(repo) == ["one"]
        for kind in ("incremental", "full", "auto"):
            proc = cli.run(repo, kind, "vm1", "--qmp", vm.qmp_socket, expect=7)
            assert "read-only" in proc.stderr, proc.stderr
        assert qemu_leftovers(vm) == NOTHING_LEFT and bitmap_state(vm) == before
        remount(mount, "rw")
        assert_recovers(repo, vm, tmp_path / "next")
        assert_no_partial_backups(repo)
