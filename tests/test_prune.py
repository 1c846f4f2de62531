"""prune: retention with QEMU's checkpoints following the policy, and safe garbage collection."""

from __future__ import annotations

import json
import time

import cli
from harness import assert_image_equals

KiB, MiB = 1024, 1024 * 1024


def prune(repo, vm, *args, expect=0):
    return json.loads(cli.run(repo, "prune", "vm1", "--qmp", vm.qmp_socket, "--json", *args, expect=expect).stdout)


def chunk_count(repo):
    return sum(1 for p in (repo / "chunks").rglob("*") if p.is_file())


def test_prune_follows_the_policy_in_the_repository_and_in_qemu(vm_factory, repo, tmp_path):
    vm = vm_factory({"vda": 4 * MiB, "vdb": 2 * MiB + 512})
    vm.start()
    expected = {}
    for i in range(5):
        vm.write("vda", i * 512 * KiB, 256 * KiB, 0x10 + i)
        vm.write("vdb", (i % 2) * MiB, 64 * KiB, 0x20 + i)
        cli.run(repo, "full" if i == 0 else "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", f"cp{i}")
        expected[f"cp{i}"] = {d: vm.expected(d) for d in vm.disks}

    dry = prune(repo, vm, "--keep-last", "2", "--dry-run")
    assert [b["keep"] for b in dry["backups"]] == [False, False, False, True, True]
    assert len(cli.backups(repo)) == 5  # a dry run changes nothing

    before = chunk_count(repo)
    report = prune(repo, vm, "--keep-last", "2")
    assert sorted(report["checkpoints_deleted"]) == ["cp0", "cp1", "cp2"]
    assert [b["checkpoint"] for b in cli.backups(repo)] == ["cp3", "cp4"]
    assert report["freed_chunks"] > 0 and chunk_count(repo) == before - report["freed_chunks"]
    rows = json.loads(cli.run(repo, "checkpoints", "vm1", "--qmp", vm.qmp_socket, "--json").stdout)
    assert [(r["name"], r["state"], r["active"]) for r in rows] == [("cp3", "ok", False), ("cp4", "ok", True)]
    assert sorted(b["name"].rsplit(".", 1)[1] for b in vm.bitmaps("vda")) == ["@twin", "cp3", "cp4"]

    for name in ("cp3", "cp4"):  # kept backups still restore identical
        images = cli.restore(repo, vm, name, tmp_path / name)
        for disk, path in images.items():
            assert_image_equals(path, expected[name][disk], "qcow2")
    vm.write("vda", 0, 64 * KiB, 0x99)
    cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--since", "cp3", "--checkpoint", "cp5")
    images = cli.restore(repo, vm, "cp5", tmp_path / "cp5")
    for disk, path in images.items():
        assert_image_equals(path, vm.expected(disk), "qcow2")


def test_prune_never_removes_the_newest_backup_and_works_without_the_vm(vm_factory, repo):
    vm = vm_factory({"vda": 1 * MiB})
    vm.start()
    for i in range(3):
        vm.write("vda", 0, 64 * KiB, 0x30 + i)
        cli.run(repo, "full" if i == 0 else "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", f"cp{i}")
    vm.stop()
    proc = cli.run(repo, "prune", "vm1", "--keep-yearly", "1", "--json")  # no --qmp, no config: repository only
    assert "checkpoints in QEMU were left" in proc.stderr
    assert [b["checkpoint"] for b in cli.backups(repo)] == ["cp2"]
    vm.start()
    # The next prune with the VM reachable merges away the checkpoints whose backups are gone.
    report = prune(repo, vm, "--keep-last", "1")
    assert sorted(report["checkpoints_deleted"]) == ["cp0", "cp1"]
    vm.write("vda", 0, 64 * KiB, 0x40)
    cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket)
    cli.run(repo, "prune", "vm1", expect=2)  # no policy: refused


def test_garbage_collection_beside_a_running_backup_loses_no_chunk(vm_factory, repo, tmp_path):
    """vm2 backs up while vm1 is pruned: GC must not delete chunks vm2 is about to reference."""
    vm1 = vm_factory({"vda": 2 * MiB}, name="vm1")
    vm2 = vm_factory({"vda": 96 * MiB}, name="vm2")
    for vm in (vm1, vm2):
        vm.start()
    vm1.write("vda", 0, 1 * MiB, 0x51)
    cli.run(repo, "full", "vm1", "--qmp", vm1.qmp_socket, "--checkpoint", "a")
    vm2.write("vda", 0, 1 * MiB, 0x51)  # the same data as vm1's first backup: vm2 will reuse its chunk
    vm2.write("vda", 8 * MiB, 80 * MiB, 0x52)
    vm1.write("vda", 0, 1 * MiB, 0x53)
    cli.run(repo, "incremental", "vm1", "--qmp", vm1.qmp_socket, "--checkpoint", "b")

    backup = cli.start(repo, "full", "vm2", "--qmp", vm2.qmp_socket)
    deadline = time.monotonic() + 30
    while not vm2.block_state()["exports"]:
        assert backup.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    report = prune(repo, vm1, "--keep-last", "1")  # drops vm1's "a", whose chunk vm2 reuses
    out, err = backup.communicate(timeout=120)
    assert backup.returncode == 0, err
    assert [b["checkpoint"] for b in cli.backups(repo)] == ["b"]
    images = cli.restore(repo, vm2, out.strip(), tmp_path / "vm2")
    assert_image_equals(images["vda"], vm2.expected("vda"), "qcow2")
    assert report["garbage"]["done"]  # GC ran (after the backup: it waited for the repository lock)
    cli.run(repo, "verify", "vm2")  # every chunk vm2's backup references is there and intact
