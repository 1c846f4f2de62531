"""Full backups of a running QEMU VM and byte-exact restores, end to end."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import cli
from harness import BackgroundWriter, assert_image_equals, image_bytes, is_prefix

KiB, MiB = 1024, 1024 * 1024
# Sizes that are not multiples of 1 MiB, nor (vdb) of the 64 KiB bitmap granularity.
SIZES = {"vda": 10 * MiB + 3 * 512, "vdb": 6 * MiB + 64 * KiB + 512}


def populate(vm) -> None:
    """Data, holes and zeroes on both disks."""
    vm.write("vda", 0, 1 * MiB, 0x11)
    vm.write("vda", 3 * MiB, 512 * KiB, 0x22)
    vm.write("vda", SIZES["vda"] - 1024, 1024, 0x33)  # the disk's very last bytes
    vm.write("vdb", 1 * MiB, 100 * KiB, 0x44)
    vm.write_zeroes("vdb", 1 * MiB, 64 * KiB)  # zeroes over data
    vm.write_zeroes("vdb", 4 * MiB, 128 * KiB)  # zeroes over a hole
    vm.write("vdb", SIZES["vdb"] - 512, 512, 0x55)


def allocated_bytes(path) -> int:
    out = subprocess.run(["qemu-img", "map", "--output=json", str(path)], capture_output=True, text=True, check=True).stdout
    return sum(e["length"] for e in json.loads(out) if e["data"])


def test_full_backup_restores_both_disks_identically(vm_factory, repo, tmp_path):
    vm = vm_factory(SIZES)
    vm.start()
    populate(vm)
    expected = {d: vm.expected(d) for d in vm.disks}

    name = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket).stdout.strip()
    vm.write("vda", 0, 64 * KiB, 0x99)  # later changes must not leak into the restore

    images = cli.restore(repo, vm, name, tmp_path / "out")
    for disk, path in images.items():
        assert_image_equals(path, expected[disk], "qcow2")
    # Holes and zeroes stay unallocated: no more than the data written, rounded to clusters.
    assert allocated_bytes(images["vda"]) <= 1 * MiB + 512 * KiB + 64 * KiB
    assert allocated_bytes(images["vdb"]) <= 2 * 64 * KiB

    raw = cli.restore(repo, vm, name, tmp_path / "raw", "--format", "raw", "--disk", "vdb")
    assert_image_equals(raw["vdb"], expected["vdb"], "raw")
    assert not (tmp_path / "raw" / "vda.raw").exists()

    [listed] = cli.backups(repo)
    assert listed["checkpoint"] == name and listed["kind"] == "full" and listed["since"] is None
    assert listed["created"].endswith("Z")
    assert listed["disks"] == [{"id": "vda", "size": SIZES["vda"]}, {"id": "vdb", "size": SIZES["vdb"]}]
    # Only the data was read: holes and zero ranges were skipped.
    assert listed["read_bytes"] <= 1 * MiB + 512 * KiB + 64 * KiB + 2 * 64 * KiB


def test_restore_refuses_to_overwrite_without_force(vm_factory, repo, tmp_path):
    vm = vm_factory({"vda": 2 * MiB})
    vm.start()
    vm.write("vda", 0, 64 * KiB, 0x11)
    name = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "first").stdout.strip()
    assert name == "first"
    out = tmp_path / "out"
    out.mkdir()
    (out / "vda.qcow2").write_bytes(b"precious")
    proc = cli.run(repo, "restore", "vm1", "--to", "first", "--output", out, expect=8)
    assert "exists" in proc.stderr and (out / "vda.qcow2").read_bytes() == b"precious"
    cli.run(repo, "restore", "vm1", "--to", "first", "--output", out, "--force")
    assert_image_equals(out / "vda.qcow2", vm.expected("vda"), "qcow2")
    assert sorted(p.name for p in out.iterdir()) == ["vda.qcow2"]  # no partial files left


def test_guest_writes_during_full_backup_are_a_prefix_on_both_disks(vm_factory, repo, tmp_path):
    """The backup holds exactly the writes before one instant, on both disks at once;
    the next backup holds the rest: nothing is in neither."""
    vm = vm_factory({"vda": 48 * MiB, "vdb": 40 * MiB + 512})
    vm.start()
    vm.write("vda", 0, 32 * MiB, 0x5A)  # enough data that the backup takes a while
    vm.write("vdb", 0, 32 * MiB, 0xA5)
    with BackgroundWriter(vm, length=64 * KiB, interval=0) as writer:
        writer.wait_for(10)
        name = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket).stdout.strip()
        during = len(writer.writes)
        writer.wait_for(during + 10)
    writes = writer.writes
    images = cli.restore(repo, vm, name, tmp_path / "full")
    k = is_prefix(writes, {d: image_bytes(p, "qcow2") for d, p in images.items()}, writer.baseline)
    print(f"prefix: {k} of {len(writes)} writes in the backup; {during} done when it returned")
    assert 10 <= k <= during, (k, during, len(writes))
    assert {w.disk for w in writes[:k]} == {"vda", "vdb"}

    second = cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket).stdout.strip()
    images = cli.restore(repo, vm, second, tmp_path / "next")
    for disk, path in images.items():
        assert_image_equals(path, vm.expected(disk), "qcow2")


def leftovers(vm, bitmaps_before):
    state = vm.block_state()
    return {
        "exports": state["exports"],
        "jobs": state["jobs"],
        "nodes": [n for n in state["nodes"] if n.startswith("nbdbackup")],
        "bitmaps": {vm.disks[d].node: sorted(b.get("name", "?") for b in state["bitmaps"][vm.disks[d].node]) for d in vm.disks},
    }, {vm.disks[d].node: sorted(b["name"] for b in bitmaps_before[d]) for d in vm.disks}


def test_sigint_during_full_backup_leaves_nothing_behind(vm_factory, repo, tmp_path):
    vm = vm_factory({"vda": 160 * MiB, "vdb": 96 * MiB})
    vm.start()
    vm.write("vda", 0, 128 * MiB, 0x42)
    vm.write("vdb", 0, 64 * MiB, 0x24)
    first = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket).stdout.strip()
    vm.write("vda", 0, 64 * KiB, 0x43)
    before = {d: vm.bitmaps(d) for d in vm.disks}

    proc = cli.start(repo, "full", "vm1", "--qmp", vm.qmp_socket)
    deadline = time.monotonic() + 60
    while not vm.block_state()["exports"]:  # interrupt while the disks are being read
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "SIGINT" in err

    state, bitmaps_before = leftovers(vm, before)
    assert state["exports"] == [] and state["jobs"] == [] and state["nodes"] == []
    assert state["bitmaps"] == bitmaps_before  # no new checkpoint; the old one active again
    assert [b["recording"] for b in vm.bitmaps("vda") if not b["name"].endswith("@twin")] == [True]
    assert [b["checkpoint"] for b in cli.backups(repo)] == [first]
    assert list((repo / "tmp").iterdir()) == []  # no scratch file
    for index in (repo / "vms" / "vm1" / "backups").glob("*/*.index"):  # no index without its manifest
        assert (index.parent / "manifest.json").exists(), index

    # The chain goes on as if nothing happened.
    second = cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket).stdout.strip()
    images = cli.restore(repo, vm, second, tmp_path / "out")
    for disk, path in images.items():
        assert_image_equals(path, vm.expected(disk), "qcow2")


def test_restore_json_names_each_image(vm_factory, repo, tmp_path):
    vm = vm_factory({"vda": 1 * MiB, "vdb": 1 * MiB})
    vm.start()
    vm.write("vdb", 0, 64 * KiB, 0x17)
    cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "c")
    images = json.loads(cli.run(repo, "restore", "vm1", "--to", "c", "--output", tmp_path / "o", "--format", "raw", "--json").stdout)
    assert [(i["disk"], i["format"]) for i in images] == [("vda", "raw"), ("vdb", "raw")]
    assert_image_equals(images[1]["path"], vm.expected("vdb"), "raw")


def test_qemu_running_as_another_user(vm_factory, repo, tmp_path):
    """QEMU started by root with -runas nobody cannot enter root's 0700 directories: nbdbackup
    hands it its private scratch and socket directories, and the backup chain works as usual."""
    vm = vm_factory({"vda": 2 * MiB}, runas="nobody")
    vm.start()
    vm.write("vda", 0, 256 * KiB, 0x31)
    cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket)
    vm.write("vda", 64 * KiB, 64 * KiB, 0x32)
    cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket)
    images = cli.restore(repo, vm, "latest", tmp_path / "out")
    assert_image_equals(images["vda"], vm.expected("vda"), "qcow2")
    assert vm.block_state()["exports"] == [] and vm.block_state()["jobs"] == []
