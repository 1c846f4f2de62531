"""recover: a VM started on images backed by the served backup, streamed home while the guest writes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import cli
import pytest
from harness import GuestDisk, HarnessError, assert_image_equals

KiB, MiB = 1024, 1024 * 1024
SIZES = {"vda": 64 * MiB, "vdb": 8 * MiB}


def backed_up_vm(vm_factory, repo):
    vm = vm_factory(SIZES)
    vm.start()
    for i in range(6):
        vm.write("vda", i * 2 * MiB, 512 * KiB, 0x20 + i)
    vm.write("vda", 48 * MiB, 16 * MiB - 64 * KiB, 0x2F)  # copied last, at 1 MiB/s; the last 64 KiB stay a hole
    vm.write("vdb", 0, 1 * MiB, 0x41)
    vm.write("vdb", SIZES["vdb"] - 64 * KiB, 64 * KiB, 0x42)
    name = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket).stdout.strip()
    return vm, name, {d: vm.expected(d) for d in vm.disks}


def recovered_vm(vm_factory, out: Path, expected: dict[str, bytes]):
    """A VM like the lost one, started on recover's images (its model: the backup point)."""
    vm = vm_factory(SIZES, name="lost")
    vm.disks = {d: GuestDisk(d, out / f"{d}.qcow2", size, "qcow2") for d, size in SIZES.items()}
    vm._images_created = True
    vm.model = {d: bytearray(data) for d, data in expected.items()}
    return vm


def start_recover(repo, name, out, vm, *extra):
    proc = cli.start(repo, "recover", "vm1", "--to", name, "--output", str(out), "--qmp", str(vm.qmp_socket), *extra)
    line = proc.stderr.readline()
    if "images ready" not in line and "resuming" not in line:
        raise AssertionError(f"recover: {line}{proc.stderr.read()} (exit {proc.wait()})")
    return proc


def backing(path: Path) -> str | None:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], check=True, capture_output=True, text=True).stdout)
    return info.get("full-backing-filename") or info.get("backing-filename")


def test_recover_streams_while_the_guest_writes_and_resumes_after_a_kill(vm_factory, repo, tmp_path):
    _, name, expected = backed_up_vm(vm_factory, repo)
    out = tmp_path / "recovered"
    lost = recovered_vm(vm_factory, out, expected)

    # 1. Slow streaming, stopped half-way (SIGTERM, as systemd would): the VM and the copies
    #    are paused before the server goes, so no guest read can reach a vanished server.
    proc = start_recover(repo, name, out, lost, "--speed", "1")
    assert sorted(p.name for p in out.glob("*.qcow2")) == ["vda.qcow2", "vdb.qcow2"]
    assert "nbd" in backing(out / "vda.qcow2")
    lost.start()
    lost.qmp("cont")  # the guest runs
    lost.verify("vda", 0, 4 * MiB)  # the guest reads the backup at once
    lost.write("vda", 1 * MiB, 64 * KiB, 0xA1)  # and writes into its local images
    lost.write("vdb", 4 * MiB, 128 * KiB, 0xA2)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert lost.qmp("query-status")["status"] == "paused"
    jobs = {j["id"]: j["status"] for j in lost.qmp("query-jobs")}
    assert jobs["nbdbackup-recover-vda"] == "paused" and set(jobs.values()) == {"paused"}, jobs
    assert backing(out / "vda.qcow2") is not None  # not finished: still needs the backup

    # 2. The same command resumes (and continues the VM it paused) ...
    proc = start_recover(repo, name, out, lost, "--speed", "1")
    lost.write("vda", 40 * MiB, 4 * KiB, 0xA3)
    deadline = time.monotonic() + 30
    while lost.qmp("query-status")["status"] != "running":
        assert time.monotonic() < deadline, "the resumed recover did not continue the VM"
        time.sleep(0.2)
    # ... and is killed without warning: its server dies with it. A guest read of data that
    # is not local yet fails (the device's rerror=stop pauses a real VM); it never returns
    # made-up data. Holes read as zeroes: they were made local zero clusters up front.
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while str(out / ".nbdbackup-recover.sock") in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, "the server outlived its killed recover"
        time.sleep(0.05)
    with pytest.raises(HarnessError):
        lost.verify("vda", 62 * MiB, 64 * KiB)  # > 15 s of copying away at --speed 1
    lost.verify("vda", SIZES["vda"] - 64 * KiB, 64 * KiB)
    lost.verify("vdb", 6 * MiB, 64 * KiB)

    # 3. Once more: the copy completes; the guest keeps writing meanwhile.
    proc = start_recover(repo, name, out, lost)
    lost.write("vdb", 7 * MiB, 64 * KiB, 0xA4)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "complete" in err
    assert lost.qmp("query-status")["status"] == "running"  # continued by the resumed recover
    assert_recovered(lost, out)


def assert_recovered(lost, out):
    """The guest reads what it should; its stopped VM's local images stand alone and equal the
    backup plus the guest's writes; nothing else is left in the output directory."""
    lost.verify("vda")
    lost.verify("vdb")
    lost.stop()
    for disk in SIZES:
        path = out / f"{disk}.qcow2"
        assert backing(path) is None, f"{disk} still needs the backup"
        assert_image_equals(path, lost.expected(disk), "qcow2")
    assert sorted(p.name for p in out.iterdir()) == ["vda.qcow2", "vdb.qcow2"]


def test_recover_bad_input(vm_factory, repo, tmp_path):
    vm, name, _ = backed_up_vm(vm_factory, repo)
    out = tmp_path / "rec"
    cli.run(repo, "recover", "vm1", "--to", "nosuch", "--output", str(out), "--qmp", str(vm.qmp_socket), expect=4)
    assert not out.exists() or list(out.iterdir()) == []
    out.mkdir(exist_ok=True)
    (out / "vda.qcow2").write_text("mine")
    cli.run(repo, "recover", "vm1", "--to", name, "--output", str(out), "--qmp", str(vm.qmp_socket), expect=8)
    assert (out / "vda.qcow2").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["vda.qcow2"]
    # Ctrl-C while waiting for the VM: exit 130; the images stay for a later resume.
    out2 = tmp_path / "rec2"
    proc = start_recover(repo, name, out2, vm, "--disk", "vdb")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"repo={repo}" not in ps


@pytest.mark.parametrize("any_repo", ["encrypted", "s3", "s3-encrypted"], indirect=True)
def test_recover_from_encrypted_and_s3_repositories(vm_factory, any_repo, tmp_path, request):
    """The same recovery from every other kind of repository: stopped half-way (SIGTERM), resumed
    (a new server, handed the key again), completed; the images equal the backup plus the guest's writes."""
    repo = any_repo
    _, name, expected = backed_up_vm(vm_factory, repo)
    out = tmp_path / "recovered"
    lost = recovered_vm(vm_factory, out, expected)
    proc = start_recover(repo, name, out, lost, "--speed", "2")
    lost.start()
    lost.qmp("cont")
    lost.verify("vda", 8 * MiB, 4 * MiB)  # read through the server at once
    lost.write("vda", 3 * MiB, 64 * KiB, 0xB1)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert backing(out / "vda.qcow2") is not None
    proc = start_recover(repo, name, out, lost)
    lost.write("vdb", 5 * MiB, 64 * KiB, 0xB2)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 3 and "lost the QMP connection during query-named-block-nodes" in err and lost._proc is not None and lost._proc.poll() is not None:
        # QEMU 7.2 itself died (SIGSEGV, in the kernel log) answering the resumed run's first
        # query of its block nodes; docs/CHAIN.md: an open defect, seen in about 1 of 4 resumes
        # from encrypted or S3 repositories, whose server takes seconds to come back.
        pytest.xfail(f"QEMU 7.2 crashed answering query-named-block-nodes on the resume (exit {lost._proc.returncode})")
    assert proc.returncode == 0, err
    assert lost.qmp("query-status")["status"] == "running"
    assert_recovered(lost, out)
    if str(repo).startswith("s3://"):  # nbdkit's lock too, though it was killed
        assert request.getfixturevalue("s3_repo").keys("repo/locks/") == []
