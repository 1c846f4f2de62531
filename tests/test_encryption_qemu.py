"""Encrypted repositories end to end: real QEMU, full + incremental, restore, verify, tampering."""

from __future__ import annotations

import json
import os
import re
import subprocess

import cli
import pytest
from harness import assert_image_equals

KiB, MiB = 1024, 1024 * 1024
SIZES = {"vda": 6 * MiB + 512, "vdb": 3 * MiB + 64 * KiB}
PASSPHRASE = "correct horse battery staple"


@pytest.fixture
def encrypted_env(tmp_path, monkeypatch):
    """A passphrase file and a config file asking for an encrypted repository (the first backup creates it)."""
    pw = cli.use_passphrase(monkeypatch, tmp_path, PASSPHRASE)
    conf = tmp_path / "config.toml"
    conf.write_text('encryption = "repokey"\n')
    monkeypatch.setenv("NBDBACKUP_TEST_CONFIG", str(conf))
    return pw


def shown(name: str) -> str:
    """name without its encrypted parts (128 base32 characters: these may contain 'vda' by chance)."""
    return re.sub(r"[a-z2-7]{128}", "<E>", name)


def all_names(root):
    return [os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files]


def test_full_and_incremental_into_encrypted_repository(vm_factory, repo, tmp_path, encrypted_env, monkeypatch):
    vm = vm_factory(SIZES)
    vm.start()
    vm.write("vda", 0, 1 * MiB, 0x11)
    vm.write("vdb", 64 * KiB, 200 * KiB, 0x22)
    vm.write("vda", 4 * MiB, 1 * MiB, 0x11)  # the same content again: deduplicated
    full = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "secretcp1").stdout.strip()
    expected_full = {d: vm.expected(d) for d in vm.disks}
    vm.write("vda", 512 * KiB, 128 * KiB, 0x33)
    vm.write("vdb", SIZES["vdb"] - 512, 512, 0x44)
    inc = cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "secretcp2").stdout.strip()
    expected_inc = {d: vm.expected(d) for d in vm.disks}

    config = json.loads((repo / "config.json").read_text())
    assert config["encryption"]["mode"] == "repokey" and config["chunk_id"] == {"algorithm": "blake3-tree-keyed", "piece": 262144}

    for name, expected in ((full, expected_full), (inc, expected_inc)):
        for disk, path in cli.restore(repo, vm, name, tmp_path / name).items():
            assert_image_equals(path, expected[disk], "qcow2")
    verified = cli.run(repo, "verify", "vm1").stdout
    assert f"{full}  ok" in verified and f"{inc}  ok" in verified

    # Nothing the store holds names the VM, a disk or a checkpoint, nor shows their content.
    names = all_names(repo)
    for secret in ("vm1", "vda", "vdb", "secretcp1", "secretcp2"):
        assert not any(secret in shown(n) for n in names), (secret, names)
    # (config.json and keys/ are plain JSON without names; locks/ hold only a pid, see docs/FORMAT.md)
    assert {p.read_text().strip() for p in (repo / "locks").iterdir()} <= {""} | {str(n) for n in range(1, 1 << 22)}
    for path in (p for p in repo.rglob("*") if p.is_file() and p.name != "config.json" and p.parent.name not in ("keys", "locks")):
        blob = path.read_bytes()
        assert blob[:4] == b"NBDE", path
        for secret in (b"vm1", b"vda", b"secretcp1", bytes([0x11]) * 64, bytes([0x22]) * 64, b"NBDC", b"NBDBIDX"):
            assert secret not in blob, (path, secret)
    # Dedup inside the repository: 1 MiB of 0x11 twice on vda is stored once.
    chunks = list((repo / "chunks").rglob("*"))
    assert sum(p.stat().st_size for p in chunks if p.is_file()) < 2 * MiB

    # Without the passphrase, or with a wrong one: nothing works, nothing changes.
    before = sorted(all_names(repo))
    monkeypatch.delenv("NBDBACKUP_PASSWORD_FILE")
    cli.run(repo, "list", "vm1", expect=18)
    cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, expect=18)
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    monkeypatch.setenv("NBDBACKUP_PASSWORD_FILE", str(wrong))
    cli.run(repo, "restore", "vm1", "--to", "latest", "--output", tmp_path / "nope", expect=19)
    cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, expect=19)
    assert sorted(all_names(repo)) == before
    assert not (tmp_path / "nope").exists()
    monkeypatch.setenv("NBDBACKUP_PASSWORD_COMMAND", f"cat {encrypted_env}")
    monkeypatch.delenv("NBDBACKUP_PASSWORD_FILE")
    cli.run(repo, "list", "vm1")

    # A flipped bit in a chunk: verify names backup, disk and offset, exit 6.
    victim = max((p for p in chunks if p.is_file()), key=lambda p: p.stat().st_size)
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    victim.write_bytes(bytes(blob))
    proc = cli.run(repo, "verify", "vm1", expect=6)
    assert "DAMAGED" in proc.stdout and "authentication" in proc.stdout and "offset" in proc.stdout
    assert "vda" in proc.stdout and full in proc.stdout


def test_swapped_objects_are_detected(vm_factory, repo, tmp_path, encrypted_env):
    """A store that puts one valid object in another's place is caught: the name is authenticated."""
    vm = vm_factory({"vda": 2 * MiB, "vdb": 1 * MiB})
    vm.start()
    vm.write("vda", 0, 1 * MiB, 0x55)
    cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "a")
    vm.write("vda", 0, 1 * MiB, 0x66)
    cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "b")
    manifests = sorted(repo.glob("vms/*/backups/*/manifest.json"))
    assert len(manifests) == 2
    manifests[0].write_bytes(manifests[1].read_bytes())  # backup a's manifest replaced by b's (a valid object)
    proc = cli.run(repo, "verify", "vm1", expect=6)
    assert "authentication" in proc.stdout + proc.stderr
    codes = {subprocess.run(cli.command(repo, "restore", "vm1", "--to", cp, "--output", tmp_path / cp), env=cli.environment(),
                            capture_output=True).returncode for cp in "ab"}
    assert codes == {0, 6}  # the untouched backup restores, the swapped one is refused


@pytest.mark.s3
def test_encrypted_s3_repository_and_reencrypting_copy(vm_factory, s3_repo, repo, tmp_path, monkeypatch):
    """Full + incremental into an encrypted S3 repository (real SeaweedFS), restore, verify; no names in
    object keys; then `copy` to an encrypted directory repository with its own key (re-encrypted)."""
    pw = tmp_path / "pw"
    pw.write_text(PASSPHRASE + "\n")
    monkeypatch.setenv("NBDBACKUP_PASSWORD_FILE", str(pw))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    url = s3_repo.url
    cli.run(url, "init", "--encryption", "repokey")
    vm = vm_factory({"vda": 4 * MiB, "vdb": 1 * MiB})
    vm.start()
    vm.write("vda", 0, 1 * MiB, 0x61)
    cli.run(url, "full", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "s3cp1")
    vm.write("vdb", 64 * KiB, 64 * KiB, 0x62)
    cli.run(url, "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "s3cp2")
    expected = {d: vm.expected(d) for d in vm.disks}
    keys = s3_repo.keys()
    assert any(k.startswith("repo/keys/") for k in keys) and any(k.startswith("repo/chunks/") for k in keys)
    for secret in ("vm1", "vda", "vdb", "s3cp"):
        assert not any(secret in shown(k) for k in keys), (secret, keys)
    for disk, path in cli.restore(url, vm, "s3cp2", tmp_path / "s3out").items():
        assert_image_equals(path, expected[disk], "qcow2")
    assert json.loads(cli.run(url, "verify", "vm1", "--json").stdout)["damaged"] == 0

    # copy to an encrypted directory repository with another passphrase and master key
    other_pw = tmp_path / "other"
    other_pw.write_text("the other passphrase\n")
    monkeypatch.setenv("NBDBACKUP_PASSWORD_FILE", str(other_pw))
    cli.run(repo, "init", "--encryption", "repokey")
    monkeypatch.setenv("NBDBACKUP_PASSWORD_FILE", str(pw))
    proc = subprocess.run(cli.command(url, "copy", "vm1", "--to", str(repo), "--all"), capture_output=True, text=True,
                          env={**cli.environment(), "NBDBACKUP_PASSWORD_FILE": str(pw)}, timeout=300)
    # one passphrase variable serves both repositories: the target's differs, so the copy is refused cleanly
    assert proc.returncode == 19 and "Traceback" not in proc.stderr
    assert not (repo / "vms").exists()
    monkeypatch.setenv("NBDBACKUP_TARGET_PASSWORD_FILE", str(other_pw))
    copied = json.loads(cli.run(url, "copy", "vm1", "--to", str(repo), "--all", "--json").stdout)
    assert [b["copied"] for b in copied["backups"]] == [True, True]
    monkeypatch.delenv("NBDBACKUP_TARGET_PASSWORD_FILE")
    monkeypatch.setenv("NBDBACKUP_PASSWORD_FILE", str(other_pw))
    for disk, path in cli.restore(repo, vm, "s3cp2", tmp_path / "copied").items():
        assert_image_equals(path, expected[disk], "qcow2")
    assert json.loads(cli.run(repo, "verify", "vm1", "--json").stdout)["damaged"] == 0
    s3_chunks = {k.rsplit("/", 1)[1] for k in keys if k.startswith("repo/chunks/")}
    dir_chunks = {p.name for p in (repo / "chunks").rglob("*") if p.is_file()}
    assert dir_chunks and not s3_chunks & dir_chunks  # each repository's own chunk-id key
