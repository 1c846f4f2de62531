"""Disk ids of every shape users give QEMU, and the names nbdbackup gives QEMU for them.

A VM started by hand with -drive if=virtio has the disk id virtio0; -drive
if=ide gives ide0-hd0; libvirt's scsi-hd ids look like scsi0-0-0-0; and a
-device id may be long. nbdbackup's fleece nodes, jobs and exports must fit
QEMU's limits (node names: 31 characters) for all of them.
"""

from __future__ import annotations

import json
import subprocess
import time

import cli
import pytest
from faults import NOTHING_LEFT, Run, block_names, manifest, qemu_leftovers
from harness import QEMU_IMG, QEMU_SYSTEM, assert_image_equals

from nbdbackup.names import NODE_NAME_MAX, QEMU_ID, BlockNames, block_namespace, disk_key

KiB, MiB = 1024, 1024 * 1024
LONG_ID = "a" + "-really.long_device-id" * 2 + "-0123456789abcd"  # 60 characters, as -device ...,id= allows
DISKS = {"virtio0": 4 * MiB, "scsi0-0-0-0": 4 * MiB, "ide0-hd0": 2 * MiB, LONG_ID: 3 * MiB}
ATTACH = {"virtio0": "drive-virtio", "scsi0-0-0-0": "scsi-hd", "ide0-hd0": "drive-ide", LONG_ID: "virtio-blk"}


def test_long_id_is_sixty_characters():
    assert len(LONG_ID) == 60


@pytest.mark.parametrize("disk_id", [*DISKS, "x" * 300, "a b:ü/c", "1abc", ""])
def test_block_names_fit_qemu_for_any_disk_id(disk_id):
    names = BlockNames(block_namespace("f" * 64))
    made = [names.fleece(disk_id), names.job(disk_id), names.export(disk_id)]
    for name in made:
        assert len(name) <= NODE_NAME_MAX and QEMU_ID.match(name), name
        assert names.owns(name)
        assert disk_key(disk_id) in name
    assert names.is_fleece(made[0]) and not names.is_fleece(made[1])
    assert len(set(made)) == 3


def test_block_names_differ_per_disk_and_repository():
    ids = [*DISKS, "vda", "vdb", "sda", "virtio1"]
    a, b = BlockNames(block_namespace("1" * 64)), BlockNames(block_namespace("2" * 64))
    assert len({a.fleece(i) for i in ids} | {b.fleece(i) for i in ids}) == 2 * len(ids)
    assert not b.owns(a.job("vda")) and not b.is_fleece(a.fleece("vda"))
    assert a.is_fleece(block_namespace("1" * 64) + "fleece-vda")  # what 0.1.0 named them: still cleaned up


def backup(repo, vm, kind, *args):
    return cli.run(repo, kind, vm.name, "--qmp", vm.qmp_socket, *args).stdout.strip()


def assert_restores(repo, vm, checkpoint, expected, out):
    images = cli.restore(repo, vm, checkpoint, out)
    for disk, path in images.items():
        assert_image_equals(path, expected[disk], "qcow2")


def test_drive_styles_full_incremental_restore(vm_factory, repo, tmp_path):
    """-drive if=virtio, scsi-hd, -drive if=ide and a 60-character -device id, in one VM."""
    vm = vm_factory(DISKS, attach=ATTACH)
    vm.start()
    assert vm.node("virtio0").startswith("#block") and vm.node("ide0-hd0").startswith("#block")  # as users get them
    for i, disk in enumerate(DISKS):
        vm.write(disk, i * 64 * KiB, 256 * KiB, 0x10 + i)
    full = backup(repo, vm, "full")
    at_full = {d: vm.expected(d) for d in vm.disks}
    for i, disk in enumerate(DISKS):
        vm.write(disk, 1 * MiB + i * 4 * KiB, 64 * KiB, 0x20 + i)
    incr = backup(repo, vm, "incremental")
    at_incr = {d: vm.expected(d) for d in vm.disks}

    listed = cli.backups(repo)
    assert [b["kind"] for b in listed] == ["full", "incremental"]
    assert sorted(d["id"] for d in listed[1]["disks"]) == sorted(DISKS)
    for d in manifest(repo, incr)["disks"]:  # the incremental read only what changed, on every disk
        assert d["read_bytes"] <= 128 * KiB, d
    assert qemu_leftovers(vm) == NOTHING_LEFT
    for disk in DISKS:  # the full's bitmap stopped recording, the incremental's records, on each disk's format node
        names = sorted((b["name"].rsplit(".", 1)[1], b["recording"]) for b in vm.bitmaps(disk))
        assert names == sorted([(full, False), (incr, True), ("@twin", True)]), (disk, names)
    assert_restores(repo, vm, full, at_full, tmp_path / "full")
    assert_restores(repo, vm, incr, at_incr, tmp_path / "incr")


def test_leftovers_of_a_killed_run_are_removed_for_every_drive_style(vm_factory, repo):
    vm = vm_factory(DISKS, attach=ATTACH)
    vm.start()
    backup(repo, vm, "full", "--checkpoint", "one")
    vm.write(LONG_ID, 0, 64 * KiB, 0x33)
    with Run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "hung", pause="read") as run:
        run.wait_paused()
        names = block_names(repo)
        left = qemu_leftovers(vm)
        assert left["nodes"] == sorted(names.fleece(d) for d in DISKS), left
        assert left["jobs"] == sorted(names.job(d) for d in DISKS), left
        assert left["exports"] == sorted(names.export(d) for d in DISKS), left
        run.kill()
    assert qemu_leftovers(vm) != NOTHING_LEFT  # the killed run could not clean up
    backup(repo, vm, "auto", "--checkpoint", "two")
    assert qemu_leftovers(vm) == NOTHING_LEFT
    assert [b["checkpoint"] for b in cli.backups(repo)] == ["one", "two"]


def test_disk_under_a_filter_node(vm_factory, repo, tmp_path):
    """A throttle filter above the format node: found with stable QMP, bitmaps on the format node."""
    vm = vm_factory({"vda": 2 * MiB, "vdb": 1 * MiB}, attach={"vda": "throttled"})
    vm.start()
    vm.write("vda", 0, 128 * KiB, 0x41)
    full = backup(repo, vm, "full")
    at_full = {d: vm.expected(d) for d in vm.disks}
    vm.write("vda", 1 * MiB, 64 * KiB, 0x42)
    incr = backup(repo, vm, "incremental")
    assert [d["read_bytes"] for d in manifest(repo, incr)["disks"] if d["id"] == "vda"] == [64 * KiB]
    assert any(b["name"].endswith("." + incr) for b in vm.bitmaps("vda"))  # on the format node
    assert_restores(repo, vm, full, at_full, tmp_path / "full")
    assert_restores(repo, vm, incr, {d: vm.expected(d) for d in vm.disks}, tmp_path / "incr")



@pytest.mark.qemu
def test_device_id_that_cannot_name_a_disk_in_the_repository(tmp_path, repo):
    """JSON -device takes any id ("disk one" here): refused with one line naming it, nothing left in QEMU."""
    image, sock = tmp_path / "d.qcow2", tmp_path / "q.sock"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    device = json.dumps({"driver": "virtio-blk-pci", "drive": "d-fmt", "id": "disk one"})
    proc = subprocess.Popen([QEMU_SYSTEM, "-machine", "q35,accel=tcg", "-nodefaults", "-S", "-display", "none",
                             "-blockdev", f"driver=file,filename={image},node-name=d-file",
                             "-blockdev", "driver=qcow2,file=d-file,node-name=d-fmt", "-device", device,
                             "-qmp", f"unix:{sock},server=on,wait=off"], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        line = cli.run(repo, "full", "vm1", "--qmp", sock, expect=3).stderr.strip()
        assert "disk id 'disk one' cannot name a disk in the repository" in line and "exclude" in line, line
        out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)], capture_output=True, text=True, check=True)
        assert "bitmaps" not in json.loads(out.stdout).get("format-specific", {}).get("data", {})
    finally:
        proc.kill()
        proc.wait()


def test_format_node_below_filters_from_recorded_qmp():
    """query-block / query-named-block-nodes as QEMU 7.2 answers for copy-on-read over throttle over qcow2."""
    from nbdbackup.vm import _below_filters

    nodes = {n["node-name"]: n for n in [
        {"node-name": "c", "drv": "copy-on-read", "file": 'json:{"driver": "copy-on-read", ...}'},
        {"node-name": "t", "drv": "throttle", "file": 'json:{"driver": "throttle", ...}'},
        {"node-name": "q", "drv": "qcow2", "file": "/srv/d.qcow2"},
        {"node-name": "f", "drv": "file", "file": "/srv/d.qcow2"},
    ]}
    image = {"format": "copy-on-read", "filename": "json:...",
             "backing-image": {"format": "throttle", "filename": "json:...",
                               "backing-image": {"format": "qcow2", "filename": "/srv/d.qcow2"}}}
    assert _below_filters({"node-name": "c", "image": image}, nodes) == "q"
    assert _below_filters({"node-name": "q", "image": image["backing-image"]["backing-image"]}, nodes) == "q"


def test_bitmap_actions_carry_the_granularity():
    from nbdbackup.names import GRANULARITY
    from nbdbackup.vm import bitmap_add, bitmap_merge

    assert bitmap_add("n", "b") == ("block-dirty-bitmap-add", {"node": "n", "name": "b", "persistent": True, "granularity": GRANULARITY})
    assert bitmap_add("n", "t", persistent=False, disabled=True)[1]["disabled"] is True
    assert bitmap_merge("f", "t", [("n", "a"), ("n", "b")])[1]["bitmaps"] == [{"node": "n", "name": "a"}, {"node": "n", "name": "b"}]
