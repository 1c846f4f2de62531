"""Incremental backups and the checkpoint chain, against a real QEMU."""

from __future__ import annotations

import json
import random

import cli
from harness import BackgroundWriter, apply_ops, assert_image_equals, image_bytes, is_prefix

KiB, MiB = 1024, 1024 * 1024
GRANULE = 64 * KiB
# vdb's size is not a multiple of the bitmap granularity: its last granule is partial.
SIZES = {"vda": 8 * MiB, "vdb": 5 * MiB + 3 * 512}


def backup(repo, vm, kind, *args):
    return cli.run(repo, kind, "vm1", "--qmp", vm.qmp_socket, *args).stdout.strip()


def assert_restores(repo, vm, checkpoint, expected, out):
    images = cli.restore(repo, vm, checkpoint, out)
    for disk, path in images.items():
        assert_image_equals(path, expected[disk], "qcow2")


def snapshot(vm):
    return {d: vm.expected(d) for d in vm.disks}


STEPS = [
    # (disk, op, offset, length, pattern) applied between checkpoints
    [("vda", "w", 0, 2 * MiB, 0x11), ("vdb", "w", 1 * MiB, 1 * MiB, 0x21)],
    [("vda", "w", 1 * MiB, 64 * KiB, 0x12), ("vda", "w", 1 * MiB + 32 * KiB, 100 * KiB, 0x13)],  # overlapping
    [("vdb", "z", 1 * MiB + 128 * KiB, 256 * KiB, 0), ("vdb", "w", SIZES["vdb"] - 1024, 1024, 0x22)],  # zeroes; last partial granule
    [("vda", "d", 0, 512 * KiB, 0), ("vdb", "w", 0, 4 * KiB, 0x23)],  # a discard of whole clusters
    [("vda", "w", 7 * MiB + 512, 3 * 512, 0x14), ("vdb", "w", SIZES["vdb"] - 512, 512, 0x24)],
    [("vda", "w", 1 * MiB, 1 * MiB, 0x15)],
]


def test_chain_of_checkpoints_restores_every_point(vm_factory, repo, tmp_path):
    vm = vm_factory(SIZES)
    vm.start()
    names, expected = [], {}
    for i, step in enumerate(STEPS):
        apply_ops(vm, step)
        name = backup(repo, vm, "full" if i == 0 else "incremental", "--checkpoint", f"cp{i}")
        names.append(name)
        expected[name] = snapshot(vm)
    for name in names:
        assert_restores(repo, vm, name, expected[name], tmp_path / name)

    listed = cli.backups(repo)
    assert [b["kind"] for b in listed] == ["full"] + ["incremental"] * (len(STEPS) - 1)
    assert [b["since"] for b in listed] == [None] + names[:-1]
    # An incremental reads what changed, rounded to the granularity, not the disk.
    assert listed[-1]["read_bytes"] <= 1 * MiB + GRANULE

    # Differential: since an older checkpoint.
    vm.write("vdb", 2 * MiB, 64 * KiB, 0x31)
    diff = backup(repo, vm, "incremental", "--since", "cp2", "--checkpoint", "diff")
    assert cli.backups(repo)[-1]["since"] == "cp2"
    assert_restores(repo, vm, diff, snapshot(vm), tmp_path / "diff")
    names.append(diff)

    # Delete a middle checkpoint and the newest one; then an incremental since an older one.
    cli.run(repo, "delete", "vm1", "cp3", "--qmp", vm.qmp_socket)
    cli.run(repo, "delete", "vm1", "diff", "--qmp", vm.qmp_socket)
    rows = json.loads(cli.run(repo, "checkpoints", "vm1", "--qmp", vm.qmp_socket, "--json").stdout)
    assert [r["name"] for r in rows] == ["cp0", "cp1", "cp2", "cp4", "cp5"]
    assert [r["active"] for r in rows] == [False] * 4 + [True]
    assert all(r["state"] == "ok" and r["usable"] for r in rows)
    assert [b["checkpoint"] for b in cli.backups(repo)] == ["cp0", "cp1", "cp2", "cp4", "cp5"]
    vm.write("vda", 6 * MiB, 128 * KiB, 0x41)
    vm.write_zeroes("vdb", 1 * MiB, 64 * KiB)
    after = backup(repo, vm, "incremental", "--since", "cp1", "--checkpoint", "after")
    assert_restores(repo, vm, after, snapshot(vm), tmp_path / "after")
    # The other backups are still whole.
    for name in ("cp0", "cp2", "cp5"):
        assert_restores(repo, vm, name, expected[name], tmp_path / f"again-{name}")


def test_incremental_after_one_percent_of_writes_reads_at_most_two_percent(vm_factory, repo):
    size = 256 * MiB
    vm = vm_factory({"vda": size})
    vm.start()
    vm.write("vda", 0, 128 * MiB, 0x77)
    backup(repo, vm, "full")
    rng = random.Random(1)
    written = 0
    while written < size // 100:  # 1% of the disk, in scattered 64 KiB..1 MiB writes
        length = rng.choice([64 * KiB, 128 * KiB, 256 * KiB, 1 * MiB])
        offset = rng.randrange(0, size - length, 4096)
        vm.write("vda", offset, length, rng.randrange(1, 256))
        written += length
    backup(repo, vm, "incremental")
    read = cli.backups(repo)[-1]["read_bytes"]
    print(f"incremental read {read} bytes after {written} bytes written ({100 * read / size:.2f}% of the disk)")
    assert read <= size // 50


def test_guest_writes_during_incrementals_lose_nothing(vm_factory, repo, tmp_path):
    vm = vm_factory({"vda": 32 * MiB, "vdb": 24 * MiB + 512})
    vm.start()
    vm.write("vda", 0, 16 * MiB, 0x5A)
    backup(repo, vm, "full")
    with BackgroundWriter(vm, length=64 * KiB, interval=0) as writer:
        writer.wait_for(5)
        first = backup(repo, vm, "incremental")
        writer.wait_for(len(writer.writes) + 10)
        second = backup(repo, vm, "incremental")
        writer.wait_for(len(writer.writes) + 5)
    writes = writer.writes
    k1 = is_prefix(writes, {d: image_bytes(p, "qcow2") for d, p in cli.restore(repo, vm, first, tmp_path / "1").items()}, writer.baseline)
    k2 = is_prefix(writes, {d: image_bytes(p, "qcow2") for d, p in cli.restore(repo, vm, second, tmp_path / "2").items()}, writer.baseline)
    assert 5 <= k1 < k2 <= len(writes)
    third = backup(repo, vm, "incremental")
    assert_restores(repo, vm, third, snapshot(vm), tmp_path / "3")


def test_chain_survives_a_clean_qemu_restart(vm_factory, repo, tmp_path):
    vm = vm_factory(SIZES)
    vm.start()
    vm.write("vda", 0, 1 * MiB, 0x11)
    backup(repo, vm, "full")
    vm.restart()  # quit: persistent bitmaps are written to the qcow2 images
    vm.write("vda", 512 * KiB, 64 * KiB, 0x12)
    vm.write("vdb", SIZES["vdb"] - 512, 512, 0x13)
    name = backup(repo, vm, "incremental")
    assert cli.backups(repo)[-1]["read_bytes"] <= 2 * GRANULE
    assert_restores(repo, vm, name, snapshot(vm), tmp_path / "out")


def test_qemu_killed_breaks_the_chain_and_auto_recovers(vm_factory, repo, tmp_path):
    vm = vm_factory(SIZES)
    vm.start()
    vm.write("vda", 0, 1 * MiB, 0x11)
    backup(repo, vm, "full")
    vm.restart()
    backup(repo, vm, "incremental")  # this checkpoint's bitmap exists only in QEMU's memory...
    vm.write("vda", 0, 64 * KiB, 0x12)
    vm.kill()  # ...and is lost; the older bitmaps come back inconsistent
    vm.start()
    vm.write("vdb", 64 * KiB, 64 * KiB, 0x13)

    proc = cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, expect=4)
    assert "vda" in proc.stderr and "nbdbackup." in proc.stderr, proc.stderr
    assert len(cli.backups(repo)) == 2  # nothing written

    proc = cli.run(repo, "auto", "vm1", "--qmp", vm.qmp_socket)
    assert "full" in proc.stderr
    assert cli.backups(repo)[-1]["kind"] == "full"
    vm.write("vda", 2 * MiB, 64 * KiB, 0x14)
    name = backup(repo, vm, "auto")
    assert cli.backups(repo)[-1]["kind"] == "incremental"
    assert_restores(repo, vm, name, snapshot(vm), tmp_path / "out")
    rows = json.loads(cli.run(repo, "checkpoints", "vm1", "--qmp", vm.qmp_socket, "--json").stdout)
    assert [r["state"] for r in rows] == ["ok", "ok"]  # the broken chain's bitmaps are gone
