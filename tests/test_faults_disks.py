"""The VM's disks change between backups: grown, shrunk, added, removed.

Resizes go through the harness monitor (`block_resize`), and the harness's
model follows (tests/faults.py: resize). Disks are added and removed with a
clean restart of QEMU: the harness's q35 machine has no hot-pluggable PCIe
port (`device_add` answers "Bus 'pcie.0' does not support hotplugging"). For
nbdbackup the result is the same as a hot-plug: a disk id appears in, or
disappears from, `query-block` while the chain's bitmaps stay.
"""

from __future__ import annotations

import subprocess

import cli
from faults import (
    NOTHING_LEFT,
    assert_recovers,
    assert_restores,
    backup,
    manifest,
    qemu_leftovers,
    resize,
    snapshot,
)
from harness import GuestDisk

KiB, MiB = 1024, 1024 * 1024
SIZES = {"vda": 8 * MiB, "vdb": 4 * MiB + 512}


def started(vm_factory, repo):
    vm = vm_factory(SIZES)
    vm.start()
    vm.write("vda", 0, 1 * MiB, 0x11)
    vm.write("vda", 7 * MiB, 1 * MiB, 0x12)  # up to the end of vda
    vm.write("vdb", 0, 512 * KiB, 0x21)
    backup(repo, vm, "full", "--checkpoint", "one")
    return vm, snapshot(vm)


def disk_rows(repo, checkpoint):
    return {d["id"]: d for d in manifest(repo, checkpoint)["disks"]}


def test_grown_disk_reads_its_changes_and_the_new_area(vm_factory, repo, tmp_path):
    vm, at_one = started(vm_factory, repo)
    resize(vm, "vda", 12 * MiB + 512)
    vm.write("vda", 64 * KiB, 64 * KiB, 0x13)  # a change in the old area
    vm.write("vda", 10 * MiB, 256 * KiB, 0x14)  # data in the new area
    vm.write("vda", 12 * MiB - 512, 1024, 0x15)  # up to the new end
    resize(vm, "vdb", 5 * MiB)  # vdb's old end lay inside a bitmap granule
    vm.write("vdb", 4 * MiB, 1024, 0x22)  # across the old end
    name = assert_recovers(repo, vm, tmp_path / "grown")
    rows = disk_rows(repo, name)
    assert rows["vdb"]["size"] == 5 * MiB and rows["vdb"]["full_read"] is False
    assert rows["vda"]["size"] == 12 * MiB + 512 and rows["vda"]["full_read"] is False
    assert rows["vda"]["read_bytes"] <= 64 * KiB + 256 * KiB + 2 * 64 * KiB  # the change, plus the new area's data only
    vm.write("vda", 11 * MiB, 64 * KiB, 0x16)
    assert_recovers(repo, vm, tmp_path / "after")
    assert_restores(repo, vm, "one", at_one, tmp_path / "one")


def test_shrunk_disk_is_read_in_full(vm_factory, repo, tmp_path):
    vm, at_one = started(vm_factory, repo)
    resize(vm, "vda", 6 * MiB - 512)  # the data at 7 MiB is cut off
    vm.write("vda", 2 * MiB, 64 * KiB, 0x13)
    name = assert_recovers(repo, vm, tmp_path / "shrunk")
    rows = disk_rows(repo, name)
    assert rows["vda"]["size"] == 6 * MiB - 512 and rows["vda"]["full_read"] is True
    assert rows["vdb"]["full_read"] is False
    vm.write("vda", 3 * MiB, 64 * KiB, 0x14)
    name = assert_recovers(repo, vm, tmp_path / "after")
    assert disk_rows(repo, name)["vda"]["full_read"] is False  # the chain goes on
    assert_restores(repo, vm, "one", at_one, tmp_path / "one")


def test_added_disk_is_read_in_full_by_the_next_incremental(vm_factory, repo, tmp_path):
    vm, at_one = started(vm_factory, repo)
    vm.stop()
    vdc = GuestDisk("vdc", vm.workdir / "vm1-vdc.qcow2", 3 * MiB, "qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(vdc.path), str(vdc.size)], check=True)
    vm.disks["vdc"] = vdc
    vm.model["vdc"] = bytearray(vdc.size)
    vm.start()
    vm.write("vdc", 1 * MiB, 128 * KiB, 0x31)
    vm.write("vda", 64 * KiB, 64 * KiB, 0x13)
    name = assert_recovers(repo, vm, tmp_path / "added")
    rows = disk_rows(repo, name)
    assert cli.backups(repo)[-1]["kind"] == "incremental"
    assert {d: r["full_read"] for d, r in rows.items()} == {"vda": False, "vdb": False, "vdc": True}
    vm.write("vdc", 2 * MiB, 64 * KiB, 0x32)
    name = assert_recovers(repo, vm, tmp_path / "after")
    assert disk_rows(repo, name)["vdc"]["full_read"] is False
    assert disk_rows(repo, name)["vdc"]["read_bytes"] <= 64 * KiB


def test_removed_disk_is_recorded_and_its_old_backups_stay(vm_factory, repo, tmp_path):
    vm, at_one = started(vm_factory, repo)
    vm.stop()
    del vm.disks["vdb"], vm.model["vdb"]
    vm.start()
    vm.write("vda", 64 * KiB, 64 * KiB, 0x13)
    name = assert_recovers(repo, vm, tmp_path / "removed")
    m = manifest(repo, name)
    assert m["removed_disks"] == ["vdb"] and [d["id"] for d in m["disks"]] == ["vda"]
    assert m["kind"] == "incremental"
    assert qemu_leftovers(vm) == NOTHING_LEFT
    assert_restores(repo, vm, "one", at_one, tmp_path / "one")  # still both disks
