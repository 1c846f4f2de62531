"""A checkpoint chain belongs to one VM name: another name for the same QEMU never touches it."""

from __future__ import annotations

import cli
from faults import NOTHING_LEFT, manifest, qemu_leftovers

KiB, MiB = 1024, 1024 * 1024


def bitmaps(vm):
    """Every bitmap of every disk, with all QEMU shows of it."""
    return {d: sorted((b["name"], b["recording"], b["persistent"], b["count"]) for b in vm.bitmaps(d)) for d in vm.disks}


def test_second_name_is_refused_and_the_chain_goes_on(vm_factory, repo):
    vm = vm_factory({"vda": 4 * MiB, "vdb": 2 * MiB}, name="vm3")
    vm.start()
    vm.write("vda", 0, 256 * KiB, 0x11)
    cli.run(repo, "full", "vm3", "--qmp", vm.qmp_socket, "--checkpoint", "one")
    vm.write("vda", 1 * MiB, 64 * KiB, 0x12)  # the active bitmap holds something: clearing it would show
    before = bitmaps(vm)

    for command in (("full",), ("auto",), ("incremental",), ("delete", "latest")):
        proc = cli.run(repo, command[0], "vm3x", *command[1:], "--qmp", vm.qmp_socket, expect=4)
        line = proc.stderr.strip().splitlines()[-1]
        assert "'vm3'" in line and "'vm3x'" in line and "-name vm3" in line, line
        assert "--force-new-chain" in line, line
        assert bitmaps(vm) == before, command
        assert qemu_leftovers(vm) == NOTHING_LEFT
    assert not (repo / "vms" / "vm3x" / "backups").exists() or not list((repo / "vms" / "vm3x" / "backups").iterdir())

    # `checkpoints vm3x` shows vm3's bitmaps as another VM's, left alone
    rows = cli.run(repo, "checkpoints", "vm3x", "--qmp", vm.qmp_socket, "--json").stdout
    assert "belongs to VM vm3 of this repository" in rows, rows

    vm.write("vdb", 0, 64 * KiB, 0x21)
    name = cli.run(repo, "auto", "vm3", "--qmp", vm.qmp_socket).stdout.strip()
    m = manifest(repo, name, vm="vm3")
    assert m["kind"] == "incremental" and m["since"] == "one", m
    assert sum(d["read_bytes"] for d in m["disks"]) == 2 * 64 * KiB


def test_force_new_chain_hands_the_qemu_to_the_new_name(vm_factory, repo):
    vm = vm_factory({"vda": 4 * MiB}, name="vm3")
    vm.start()
    vm.write("vda", 0, 64 * KiB, 0x11)
    cli.run(repo, "full", "vm3", "--qmp", vm.qmp_socket, "--checkpoint", "one")
    old = [b["name"] for b in vm.bitmaps("vda")]

    proc = cli.run(repo, "incremental", "vm3x", "--qmp", vm.qmp_socket, "--force-new-chain", expect=2)
    assert "No such option" in proc.stderr  # only a full backup starts a chain
    cli.run(repo, "full", "vm3x", "--qmp", vm.qmp_socket, "--force-new-chain", "--checkpoint", "new")
    now = [b["name"] for b in vm.bitmaps("vda")]
    assert not any(b.endswith(".one") for b in now) and any(b.endswith(".new") for b in now), (old, now)

    # now vm3 is the other name: refused, vm3x's chain untouched; vm3x goes on incrementally
    before = bitmaps(vm)
    line = cli.run(repo, "auto", "vm3", "--qmp", vm.qmp_socket, expect=4).stderr.strip().splitlines()[-1]
    assert "'vm3x'" in line and "'vm3'" in line, line
    assert bitmaps(vm) == before
    vm.write("vda", 2 * MiB, 64 * KiB, 0x12)
    name = cli.run(repo, "auto", "vm3x", "--qmp", vm.qmp_socket).stdout.strip()
    assert manifest(repo, name, vm="vm3x")["kind"] == "incremental"
