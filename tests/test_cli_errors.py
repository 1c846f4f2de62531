"""Bad input: one clear line on stderr, a distinct exit code, nothing changed."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading

import cli
import pytest
from harness import assert_image_equals

from nbdbackup.qmp import QMPSession
from nbdbackup.repository import Repository

KiB, MiB = 1024, 1024 * 1024


def test_vm_without_a_known_socket(repo):
    proc = cli.run(repo, "full", "nosuchvm", expect=3)
    assert "--qmp" in proc.stderr


def test_socket_missing_or_not_a_socket(repo, tmp_path):
    cli.run(repo, "full", "vm1", "--qmp", tmp_path / "missing.sock", expect=3)
    plain = tmp_path / "file"
    plain.write_text("x")
    proc = cli.run(repo, "full", "vm1", "--qmp", plain, expect=3)
    assert "not a socket" in proc.stderr


def test_socket_that_does_not_speak_qmp(repo, tmp_path):
    path = tmp_path / "s"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def babble():
        conn, _ = server.accept()
        conn.sendall(b"220 hello, I am not QEMU\r\n")
        try:
            conn.recv(100)
        except ConnectionResetError:
            pass  # nbdbackup hangs up at once: it saw this is not QMP
        conn.close()

    threading.Thread(target=babble, daemon=True).start()
    proc = cli.run(repo, "full", "vm1", "--qmp", path, expect=3)
    assert "does not speak QMP (it said '220 hello, I am not QEMU')" in proc.stderr
    server.close()


def test_monitor_held_by_another_client_times_out(vm_factory, repo, monkeypatch):
    vm = vm_factory({"vda": 1 * MiB})
    vm.start()
    monkeypatch.setenv("NBDBACKUP_CONNECT_TIMEOUT", "1")
    with QMPSession(vm.qmp_socket):
        proc = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket, expect=3)
    assert "another client" in proc.stderr


def test_vm_with_only_raw_disks(vm_factory, repo):
    vm = vm_factory({"vda": 1 * MiB}, fmt="raw")
    vm.start()
    proc = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket, expect=3)
    assert "qcow2" in proc.stderr
    assert vm.block_state()["bitmaps"][vm.disks["vda"].node] == []


def test_unknown_checkpoints(vm_factory, repo, tmp_path):
    vm = vm_factory({"vda": 1 * MiB})
    vm.start()
    proc = cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, expect=4)
    assert "no checkpoint" in proc.stderr
    cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "a")
    cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--since", "zz", expect=4)
    cli.run(repo, "restore", "vm1", "--to", "zz", "--output", tmp_path / "o", expect=4)
    cli.run(repo, "delete", "vm1", "zz", "--qmp", vm.qmp_socket, expect=4)
    proc = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "a", expect=2)
    assert "already exists" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "x" * 200, "new\nline", ".hidden"])
def test_hostile_names_never_reach_the_filesystem(repo, tmp_path, name):
    cli.run(repo, "full", name, "--qmp", tmp_path / "s", expect=2)
    cli.run(repo, "full", "vm1", "--qmp", tmp_path / "s", "--checkpoint", name, expect=2)
    cli.run(repo, "restore", "vm1", "--to", "x", "--output", tmp_path / "o", "--disk", name, expect=2)
    cli.run(repo, "list", name, expect=2)
    assert not (tmp_path / "evil").exists()


def test_repository_of_a_newer_format(repo, tmp_path):
    proc = cli.run(repo, "list", "vm1", expect=7)  # only a backup creates a repository
    assert "no repository" in proc.stderr
    (repo / "config.json").write_text(json.dumps({"format": "nbdbackup repository", "version": 99, "id": "x"}))
    proc = cli.run(repo, "restore", "vm1", "--to", "x", "--output", tmp_path / "o", expect=7)
    assert "upgrade" in proc.stderr


def test_malformed_or_unreadable_config(repo, tmp_path, monkeypatch):
    conf = tmp_path / "c.toml"
    conf.write_text("[vm.vm1\nqmp=")
    monkeypatch.setenv("NBDBACKUP_TEST_CONFIG", str(conf))
    proc = cli.run(repo, "full", "vm1", "--qmp", tmp_path / "none.sock", expect=2)
    assert "not valid TOML" in proc.stderr
    monkeypatch.setenv("NBDBACKUP_TEST_CONFIG", str(tmp_path / "absent.toml"))
    proc = cli.run(repo, "checkpoints", "vm1", "--qmp", tmp_path / "none.sock", expect=2)
    assert "does not exist" in proc.stderr


def test_a_broken_config_does_not_block_commands_that_need_only_the_repository(repo, tmp_path, monkeypatch):
    """With --repo given, list, restore and verify go on (with a warning) when the config file is broken."""
    conf = tmp_path / "c.toml"
    conf.write_text("[vm.vm1\nqmp=")
    monkeypatch.setenv("NBDBACKUP_TEST_CONFIG", str(conf))
    Repository.open(repo, create=True)
    proc = cli.run(repo, "list", "vm1")
    assert "ignoring the config file" in proc.stderr and "not valid TOML" in proc.stderr
    assert "no backups of vm1" in proc.stderr
    proc = cli.run(repo, "list", "--json")
    assert json.loads(proc.stdout) == []
    proc = cli.run(repo, "verify", "vm1", expect=4)
    assert "ignoring the config file" in proc.stderr and "vm1 has no backups" in proc.stderr
    proc = cli.run(repo, "restore", "vm1", "--to", "latest", "--output", tmp_path / "out", expect=4)
    assert "ignoring the config file" in proc.stderr
    # Commands that need the VM's settings still stop at the broken file.
    proc = cli.run(repo, "full", "vm1", "--qmp", tmp_path / "none.sock", expect=2)
    assert "ignoring" not in proc.stderr


def test_second_run_on_the_same_vm_is_refused_with_the_holders_pid(vm_factory, repo):
    vm = vm_factory({"vda": 1 * MiB})
    vm.start()
    cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket)
    lock = repo / "locks" / "vm-vm1.lock"
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"4242\n", 0)
        proc = cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, expect=5)
        assert "4242" in proc.stderr
    finally:
        os.close(fd)
    cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket)  # a dead holder's lock is simply taken over


def test_usage_errors_exit_2(repo):
    cli.run(repo, "restore", "vm1", expect=2)
    cli.run(repo, "nosuchcommand", expect=2)
    cli.run(repo, "restore", "vm1", "--to", "x", "--output", "o", "--format", "vmdk", expect=2)


def test_qemu_refusing_after_the_freeze_rolls_the_checkpoint_back(vm_factory, repo):
    """QEMU refuses our NBD server (another one serves exports): exit 3, the VM exactly as before."""
    vm = vm_factory({"vda": 1 * MiB, "vdb": 1 * MiB})
    vm.start()
    cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "one")
    before = {d: vm.bitmaps(d) for d in vm.disks}
    vm.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": str(vm.workdir / "other.sock")}})
    vm.qmp("block-export-add", type="nbd", id="theirs", **{"node-name": vm.disks["vdb"].node}, name="x", writable=False)
    proc = cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, expect=3)
    assert "NBD server" in proc.stderr
    state = vm.block_state()
    assert [e["id"] for e in state["exports"]] == ["theirs"] and state["jobs"] == []
    assert not [n for n in state["nodes"] if n.startswith("nbdbackup")]
    assert {d: vm.bitmaps(d) for d in vm.disks} == before
    assert [b["checkpoint"] for b in cli.backups(repo)] == ["one"]
    assert list((repo / "tmp").iterdir()) == []


def test_an_idle_nbd_server_left_behind_is_taken_over(vm_factory, repo):
    vm = vm_factory({"vda": 1 * MiB})
    vm.start()
    vm.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": str(vm.workdir / "stale.sock")}})
    cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket)


def test_two_repositories_back_up_one_vm_without_breaking_each_other(vm_factory, tmp_path):
    vm = vm_factory({"vda": 2 * MiB})
    vm.start()
    a, b = tmp_path / "a", tmp_path / "b"
    vm.write("vda", 0, 64 * KiB, 0x11)
    cli.run(a, "full", "vm1", "--qmp", vm.qmp_socket)
    cli.run(b, "full", "vm1", "--qmp", vm.qmp_socket)
    vm.write("vda", 64 * KiB, 64 * KiB, 0x12)
    cli.run(a, "incremental", "vm1", "--qmp", vm.qmp_socket)
    cli.run(b, "incremental", "vm1", "--qmp", vm.qmp_socket)
    rows = json.loads(cli.run(a, "checkpoints", "vm1", "--qmp", vm.qmp_socket, "--json").stdout)
    assert [r["state"] for r in rows] == ["ok", "ok", "foreign", "foreign", "foreign"]  # b: two checkpoints and the twin
    for repo in (a, b):
        images = cli.restore(repo, vm, "latest", tmp_path / f"out-{repo.name}")
        assert_image_equals(images["vda"], vm.expected("vda"), "qcow2")
