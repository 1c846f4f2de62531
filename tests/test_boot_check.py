"""verify --boot on a VM without an operating system: a clear 'did not boot', exit 6.

(verify --boot on a real Debian guest is in test_guest.py.)
"""

from __future__ import annotations

import time
from pathlib import Path

import cli

from nbdbackup.bootcheck import plan_boot


def test_backup_of_a_vm_without_os_does_not_boot(vm_factory, repo: Path, tmp_path: Path) -> None:
    vm = vm_factory({"vda": 8 << 20, "vdb": 4 << 20})
    vm.start()
    vm.write("vda", 0, 1 << 20, 0x5A)
    name = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket).stdout.strip()
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))

    config = tmp_path / "config.toml"
    config.write_text('[vm.vm1]\nboot = ["-accel", "tcg", "-m", "256"]\n')
    started = time.monotonic()
    proc = cli.run(repo, "--config", config, "verify", "vm1", "--boot", "--checkpoint", name, "--timeout", "8", expect=6)
    assert time.monotonic() - started < 60
    line = proc.stderr.strip()
    assert "backup of vm1 did not boot: no sign of life (an answer from the guest agent) within 8 s" in line, line
    assert "booted" not in proc.stdout
    # The repository was only read, and nothing of the throwaway VM is left.
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before
    assert not list(Path("/var/tmp").glob("vm1-boot-*"))
    # Its own restore still works: verify --boot did not change the backup.
    images = cli.restore(repo, vm, name, tmp_path / "restored")
    assert images["vda"].exists()


def test_boot_options_are_checked(repo: Path) -> None:
    cli.run(repo, "verify", "vm1", "--check", "true", expect=2)
    cli.run(repo, "verify", "vm1", "--boot", "--sample", "5", expect=2)


def test_qemu_refusing_the_boot_arguments_is_a_usage_error(vm_factory, repo: Path, tmp_path: Path) -> None:
    vm = vm_factory({"vda": 4 << 20})
    vm.start()
    name = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket).stdout.strip()
    config = tmp_path / "config.toml"
    config.write_text('[vm.vm1]\nboot = ["-accel", "tcg", "-device", "no-such-device"]\n')
    proc = cli.run(repo, "--config", config, "verify", "vm1", "--boot", "--checkpoint", name, "--timeout", "5", expect=2)
    assert "QEMU refused the boot test's command line" in proc.stderr and "no-such-device" in proc.stderr, proc.stderr


def test_boot_command_line_plan(tmp_path: Path) -> None:
    disks = [("vda", tmp_path / "a.qcow2"), ("data", tmp_path / "b,c.qcow2")]
    default = plan_boot(disks, (), tmp_path).command
    assert default[0] == "qemu-system-x86_64"
    assert ["-nic", "none"] == list(default[default.index("-nic"):default.index("-nic") + 2])
    assert "-m" in default and "1024" in default and ["-accel", "kvm", "-accel", "tcg"] == [a for a in default if a in ("-accel", "kvm", "tcg")]
    assert "virtio-blk-pci,drive=boot-disk0,id=vda,bootindex=1" in default
    assert f"driver=file,filename={tmp_path}/b,,c.qcow2,node-name=boot-file1" in default
    assert "virtio-blk-pci,drive=boot-disk1,id=data" in default
    own = plan_boot(disks, ("-m", "4096", "-accel", "tcg", "-kernel", "k"), tmp_path).command
    assert own.count("-m") == 1 and "4096" in own and "1024" not in own
    assert own.count("-accel") == 1 and own[-6:] == ("-m", "4096", "-accel", "tcg", "-kernel", "k")


def test_auto_verify_boot_reports_a_backup_that_does_not_boot(vm_factory, repo: Path, tmp_path: Path) -> None:
    vm = vm_factory({"vda": 4 << 20})
    vm.start()
    config = tmp_path / "config.toml"
    config.write_text(f'[vm.vm1]\nqmp = "{vm.qmp_socket}"\nboot = ["-accel", "tcg", "-m", "256"]\nboot_timeout = 5\n')
    proc = cli.run(repo, "--config", config, "auto", "vm1", "--verify-boot", expect=6)
    assert "backup of vm1 did not boot: no sign of life (an answer from the guest agent) within 5 s" in proc.stderr
    made = cli.backups(repo)
    assert len(made) == 1 and proc.stdout.strip() == made[0]["checkpoint"]  # the backup stays
    # verify_boot = true in the config does the same for every auto run (here: --all).
    config.write_text(config.read_text() + "verify_boot = true\n")
    proc = cli.run(repo, "--config", config, "auto", "--all", expect=6)
    assert "vm1" in proc.stdout and "FAILED  exit 6" in proc.stdout, proc.stdout
