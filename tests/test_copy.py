"""copy: backups to another repository (directory <-> S3, S3 -> S3), only missing chunks,
checked before sending, visible only when complete; restores from the copy are identical."""

from __future__ import annotations

import json

import cli
from harness import assert_image_equals
from test_s3 import verified

from nbdbackup.capture import CancelToken
from nbdbackup.copy import CopyRequest, copy_backups
from nbdbackup.repository import Repository
from nbdbackup.repository.memory import MemoryBackend

KiB, MiB = 1024, 1024 * 1024


def copy(repo, *args, expect=0):
    return json.loads(cli.run(repo, "copy", *map(str, args), "--json", expect=expect).stdout) if expect == 0 else \
        cli.run(repo, "copy", *map(str, args), expect=expect)


def test_copy_logic_on_memory_backends():
    from test_repository import manifest

    from nbdbackup.records import IndexEntry
    source, target = Repository.open(MemoryBackend("s"), create=True), Repository.open(MemoryBackend("t"), create=True)
    data = [bytes([i]) * 4096 for i in range(3)]
    for d in data:
        source.put_chunk(source.chunk_id(d), d, 3)
    m1 = manifest(source, cp="cp1", entries=[IndexEntry(0, 4096, source.chunk_id(data[0])), IndexEntry(4096, 4096, source.chunk_id(data[1]))])
    source.commit(m1)
    m2 = manifest(source, cp="cp2", entries=[IndexEntry(0, 4096, source.chunk_id(data[0])), IndexEntry(8192, 4096, source.chunk_id(data[2]))])
    source.commit(m2)
    report = copy_backups(source, target, CopyRequest("vm1", every=True), cancel=CancelToken())
    assert [(b.checkpoint, b.copied, b.chunks_sent, b.chunks_present) for b in report.backups] == [("cp1", True, 2, 0), ("cp2", True, 1, 1)]
    assert target.manifests("vm1") == [m1, m2]
    assert target.get_chunk(source.chunk_id(data[2]), "t") == data[2]
    again = copy_backups(source, target, CopyRequest("vm1", every=True), cancel=CancelToken())
    assert [b.copied for b in again.backups] == [False, False]


def test_copy_between_directory_and_s3_both_ways_and_s3_to_s3(vm_factory, repo, s3_repo, tmp_path):
    vm = vm_factory({"vda": 4 * MiB, "vdb": 1 * MiB})
    vm.start()
    expected = {}
    for i in range(3):
        vm.write("vda", i * MiB, 512 * KiB, 0x40 + i)
        vm.write("vdb", 0, 64 * KiB, 0x50 + i)
        cli.run(repo, "full" if i == 0 else "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", f"cp{i}")
        expected[f"cp{i}"] = {d: vm.expected(d) for d in vm.disks}

    s3 = s3_repo.url
    first = copy(repo, "vm1", "--to", s3, "--checkpoint", "cp0")
    assert [(b["checkpoint"], b["copied"]) for b in first["backups"]] == [("cp0", True)]
    report = copy(repo, "vm1", "--all", "--to", s3)
    assert [(b["checkpoint"], b["copied"]) for b in report["backups"]] == [("cp0", False), ("cp1", True), ("cp2", True)]
    assert report["backups"][1]["chunks_present"] > 0  # chunks cp0 brought along are not sent again
    assert [b["checkpoint"] for b in cli.backups(s3)] == ["cp0", "cp1", "cp2"]
    for name, want in expected.items():
        images = cli.restore(s3, vm, name, tmp_path / f"s3-{name}")
        for disk, path in images.items():
            assert_image_equals(path, want[disk], "qcow2")
    verified(s3, "vm1")

    back = tmp_path / "copy-dir"
    copy(s3, "vm1", "--to", back)  # the newest backup, S3 -> directory
    other = f"s3://{s3_repo.bucket}/second-copy"
    copy(s3, "vm1", "--to", other, "--checkpoint", "cp1")  # S3 -> S3
    for where, name in ((back, "cp2"), (other, "cp1")):
        assert [b["checkpoint"] for b in cli.backups(where)] == [name]
        images = cli.restore(where, vm, name, tmp_path / f"{name}-from-copy")
        for disk, path in images.items():
            assert_image_equals(path, expected[name][disk], "qcow2")
        verified(where, "vm1")
    assert not [k for k in s3_repo.keys() if "/locks/" in k]


def test_damaged_source_chunk_is_not_sent_and_no_backup_appears(vm_factory, repo, s3_repo, tmp_path):
    vm = vm_factory({"vda": 2 * MiB})
    vm.start()
    vm.write("vda", 0, 1 * MiB, 0x61)
    cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "cp0")
    chunk = next(p for p in (repo / "chunks").rglob("*") if p.is_file())
    blob = bytearray(chunk.read_bytes())
    blob[-1] ^= 0xFF
    chunk.write_bytes(bytes(blob))
    proc = copy(repo, "vm1", "--to", s3_repo.url, expect=6)
    assert chunk.name in proc.stderr
    assert cli.backups(s3_repo.url) == []  # nothing that looks like a backup
    assert not [k for k in s3_repo.keys() if k.endswith("manifest.json")]
    cli.run(repo, "copy", "vm1", "--to", repo, expect=2)  # onto itself: refused


def test_copy_between_two_s3_stores_each_with_its_own_table_and_credentials(vm_factory, s3_repo, tmp_path, monkeypatch):
    """[s3."s3://BUCKET/PREFIX"] tables: the source on the session's server, the copy on a second
    server with other credentials; [s3] itself points nowhere and no credentials are in the
    environment, so each repository can only work through its own table and credentials file."""
    from s3server import SeaweedFS

    second_key, second_secret = "NBDSECONDSTOREKEY", "nbd-second-store-secret-0123456789"
    with SeaweedFS(tmp_path / "second-store", key=second_key, secret=second_secret) as offsite:
        offsite.client().create_bucket(Bucket="offsite")
        creds = {}
        for name, key, secret in (("source", s3_repo.server.key, s3_repo.server.secret), ("offsite", second_key, second_secret)):
            creds[name] = tmp_path / f"{name}.credentials"
            creds[name].write_text(f"[default]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n")
            creds[name].chmod(0o600)
        conf = tmp_path / "two-stores.toml"
        conf.write_text('[s3]\nendpoint = "http://127.0.0.1:1"\naddressing = "path"\nregion = "us-east-1"\nretries = 1\n'
                        f'[s3."s3://{s3_repo.bucket}"]\nendpoint = "{s3_repo.server.endpoint}"\ncredentials_file = "{creds["source"]}"\n'
                        f'[s3."s3://offsite/hypervisor1"]\nendpoint = "{offsite.endpoint}"\ncredentials_file = "{creds["offsite"]}"\n'
                        'retries = 3\n')
        monkeypatch.setenv("NBDBACKUP_TEST_CONFIG", str(conf))
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

        vm = vm_factory({"vda": 4 * MiB})
        vm.start()
        expected = {}
        for i in range(2):
            vm.write("vda", i * MiB, 512 * KiB, 0x60 + i)
            cli.run(s3_repo.url, "full" if i == 0 else "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", f"cp{i}")
            expected[f"cp{i}"] = vm.expected("vda")
        target = "s3://offsite/hypervisor1"
        report = copy(s3_repo.url, "vm1", "--all", "--to", target)
        assert [(b["checkpoint"], b["copied"]) for b in report["backups"]] == [("cp0", True), ("cp1", True)]
        keys = [o["Key"] for o in offsite.client().list_objects_v2(Bucket="offsite")["Contents"]]
        assert "hypervisor1/vms/vm1/backups/cp1/manifest.json" in keys  # on the second server, below the prefix
        for name, want in expected.items():
            images = cli.restore(target, vm, name, tmp_path / f"offsite-{name}")
            assert_image_equals(images["vda"], want, "qcow2")
        verified(target, "vm1")

        assert "no S3 credentials found" in cli.run("s3://offsite/elsewhere", "list", "vm1", expect=9).stderr  # [s3] alone
        creds["offsite"].chmod(0o640)
        proc = copy(s3_repo.url, "vm1", "--to", target, expect=2)
        assert "readable by others" in proc.stderr and second_secret not in proc.stderr + proc.stdout
