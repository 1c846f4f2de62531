"""serve: backup points as NBD exports by nbdkit, read with real NBD clients (nbdcopy, nbdinfo, qemu-img)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import cli
import pytest
from harness import first_difference

from nbdbackup.nbdio import NbdEndpoint

KiB, MiB = 1024, 1024 * 1024
SIZES = {"vda": 8 * MiB + 512, "vdb": 4 * MiB}


class Served:
    """A running `nbdbackup serve`: its process and the URIs it printed."""

    def __init__(self, repo: Path, *args: str, disks: int = 1) -> None:
        self.proc = cli.start(repo, "serve", *args)
        line = self.proc.stderr.readline()  # "serving backup ..." comes after the URIs
        if "serving backup" not in line:
            raise AssertionError(f"serve: {line}{self.proc.stderr.read()} (exit {self.proc.wait()})")
        self.uris = [self.proc.stdout.readline().strip() for _ in range(disks)]

    def uri(self, disk: str) -> str:
        return next(u for u in self.uris if f"/{disk}" in u)

    def stop(self, sig: int = signal.SIGINT) -> subprocess.CompletedProcess:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=30)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)


def nbd_bytes(uri: str, tmp_path: Path, name: str) -> bytes:
    out = tmp_path / f"{name}.raw"
    subprocess.run(["nbdcopy", uri, str(out)], check=True, capture_output=True)
    return out.read_bytes()


def nbd_map(uri: str) -> list[dict]:
    return json.loads(subprocess.run(["nbdinfo", "--map", "--json", uri], check=True, capture_output=True, text=True).stdout)


def no_nbdkit_left(repo: Path) -> None:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"repo={repo}" not in ps, ps


def small_reads_equal(uri: str, expected: bytes, reads: int = 24) -> None:
    """4 KiB reads at scattered places, never where the last one ended (what a booting guest
    does: a format 3 repository answers each with one piece of a chunk), equal to expected."""
    import random

    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        data = [off for off in range(0, len(expected), 4096) if expected[off:off + 4096].count(0) != 4096]
        assert data
        rnd = random.Random(len(expected))
        for off in sorted(set(rnd.sample(data, min(reads, len(data)))), reverse=True):  # backwards: never sequential
            assert h.pread(4096, off) == expected[off:off + 4096], off
    finally:
        h.shutdown()


def test_serve_full_and_incremental_points(vm_factory, any_repo, tmp_path, request):
    """On every kind of repository: directory or S3, encrypted or not."""
    repo = any_repo
    vm = vm_factory(SIZES)
    vm.start()
    vm.write("vda", 0, 1 * MiB, 0x11)
    vm.write("vda", 5 * MiB, 64 * KiB, 0x22)
    vm.write("vda", SIZES["vda"] - 512, 512, 0x33)
    vm.write("vdb", 2 * MiB, 100 * KiB, 0x44)
    full_expected = {d: vm.expected(d) for d in vm.disks}
    full = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket).stdout.strip()
    vm.write("vda", 512 * KiB, 64 * KiB, 0x55)
    vm.write_zeroes("vdb", 2 * MiB, 64 * KiB)
    vm.write("vdb", 3 * MiB, 4 * KiB, 0x66)
    inc_expected = {d: vm.expected(d) for d in vm.disks}
    inc = cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket).stdout.strip()

    for name, expected in ((full, full_expected), (inc, inc_expected)):
        server = Served(repo, "vm1", "--to", name, disks=2)
        try:
            assert len(server.uris) == 2
            for disk in vm.disks:  # small reads here and there first, on a fresh server: pieces of chunks
                small_reads_equal(server.uri(disk), expected[disk])
            for disk in vm.disks:
                uri = server.uri(disk)
                data = nbd_bytes(uri, tmp_path, f"{name}-{disk}")
                assert first_difference(data, expected[disk]) is None, f"{name} {disk} differs"
                # qemu-img reads the same export and agrees with the reference image.
                ref = tmp_path / f"{name}-{disk}.ref"
                ref.write_bytes(expected[disk])
                subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref), uri], check=True, capture_output=True)
            # Holes are reported: vdb has 4 MiB with only a little data.
            extents = nbd_map(server.uri("vdb"))
            holes = sum(e["length"] for e in extents if e["type"] & 1)
            data = sum(e["length"] for e in extents if not e["type"] & 1)
            assert holes >= SIZES["vdb"] - 256 * KiB and data <= 256 * KiB, extents
            assert sum(e["length"] for e in extents) == SIZES["vdb"]
        finally:
            done = server.stop()
        assert done.returncode == 0, done.stderr
        assert "stopped serving" in done.stderr
    no_nbdkit_left(repo)
    if str(repo).startswith("s3://"):  # nbdkit's lock too, though it was killed
        assert request.getfixturevalue("s3_repo").keys("repo/locks/") == []


def test_serve_multi_conn_several_clients_tcp_and_writable(vm_factory, repo, tmp_path):
    vm = vm_factory({"vda": 16 * MiB})
    vm.start()
    for i in range(8):
        vm.write("vda", i * 2 * MiB, 256 * KiB, 0x10 + i)
    expected = vm.expected("vda")
    name = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket).stdout.strip()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Served(repo, "vm1", "--to", name, "--tcp", f"127.0.0.1:{port}")
    try:
        uri = server.uri("vda")
        assert uri == f"nbd://127.0.0.1:{port}/vda"
        info = json.loads(subprocess.run(["nbdinfo", "--json", uri], check=True, capture_output=True, text=True).stdout)
        export = info["exports"][0]
        assert export["can_multi_conn"] is True and export["is_read_only"] is True
        # Several clients at once, each with 4 connections.
        copies = [subprocess.Popen(["nbdcopy", "-C", "4", uri, str(tmp_path / f"c{i}.raw")]) for i in range(3)]
        assert [c.wait(timeout=120) for c in copies] == [0, 0, 0]
        for i in range(3):
            assert (tmp_path / f"c{i}.raw").read_bytes() == expected
        # A second server on the same address: one line, exit 13, nothing left.
        cli.run(repo, "serve", "vm1", "--to", name, "--tcp", f"127.0.0.1:{port}", expect=13)
    finally:
        assert server.stop().returncode == 0

    sock = tmp_path / "rw.sock"
    server = Served(repo, "vm1", "--to", name, "--socket", str(sock), "--writable")
    try:
        uri = server.uri("vda")
        # Writes are accepted and read back ...
        with NbdEndpoint(sock, "vda", writable=True) as ep:
            ep.pwrite(b"\xee" * 65536, 0)
            ep.flush()
        with NbdEndpoint(sock, "vda") as ep:
            assert ep.pread(65536, 0) == b"\xee" * 65536
            assert ep.pread(MiB, 2 * MiB) == expected[2 * MiB:3 * MiB]
        # ... the rest is the backup; the socket in use refuses a second server (exit 13).
        cli.run(repo, "serve", "vm1", "--to", name, "--socket", str(sock), expect=13)
    finally:
        assert server.stop(signal.SIGTERM).returncode == 0
    assert not sock.exists()
    # The repository never saw the writes: served read-only again, the backup is intact.
    server = Served(repo, "vm1", "--to", name, "--socket", str(sock))
    try:
        assert nbd_bytes(server.uri("vda"), tmp_path, "after") == expected
    finally:
        server.stop()
    no_nbdkit_left(repo)


def test_serve_bad_input(vm_factory, repo, tmp_path):
    vm = vm_factory({"vda": 1 * MiB})
    vm.start()
    vm.write("vda", 0, 64 * KiB, 0x11)
    name = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket).stdout.strip()
    cli.run(repo, "serve", "vm1", "--to", "nosuch", expect=4)
    cli.run(repo, "serve", "vm1", "--to", name, "--disk", "vdz", expect=2)
    cli.run(repo, "serve", "vm1", "--to", name, "--tcp", "10809", expect=2)
    not_socket = tmp_path / "file"
    not_socket.write_text("x")
    cli.run(repo, "serve", "vm1", "--to", name, "--socket", str(not_socket), expect=13)
    assert not_socket.read_text() == "x"
    no_nbdkit_left(repo)
    # Killed without warning: nbdkit dies with it (--exit-with-parent).
    server = Served(repo, "vm1", "--to", name)
    server.proc.kill()
    server.proc.wait()
    deadline = time.monotonic() + 10
    while f"repo={repo}" in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, "nbdkit outlived a killed serve"
        time.sleep(0.1)
    # Its private directory stays (nothing could remove it) until the next serve.
    left = Path(server.uris[0].split("socket=", 1)[1]).parent
    assert left.is_dir()
    Served(repo, "vm1", "--to", name).stop()
    assert not left.exists()


@pytest.mark.parametrize("any_repo", ["encrypted", "s3-encrypted"], indirect=True)
def test_serve_mount_recover_without_the_right_key(vm_factory, any_repo, tmp_path, monkeypatch):
    """No passphrase, a wrong one, another repository's key, a damaged key file: serve, mount and
    recover stop with the key's exit code and one line, before anything is set up: no server, no
    private directory, no mount, no image."""
    from nbdbackup.mounting import state_dir

    repo = any_repo
    vm = vm_factory({"vda": 1 * MiB})
    vm.start()
    vm.write("vda", 0, 64 * KiB, 0x11)
    name = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket).stdout.strip()
    other = tmp_path / "other"
    cli.run(other, "init", "--encryption", "repokey")
    foreign = tmp_path / "foreign.json"
    cli.run(other, "key", "export", str(foreign))
    damaged = tmp_path / "damaged.json"
    damaged.write_text("{ not a key file")
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    runtime = tmp_path / "runtime"  # where serve's private directories go: seen empty afterwards
    runtime.mkdir()
    monkeypatch.setenv("TMPDIR", str(runtime))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    where = tmp_path / "mnt"
    where.mkdir()
    out = tmp_path / "recovered"
    cases = [(18, {"NBDBACKUP_PASSWORD_FILE": None}), (19, {"NBDBACKUP_PASSWORD_FILE": str(wrong)}),
             (20, {"NBDBACKUP_KEY_FILE": str(foreign)}), (21, {"NBDBACKUP_KEY_FILE": str(damaged)})]
    for code, env in cases:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.delenv(k) if v is None else m.setenv(k, v)
            cli.run(repo, "serve", "vm1", "--to", name, expect=code)
            cli.run(repo, "serve", "vm1", "--to", name, "--socket", str(tmp_path / "s.sock"), expect=code)
            cli.run(repo, "mount", "vm1", str(where), "--to", name, expect=code)
            cli.run(repo, "recover", "vm1", "--to", name, "--output", str(out), "--qmp", str(vm.qmp_socket), expect=code)
        no_nbdkit_left(repo)
        assert list(runtime.iterdir()) == [] and not (tmp_path / "s.sock").exists()
        assert list(where.iterdir()) == [] and not os.path.ismount(where) and not state_dir(where).exists()
        assert not out.exists()
    # With the key, the same commands work (nothing was left in their way).
    server = Served(repo, "vm1", "--to", name)
    try:
        assert nbd_bytes(server.uri("vda"), tmp_path, "ok") == vm.expected("vda")
    finally:
        assert server.stop().returncode == 0
    assert list(runtime.iterdir()) == []
