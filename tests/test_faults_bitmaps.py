"""Another tool changes the disks' dirty bitmaps between two backups (through the harness monitor).

* Our bitmaps removed, disabled, enabled or cleared: the incremental that would rely on
  them exits 4 naming the bitmap, the disk and the problem, writes nothing and changes
  nothing in QEMU; `auto` makes a full backup and the chain goes on exactly.  A cleared
  bitmap is caught by its recorded count (disabled bitmaps) or by its twin (the active one).
* A bitmap of our namespace without a record is removed by the next run.
* Bitmaps of other tools are never touched and break nothing.
"""

from __future__ import annotations

import json

import cli
import pytest
from faults import (
    NOTHING_LEFT,
    assert_recovers,
    assert_restores,
    backup,
    backups,
    bitmap_state,
    qemu_leftovers,
    records,
    snapshot,
    twin_state,
)

KiB, MiB = 1024, 1024 * 1024
SIZES = {"vda": 8 * MiB, "vdb": 4 * MiB + 512}


def two_checkpoints(vm_factory, repo):
    """Checkpoints one (disabled) and two (active), then guest writes on both disks."""
    vm = vm_factory(SIZES)
    vm.start()
    vm.write("vda", 0, 1 * MiB, 0x11)
    vm.write("vdb", 0, 512 * KiB, 0x21)
    backup(repo, vm, "full", "--checkpoint", "one")
    vm.write("vda", 2 * MiB, 64 * KiB, 0x12)
    backup(repo, vm, "incremental", "--checkpoint", "two")
    vm.write("vda", 3 * MiB, 64 * KiB, 0x13)
    vm.write("vdb", 1 * MiB, 64 * KiB, 0x22)
    bitmap = {r["name"]: r["bitmap"] for r in records(repo)}
    return vm, bitmap


def tamper(vm, action: str, bitmap: str) -> None:
    vm.qmp(f"block-dirty-bitmap-{action}", node=vm.disks["vda"].node, name=bitmap)


CASES = [
    # (what another tool does, to which checkpoint's bitmap, incremental since, words in the error)
    ("remove", "two", None, "missing"),
    ("disable", "two", None, "disabled but should be recording"),
    ("remove", "one", "one", "missing"),
    ("enable", "one", "one", "recording but should be disabled"),
    ("clear", "two", None, "changed by another tool"),
    ("clear", "one", "one", "changed by another tool"),
]


@pytest.mark.parametrize("action,victim,since,words", CASES, ids=[f"{a}-{v}" for a, v, _, _ in CASES])
def test_bitmap_changed_by_another_tool_is_refused_and_auto_recovers(vm_factory, repo, tmp_path, action, victim, since, words):
    vm, bitmap = two_checkpoints(vm_factory, repo)
    tamper(vm, action, bitmap[victim])
    state = bitmap_state(vm)

    args = ("--since", since) if since else ()
    proc = cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, *args, expect=4)
    assert bitmap[victim] in proc.stderr and "vda" in proc.stderr and words in proc.stderr, proc.stderr
    assert backups(repo) == ["one", "two"]
    assert bitmap_state(vm) == state and qemu_leftovers(vm) == NOTHING_LEFT  # nothing changed

    rows = json.loads(cli.run(repo, "checkpoints", "vm1", "--qmp", vm.qmp_socket, "--json").stdout)
    assert [r["state"] for r in rows if r["name"] == victim] == ["missing" if action == "remove" else "altered"]

    if since is None:  # auto cannot continue the chain: a full backup, with the reason on stderr
        proc = cli.run(repo, "auto", "vm1", "--qmp", vm.qmp_socket)
        assert "full" in proc.stderr and bitmap[victim] in proc.stderr, proc.stderr
        assert cli.backups(repo)[-1]["kind"] == "full"
        assert_restores(repo, vm, proc.stdout.strip(), snapshot(vm), tmp_path / "auto")
        new = records(repo)
        assert len(new) == 1 and bitmap_state(vm) == {d: [(new[0]["bitmap"], True, True)] for d in vm.disks}
    vm.write("vda", 4 * MiB, 64 * KiB, 0x14)
    vm.write("vdb", 2 * MiB, 64 * KiB, 0x23)
    assert_recovers(repo, vm, tmp_path / "next", "auto")
    assert cli.backups(repo)[-1]["kind"] == "incremental"


def test_writes_before_another_tool_cleared_our_active_bitmap_reach_the_next_backup(vm_factory, repo, tmp_path):
    """block-dirty-bitmap-clear on our active bitmap erases the record of the guest's writes
    since the last backup; QEMU then shows an ordinary bitmap with no changes.  The twin
    still holds them: the incremental refuses, and `auto`'s full backup holds the writes."""
    vm, bitmap = two_checkpoints(vm_factory, repo)
    tamper(vm, "clear", bitmap["two"])
    result = cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "three", expect=4)
    assert "cleared" in result.stderr and "vda" in result.stderr
    cli.run(repo, "auto", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "three")
    assert cli.backups(repo)[-1]["kind"] == "full"
    assert_restores(repo, vm, "three", snapshot(vm), tmp_path / "three")


def test_the_twin_follows_the_active_bitmap_through_deletes(vm_factory, repo, tmp_path):
    """Deleting the newest checkpoint makes the previous one active again: its twin takes in
    its bits, so the next incremental is accepted and exact."""
    vm, bitmap = two_checkpoints(vm_factory, repo)
    cli.run(repo, "delete", "vm1", "two", "--qmp", vm.qmp_socket)
    vm.write("vdb", 2 * MiB, 64 * KiB, 0x23)
    backup(repo, vm, "incremental", "--checkpoint", "three")
    assert cli.backups(repo)[-1]["since"] == "one"
    assert_restores(repo, vm, "three", snapshot(vm), tmp_path / "three")
    assert all(t == [(True, True, 0)] for t in twin_state(vm).values())


def test_a_full_backup_after_a_cleared_bitmap_restores_exactly(vm_factory, repo, tmp_path):
    """The remedy for a cleared bitmap: `full`; the chain then goes on exactly."""
    vm, bitmap = two_checkpoints(vm_factory, repo)
    tamper(vm, "clear", bitmap["two"])
    backup(repo, vm, "full")
    vm.write("vda", 5 * MiB, 64 * KiB, 0x15)
    assert_recovers(repo, vm, tmp_path / "next")


def test_an_unrecorded_bitmap_in_our_namespace_is_removed(vm_factory, repo, tmp_path):
    vm, bitmap = two_checkpoints(vm_factory, repo)
    stray = bitmap["two"].rsplit(".", 1)[0] + ".stray"
    vm.qmp("block-dirty-bitmap-add", node=vm.disks["vda"].node, name=stray, persistent=True)
    assert_recovers(repo, vm, tmp_path / "next")
    assert stray not in [name for name, _, _ in bitmap_state(vm)["vda"]]


def test_bitmaps_of_other_tools_are_left_alone(vm_factory, repo, tmp_path):
    """Foreign bitmaps (a recording one, a disabled one, one of another nbdbackup repository)
    survive full, incremental, auto, delete, a clean restart and a new chain unchanged,
    and keep recording the guest's writes."""
    vm = vm_factory(SIZES)
    vm.start()
    node = vm.disks["vda"].node
    vm.qmp("block-dirty-bitmap-add", node=node, name="other-tool", persistent=True)
    vm.qmp("block-dirty-bitmap-add", node=vm.disks["vdb"].node, name="other-tool-frozen", persistent=True, disabled=True)
    vm.qmp("block-dirty-bitmap-add", node=node, name="nbdbackup.0123abcd.theirs", persistent=True)
    foreign = {"vda": [("nbdbackup.0123abcd.theirs", True, True), ("other-tool", True, True)],
               "vdb": [("other-tool-frozen", False, True)]}

    def expected_bitmaps():
        recs = records(repo)
        return {d: sorted([*foreign[d], *((r["bitmap"], r is recs[-1], True) for r in recs)]) for d in vm.disks}

    written = 0
    steps = ["full", "incremental", "auto", "delete", "restart", "full", "incremental"]
    for i, step in enumerate(steps):
        vm.write("vda", i * 512 * KiB, 64 * KiB, 0x30 + i)
        written += 64 * KiB
        if step == "delete":
            cli.run(repo, "delete", "vm1", records(repo)[-2]["name"], "--qmp", vm.qmp_socket, "--keep-backup")
        elif step == "restart":
            vm.restart()
        else:
            assert_recovers(repo, vm, tmp_path / f"step{i}", step)
        assert bitmap_state(vm) == expected_bitmaps(), step
        counts = {b["name"]: b["count"] for b in vm.bitmaps("vda")}
        assert counts["other-tool"] == written, (step, counts)  # never cleared, never stopped
    assert {b["name"]: b["count"] for b in vm.bitmaps("vdb")}["other-tool-frozen"] == 0
