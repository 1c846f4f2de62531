"""A configured `scratch` directory when QEMU runs as another user (-runas nobody), issue 9 item 5.

QEMU (as nobody) must enter the scratch directory to open the fleecing overlays that
nbdbackup (as root) creates for it: a configured place works like the default one
(created 0711 when missing), or is refused up front, before QEMU is touched, with a
message saying which directory needs which permission.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import cli
import pytest
from harness import assert_image_equals
from test_operations import write_config

KiB, MiB = 1024, 1024 * 1024


@pytest.fixture
def outside_tmp():
    """A directory that nobody can traverse to (pytest's own tmp_path is below a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="nbdb-scratch-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def runas_vm(vm_factory, repo, tmp_path, monkeypatch, scratch: Path):
    vm = vm_factory({"vda": 2 * MiB}, runas="nobody")
    vm.start()
    vm.write("vda", 0, 256 * KiB, 0x51)
    conf = write_config(tmp_path / "c.toml", repo, {"vm1": vm.qmp_socket}, extra=f'scratch = "{scratch}"\n')
    monkeypatch.setenv("NBDBACKUP_TEST_CONFIG", str(conf))
    return vm


def test_a_configured_scratch_directory_that_does_not_exist_works_like_the_default(vm_factory, repo, tmp_path, monkeypatch, outside_tmp):
    scratch = outside_tmp / "scratch" / "nbdbackup"
    vm = runas_vm(vm_factory, repo, tmp_path, monkeypatch, scratch)
    cli.run(repo, "full", "vm1")
    assert stat.S_IMODE(scratch.stat().st_mode) == 0o711 and list(scratch.iterdir()) == []
    vm.write("vda", 64 * KiB, 64 * KiB, 0x52)
    cli.run(repo, "incremental", "vm1")
    assert_image_equals(cli.restore(repo, vm, "latest", tmp_path / "out")["vda"], vm.expected("vda"), "qcow2")
    assert list(scratch.iterdir()) == [] and vm.block_state()["jobs"] == []


@pytest.mark.parametrize("where", ["private", "below-private"])
def test_a_scratch_directory_qemu_cannot_enter_is_refused_up_front(vm_factory, repo, tmp_path, monkeypatch, outside_tmp, where):
    if where == "private":  # an existing root-owned 0700 directory
        scratch = blocking = outside_tmp / "scratch"
        scratch.mkdir(mode=0o700)
    else:  # below pytest's 0700 directory: an ancestor blocks
        scratch = tmp_path / "scratch"
        blocking = next(p for p in [*reversed(tmp_path.parents), tmp_path] if not stat.S_IMODE(p.stat().st_mode) & stat.S_IXOTH)
    vm = runas_vm(vm_factory, repo, tmp_path, monkeypatch, scratch)
    before = vm.block_state()
    proc = cli.run(repo, "full", "vm1", expect=2)
    line = proc.stderr.strip()
    assert "QEMU runs as user nobody" in line and f"{blocking} is not searchable" in line and "chmod o+x" in line, line
    assert vm.block_state() == before and vm.bitmaps("vda") == []
    assert not (repo / "vms" / "vm1" / "backups").exists() or list((repo / "vms" / "vm1" / "backups").iterdir()) == []
    # Do what the message says until the backup runs (below pytest's tmp_path, several directories block).
    changed: dict[Path, int] = {}
    try:
        for _ in range(10):
            changed.setdefault(blocking, stat.S_IMODE(blocking.stat().st_mode))
            os.chmod(blocking, changed[blocking] | stat.S_IXOTH)
            proc = subprocess.run(cli.command(repo, "full", "vm1"), capture_output=True, text=True, env=cli.environment(), timeout=300)
            if proc.returncode == 0:
                break
            blocking = Path(re.search(r": (/\S*) is not searchable", proc.stderr).group(1))
        assert proc.returncode == 0, proc.stderr
    finally:
        for path, mode in changed.items():
            os.chmod(path, mode)
    assert_image_equals(cli.restore(repo, vm, "latest", tmp_path / "out")["vda"], vm.expected("vda"), "qcow2")
