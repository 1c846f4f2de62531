"""A --qmp socket that is not a free QMP monitor: the error says what it is, quickly."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import cli
import pytest
from harness import QEMU_SYSTEM

SOCKETS = ("qmp", "hmp", "qga")


@pytest.fixture
def qemu_sockets():
    """A paused QEMU with a QMP monitor, a human monitor (HMP) and a guest agent channel
    (no guest runs, so no agent answers on it): socket name -> path."""
    d = Path(tempfile.mkdtemp(prefix="nbdb-q-"))
    paths = {name: d / f"{name}.sock" for name in SOCKETS}
    proc = subprocess.Popen(
        [QEMU_SYSTEM, "-machine", "q35,accel=tcg", "-nodefaults", "-S", "-display", "none",
         "-qmp", f"unix:{paths['qmp']},server=on,wait=off", "-monitor", f"unix:{paths['hmp']},server=on,wait=off",
         "-chardev", f"socket,id=qga0,path={paths['qga']},server=on,wait=off",
         "-device", "virtio-serial-pci", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not all(p.exists() for p in paths.values()):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "QEMU did not create its sockets"
            time.sleep(0.01)
        yield paths
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def error_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.qemu
def test_human_monitor_socket(qemu_sockets, repo):
    line = error_line(cli.run(repo, "full", "vm1", "--qmp", qemu_sockets["hmp"], expect=3))
    assert "human monitor (HMP), not QMP" in line and "-qmp" in line, line


@pytest.mark.qemu
def test_guest_agent_socket_is_told_apart_quickly(qemu_sockets, repo):
    started = time.monotonic()
    line = error_line(cli.run(repo, "full", "vm1", "--qmp", qemu_sockets["qga"], expect=3))
    took = time.monotonic() - started
    assert "sent no QMP greeting: it is not a QMP monitor (a guest agent" in line, line
    assert "another client" not in line
    assert took < 8, f"took {took:.1f}s; the connect timeout is 10s"  # about 2 s of probing plus Python's start


@pytest.mark.qemu
def test_held_monitor_says_so_every_time(qemu_sockets, repo, monkeypatch):
    """The first waiters sit in the listen queue; once it is full, connecting fails at once (EAGAIN)."""
    monkeypatch.setenv("NBDBACKUP_CONNECT_TIMEOUT", "1.5")
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.connect(str(qemu_sockets["qmp"]))
    assert holder.recv(100).startswith(b'{"QMP"')
    try:
        lines = [error_line(cli.run(repo, "full", "vm1", "--qmp", qemu_sockets["qmp"], expect=3)) for _ in range(4)]
    finally:
        holder.close()
    for line in lines:
        assert "is in use by another client" in line and "QMP monitor of its own" in line, lines
    assert "queued behind it" in lines[-1], lines
    # and once the other client is gone, QEMU serves nbdbackup again, after it has accepted and
    # dropped the abandoned waiters one by one: until then its listen queue may still be full
    deadline = time.monotonic() + 30
    while True:
        line = error_line(cli.run(repo, "full", "vm1", "--qmp", qemu_sockets["qmp"], expect=3))
        if "is in use by another client" not in line or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "no qcow2 disk" in line, line


def serve(path: Path, answer) -> socket.socket:
    """A unix socket server that accepts one client and calls answer(conn)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def run():
        conn, _ = server.accept()
        with conn:
            answer(conn)

    threading.Thread(target=run, daemon=True).start()
    return server


def test_answering_guest_agent_is_named(tmp_path, repo, monkeypatch):
    """A guest agent (this fake answers guest-sync as qemu-guest-agent does) is named as such."""
    monkeypatch.setenv("NBDBACKUP_CONNECT_TIMEOUT", "0.2")  # probed after 0.2 s without a greeting, not 1 s
    def agent(conn):
        request = json.loads(conn.recv(4096))
        assert request["execute"] == "guest-sync"
        conn.sendall(json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n")
        conn.recv(100)

    server = serve(tmp_path / "qga.sock", agent)
    try:
        line = error_line(cli.run(repo, "full", "vm1", "--qmp", tmp_path / "qga.sock", expect=3))
    finally:
        server.close()
    assert "is the socket of the VM's guest agent, not of its QMP monitor" in line and "--qga" in line, line


def test_socket_nobody_listens_on(tmp_path, repo):
    """The socket file of a QEMU that exited stays behind: nothing listens on it."""
    path = tmp_path / "gone.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    line = error_line(cli.run(repo, "full", "vm1", "--qmp", path, expect=3))
    assert "nothing listens on QMP socket" in line, line
