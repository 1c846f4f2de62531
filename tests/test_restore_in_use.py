"""restore --force never replaces a file that a running process writes (issue 9, item 3).

QEMU keeps writing to the inode it opened: replacing a running VM's image
under it makes the restored image silently diverge from what the VM sees.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import cli
import pytest
from harness import QEMU_SYSTEM, assert_image_equals

from nbdbackup.inuse import QEMU_WRITE_LOCK_BYTE, in_use, qemu_write_locked, writers

KiB, MiB = 1024, 1024 * 1024


def hold(path: Path, mode: str, *, ofd_lock: bool = False) -> subprocess.Popen[str]:
    """A process holding path open (mode "r" or "r+"), optionally with QEMU's write-permission lock."""
    code = (
        "import fcntl, os, struct, sys, time\n"
        f"f = open({str(path)!r}, {mode + 'b'!r})\n"
        + (f"fcntl.fcntl(f.fileno(), fcntl.F_OFD_SETLK, struct.pack('hhqqi4x', fcntl.F_RDLCK, 0, {QEMU_WRITE_LOCK_BYTE}, 1, 0))\n"
           if ofd_lock else "")
        + "print('ready', flush=True)\ntime.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.fixture
def holders():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def test_writers_are_found_by_pid_and_command_readers_are_not(tmp_path, holders):
    f = tmp_path / "disk.img"
    f.write_bytes(b"x" * 4096)
    holders.append(hold(f, "r"))
    assert writers(f) == [] and in_use(f) is None  # a reader does not block a restore
    writer = hold(f, "r+")
    holders.append(writer)
    [found] = writers(f)
    assert found.pid == writer.pid and found.command.startswith("python")
    usage = in_use(f)
    assert usage is not None and f"process {writer.pid} (python" in usage.describe()


def test_qemus_image_lock_is_seen_even_without_a_writable_descriptor(tmp_path, holders):
    f = tmp_path / "disk.img"
    f.write_bytes(b"x" * 4096)
    assert not qemu_write_locked(f)
    holders.append(hold(f, "r", ofd_lock=True))  # what /proc cannot show: only the lock
    assert qemu_write_locked(f) and writers(f) == []
    assert "locked for writing by a QEMU process" in in_use(f).describe()


def start_qemu_on(image: Path, workdir: Path) -> subprocess.Popen[bytes]:
    """A real QEMU VM (stopped guest, -S) whose virtio disk is image, as a user would start it."""
    proc = subprocess.Popen([QEMU_SYSTEM, "-machine", "q35,accel=tcg", "-nodefaults", "-S", "-display", "none",
                             "-drive", f"file={image},format=qcow2,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0,id=vda"],
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "qemu.err", "wb"))
    deadline = time.monotonic() + 30
    while not qemu_write_locked(image):
        assert proc.poll() is None, (workdir / "qemu.err").read_text()
        assert time.monotonic() < deadline, "QEMU did not lock its image"
        time.sleep(0.05)
    return proc


@pytest.mark.qemu
def test_restore_force_refuses_the_image_of_a_running_vm(vm_factory, repo, tmp_path):
    vm = vm_factory({"vda": 2 * MiB})
    vm.start()
    vm.write("vda", 0, 128 * KiB, 0x41)
    cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "one")
    out = tmp_path / "out"
    image = cli.restore(repo, vm, "one", out)["vda"]  # the administrator boots the restored image...
    qemu = start_qemu_on(image, tmp_path)
    try:
        vm.write("vda", 0, 64 * KiB, 0x42)
        cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "two")
        before = image.stat()
        # ...and later restores over it with --force while that VM runs: refused, nothing replaced.
        proc = cli.run(repo, "restore", "vm1", "--to", "two", "--output", out, "--force", expect=8)
        line = proc.stderr.strip()
        assert f"process {qemu.pid} (qemu-system-x86_64)" in line and str(image) in line, line
        assert image.stat().st_ino == before.st_ino and sorted(p.name for p in out.iterdir()) == ["vda.qcow2"]
    finally:
        qemu.kill()
        qemu.wait()
    # No one uses it now: --force replaces it.
    cli.run(repo, "restore", "vm1", "--to", "two", "--output", out, "--force")
    assert_image_equals(image, vm.expected("vda"), "qcow2")
