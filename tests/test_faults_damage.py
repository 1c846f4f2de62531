"""A damaged repository: restore refuses with exit 6 and names what is damaged; the
backups that do not depend on the damaged object still restore identically.

(`verify` is tested elsewhere; here only `restore`.)
"""

from __future__ import annotations

import subprocess

import cli
import pytest
from faults import Result, assert_one_line_error, assert_restores, backup, snapshot

from nbdbackup.repository.index import decode

KiB, MiB = 1024, 1024 * 1024
CHUNK = 4 * MiB


def entries(repo, checkpoint, disk):
    return decode((repo / "vms" / "vm1" / "backups" / checkpoint / f"{disk}.index").read_bytes(), "test")[1]


def chunk_path(repo, cid: bytes):
    return repo / "chunks" / cid.hex()[:2] / cid.hex()


@pytest.fixture
def three_backups(vm_factory, repo):
    """Backups one (full), two, three; two's vda data at 4 MiB lies in a chunk no other backup uses
    (chunks are content-addressed, so the setup must make sure of that)."""
    vm = vm_factory({"vda": 12 * MiB, "vdb": 4 * MiB + 512})
    vm.start()
    vm.write("vda", 0, 1 * MiB, 0x11)
    vm.write("vda", 4 * MiB + 128 * KiB, 256 * KiB, 0x12)
    vm.write("vda", 8 * MiB, 64 * KiB, 0x13)
    vm.write("vdb", 0, 512 * KiB, 0x21)
    expected = {}
    backup(repo, vm, "full", "--checkpoint", "one")
    expected["one"] = snapshot(vm)
    vm.write("vda", 4 * MiB, 64 * KiB, 0x14)  # the chunk at 4 MiB changes
    backup(repo, vm, "incremental", "--checkpoint", "two")
    expected["two"] = snapshot(vm)
    vm.write("vda", 4 * MiB, 64 * KiB, 0x15)  # overwritten again: two's data there is two's alone
    vm.write("vdb", 1 * MiB, 64 * KiB, 0x22)
    backup(repo, vm, "incremental", "--checkpoint", "three")
    expected["three"] = snapshot(vm)
    return vm, expected


def victim(repo):
    """(chunk id, disk offset) of the vda entry of backup two that only two references."""
    others = {e.chunk for cp in ("one", "three") for d in ("vda", "vdb") for e in entries(repo, cp, d)}
    mine = [e for e in entries(repo, "two", "vda") if e.chunk not in others]
    assert mine, "test setup: backup two has no chunk of its own"
    return mine[0].chunk, mine[0].offset


def restore_fails(repo, vm, checkpoint, out) -> str:
    proc = subprocess.run(cli.command(repo, "restore", vm.name, "--to", checkpoint, "--output", out),
                              capture_output=True, text=True, env=cli.environment(), timeout=120)
    line = assert_one_line_error(Result(proc.returncode, proc.stdout, proc.stderr), 6)
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == [], f"a failed restore left {left} in its output directory"
    return line


def others_restore(repo, vm, expected, tmp_path, checkpoints=("one", "three")):
    for cp in checkpoints:
        assert_restores(repo, vm, cp, expected[cp], tmp_path / f"ok-{cp}")


def test_flipped_byte_in_a_chunk(three_backups, repo, tmp_path):
    vm, expected = three_backups
    cid, offset = victim(repo)
    path = chunk_path(repo, cid)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(blob)
    line = restore_fails(repo, vm, "two", tmp_path / "out")
    assert cid.hex() in line and "backup two" in line and "disk vda" in line and f"offset {offset}" in line, line
    others_restore(repo, vm, expected, tmp_path)


def test_missing_chunk(three_backups, repo, tmp_path):
    vm, expected = three_backups
    cid, offset = victim(repo)
    chunk_path(repo, cid).unlink()
    line = restore_fails(repo, vm, "two", tmp_path / "out")
    assert "missing" in line and cid.hex() in line and "backup two" in line and "disk vda" in line and f"offset {offset}" in line, line
    others_restore(repo, vm, expected, tmp_path)


def test_truncated_index(three_backups, repo, tmp_path):
    vm, expected = three_backups
    path = repo / "vms" / "vm1" / "backups" / "two" / "vda.index"
    path.write_bytes(path.read_bytes()[:-20])
    line = restore_fails(repo, vm, "two", tmp_path / "out")
    assert "backup two" in line and "disk vda" in line, line
    others_restore(repo, vm, expected, tmp_path)


def test_truncated_manifest(three_backups, repo, tmp_path):
    """The damaged backup is refused, naming it; the other backups are unaffected."""
    vm, expected = three_backups
    path = repo / "vms" / "vm1" / "backups" / "two" / "manifest.json"
    path.write_bytes(path.read_bytes()[:-40])
    others_restore(repo, vm, expected, tmp_path)
    line = restore_fails(repo, vm, "two", tmp_path / "out")
    assert "backup two" in line, line


def test_a_damaged_base_makes_auto_run_a_full_and_latest_refuse_to_guess(three_backups, repo, tmp_path):
    """The manifest of three (the base of the next incremental) is damaged: `incremental` exits 6,
    `auto` makes a full backup instead; `restore --to latest` will not guess which backup is newest."""
    vm, expected = three_backups
    manifest = repo / "vms" / "vm1" / "backups" / "three" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:-20])
    vm.write("vda", 0, 64 * KiB, 0x16)
    cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, expect=6)
    proc = cli.run(repo, "restore", "vm1", "--to", "latest", "--output", tmp_path / "latest", expect=6)
    assert "--to CHECKPOINT" in proc.stderr
    proc = cli.run(repo, "auto", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "four")
    [fallback] = [line for line in proc.stderr.splitlines() if "WARNING" in line]  # said once, at warning level
    assert fallback.startswith("nbdbackup: WARNING: vm1: full backup instead of an incremental one: "), proc.stderr
    assert_restores(repo, vm, "four", snapshot(vm), tmp_path / "four")
    assert_restores(repo, vm, "two", expected["two"], tmp_path / "two")
