"""The S3 requests of an incremental backup (issue 12's fixed cost): counted from --debug's
request log against the real server, so that a change that adds round trips is seen."""

from __future__ import annotations

import re

import cli
from s3server import KEY, SECRET

KiB, MiB = 1024, 1024 * 1024


def requests_of(proc) -> list[str]:
    return [m.group(1) for m in re.finditer(r"S3 (\w+ \S*)", proc.stderr)]


def test_incremental_into_s3_requests(vm_factory, s3_repo):
    url = s3_repo.url
    vm = vm_factory({"vda": 4 * MiB})
    vm.start()
    vm.write("vda", 0, 256 * KiB, 0x11)
    cli.run(url, "full", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "a")
    vm.write("vda", MiB, 64 * KiB, 0x22)
    proc = cli.run(url, "--debug", "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "b")
    reqs = requests_of(proc)
    # Before issue 12's work: 26 requests, checkpoints.json read 6 times, the check and the chunk
    # listing on the way.  Now the records are read once under the VM's lock, the check goes out
    # with config.json and the chunk listing runs while QEMU prepares the backup.
    assert reqs.count("GetObject repo/vms/vm1/checkpoints.json") == 1, reqs
    assert reqs.count("ListObjectsV2 repo/chunks/") == 1, reqs
    assert len(reqs) <= 21, reqs
    assert KEY not in proc.stderr and SECRET not in proc.stderr  # the request log names no credential
