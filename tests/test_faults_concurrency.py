"""Runs at the same time: one VM twice (refused), two VMs into one repository (both correct)."""

from __future__ import annotations

import json

import cli
from faults import (
    NOTHING_LEFT,
    Run,
    assert_restores,
    backup,
    backups,
    bitmap_state,
    qemu_leftovers,
    records,
    snapshot,
)

from nbdbackup.repository import Repository

KiB, MiB = 1024, 1024 * 1024


def test_second_backup_of_the_same_vm_is_refused_while_the_first_reads(vm_factory, repo, tmp_path):
    vm = vm_factory({"vda": 8 * MiB, "vdb": 4 * MiB})
    vm.start()
    vm.write("vda", 0, 1 * MiB, 0x11)
    vm.write("vda", 4 * MiB, 1 * MiB, 0x12)
    vm.write("vdb", 0, 1 * MiB, 0x21)
    at_first = snapshot(vm)
    with Run(repo, "full", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "first", pause="read") as first:
        first.wait_paused()
        state = vm.block_state()
        for kind in ("incremental", "full", "auto"):
            proc = cli.run(repo, kind, "vm1", "--qmp", vm.qmp_socket, expect=5)
            assert f"pid {first.pid}" in proc.stderr, proc.stderr
        cli.run(repo, "checkpoints", "vm1", "--qmp", vm.qmp_socket, expect=5)
        cli.run(repo, "delete", "vm1", "first", "--qmp", vm.qmp_socket, expect=5)
        assert vm.block_state() == state  # the refused runs touched nothing in QEMU
        vm.write("vda", 2 * MiB, 64 * KiB, 0x13)
        result = first.finish()
    assert result.returncode == 0, result.describe()
    assert backups(repo) == ["first"]
    assert_restores(repo, vm, "first", at_first, tmp_path / "first")
    assert qemu_leftovers(vm) == NOTHING_LEFT
    second = backup(repo, vm, "incremental")
    assert_restores(repo, vm, second, snapshot(vm), tmp_path / "second")


def test_two_vms_back_up_into_one_repository_at_once(vm_factory, repo, tmp_path):
    """Both runs read at the same moment; they share chunks (same data in both VMs) and
    the repository's directories; both backups restore identically, twice over."""
    vms = [vm_factory({"vda": 8 * MiB, "vdb": 4 * MiB}, name=name) for name in ("vm1", "vm2")]
    Repository.open(repo, create=True)  # the repository exists (two runs creating it at once: the test below)
    for i, vm in enumerate(vms):
        vm.start()
        vm.write("vda", 0, 2 * MiB, 0x11)  # the same data in both VMs: the same chunks
        vm.write("vda", 4 * MiB, 1 * MiB, 0x30 + i)  # and data of their own
        vm.write("vdb", 0, 1 * MiB, 0x21)
    for kind in ("full", "incremental"):
        expected = [snapshot(vm) for vm in vms]
        runs = [Run(repo, kind, vm.name, "--qmp", vm.qmp_socket, pause="read") for vm in vms]
        try:
            for run in runs:
                run.wait_paused()  # both are reading now
            results = [run.finish() for run in runs]
        finally:
            for run in runs:
                run.__exit__(None, None, None)
        for vm, result, want in zip(vms, results, expected, strict=True):
            assert result.returncode == 0, result.describe()
            assert qemu_leftovers(vm) == NOTHING_LEFT
            assert_restores(repo, vm, result.stdout.strip(), want, tmp_path / f"{vm.name}-{kind}")
            assert [r["state"] for r in records(repo, vm.name)] == ["confirmed"] * (1 if kind == "full" else 2)
            assert {name for bitmaps in bitmap_state(vm).values() for name, _, _ in bitmaps} == \
                {r["bitmap"] for r in records(repo, vm.name)}
        for i, vm in enumerate(vms):
            vm.write("vda", 1 * MiB, 64 * KiB, 0x40 + i)
            vm.write("vdb", 2 * MiB, 64 * KiB, 0x50 + i)
    assert [len(backups(repo, vm.name)) for vm in vms] == [2, 2]


def test_first_runs_on_a_new_repository_at_once(vm_factory, repo, tmp_path):
    """Two cron jobs start on a repository that does not exist yet. The second one finds the
    first one creating it (config.json's temporary file written, not yet published): both
    must succeed, and agree on one repository (its id names the bitmaps' namespace)."""
    vms = [vm_factory({"vda": 2 * MiB}, name=name) for name in ("vm1", "vm2")]
    for vm in vms:
        vm.start()
        vm.write("vda", 0, 64 * KiB, 0x11)
    repo.rmdir()  # a path that does not exist yet
    with Run(repo, "full", "vm1", "--qmp", vms[0].qmp_socket, pause="config") as first:
        first.wait_paused()
        second = Run(repo, "full", "vm2", "--qmp", vms[1].qmp_socket)
        with second:
            results = [second.finish(), first.finish()]
    for result in results:
        assert result.returncode == 0, result.describe()
    repo_id = json.loads((repo / "config.json").read_text())["id"]
    for vm in vms:
        assert [r["bitmap"].startswith(f"nbdbackup.{repo_id[:8]}.") for r in records(repo, vm.name)] == [True], \
            (vm.name, repo_id, records(repo, vm.name))
        assert_restores(repo, vm, "latest", snapshot(vm), tmp_path / f"out-{vm.name}")
