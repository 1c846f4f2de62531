"""An untrusted store serving an older state of an encrypted repository is noticed (exit 27);
deletions by nbdbackup on any host are not (docs/FORMAT.md, "What the store can still do")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cli
import pytest

from nbdbackup.errors import RepositoryRolledBack
from nbdbackup.records import Manifest
from nbdbackup.repository import Repository, seen

PASSPHRASE = "rollback passphrase"


@pytest.fixture
def env(tmp_path, monkeypatch):
    cli.use_passphrase(monkeypatch, tmp_path, PASSPHRASE, cheap_keys=True)  # these tests are about rollbacks
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "host-a"))
    return tmp_path


def host(monkeypatch, env: Path, name: str) -> None:
    """Act as another host: its own record of what it saw (the repository and key are shared)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(env / name))


def commit(repo: Repository, vm: str, checkpoint: str) -> None:
    repo.commit(Manifest(vm, checkpoint, "full", None, f"2026-11-30T05:{len(repo.backup_names(vm)):02d}:00Z",
                         "chain", ()))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and "locks" not in p.parts}


def test_an_older_copy_of_the_repository_is_detected(env):
    repo = Repository.open(env / "r", create=True, encryption="repokey")
    commit(repo, "vm1", "a1")
    shutil.copytree(env / "r", env / "old")  # what a store keeps to serve later
    commit(repo, "vm1", "b2")
    commit(repo, "vm1", "c3")
    assert cli.run(env / "r", "list", "vm1").stdout.count("\n") >= 3  # this host sees a1, b2, c3

    shutil.rmtree(env / "r")
    shutil.copytree(env / "old", env / "r")  # the store rolls back: every object valid, just older
    before = tree(env / "r")
    proc = cli.run(env / "r", "list", "vm1", expect=27)
    assert "b2, c3" in proc.stderr and "older state" in proc.stderr and str(seen.default_dir()) in proc.stderr
    cli.run(env / "r", "restore", "vm1", "--to", "latest", "--output", env / "out", expect=27)  # not a1 in silence
    with pytest.raises(RepositoryRolledBack):
        Repository.open(env / "r", create=False).manifests("vm1")
    assert tree(env / "r") == before  # nothing changed
    assert not (env / "out").exists()

    # The user restored the storage from an old copy on purpose: removing the record accepts it.
    record = seen.default_dir() / f"{repo.id}.json"
    assert record.exists()
    record.unlink()
    assert [m.checkpoint for m in Repository.open(env / "r", create=False).manifests("vm1")] == ["a1"]


def test_a_withheld_manifest_and_a_vanished_vm_are_detected(env):
    repo = Repository.open(env / "r", create=True, encryption="repokey")
    commit(repo, "vm1", "a1")
    commit(repo, "vm1", "b2")
    commit(repo, "vm2", "x1")
    assert repo.vms() == ["vm1", "vm2"]
    vm1 = repo.backend.physical("vms/vm1")
    manifest = env / "r" / repo.backend.physical("vms/vm1/backups/b2/manifest.json")
    manifest.unlink()  # the store withholds one object
    with pytest.raises(RepositoryRolledBack, match="b2"):
        Repository.open(env / "r", create=False).backup_names("vm1")
    shutil.rmtree(env / "r" / vm1)  # the store drops a whole VM
    with pytest.raises(RepositoryRolledBack, match="vm1"):
        Repository.open(env / "r", create=False).vms()


def test_deletions_by_nbdbackup_on_any_host_are_no_alarm(env, monkeypatch):
    repo = Repository.open(env / "r", create=True, encryption="repokey")
    for cp in ("alpha", "bravo", "charlie", "delta"):
        commit(repo, "secretvm", cp)
    repo.delete_backup("secretvm", "alpha")  # this host deletes
    assert repo.backup_names("secretvm") == ["bravo", "charlie", "delta"]

    host(monkeypatch, env, "host-b")  # another host prunes (the same call prune and delete make)
    other = Repository.open(env / "r", create=False)
    assert other.backup_names("secretvm") == ["bravo", "charlie", "delta"]
    other.delete_backup("secretvm", "bravo")
    other.delete_backup("secretvm", "charlie")
    commit(other, "othervm", "yankee")

    host(monkeypatch, env, "host-a")  # the first host has seen bravo and charlie, and is told why they are gone
    again = Repository.open(env / "r", create=False)
    assert again.backup_names("secretvm") == ["delta"] and again.vms() == ["othervm", "secretvm"]
    assert [m.checkpoint for m in again.manifests("secretvm")] == ["delta"]
    cli.run(env / "r", "list", "secretvm")
    # Removal records are encrypted objects like the rest: no name of a VM or backup in any path.
    assert not any(n in p for p in tree(env / "r") for n in ("secretvm", "othervm", "bravo", "charlie", "delta", "yankee"))


def test_a_removal_record_cannot_be_forged_or_moved(env):
    repo = Repository.open(env / "r", create=True, encryption="repokey")
    for vm in ("vm1", "vm2"):
        commit(repo, vm, "a1")
        commit(repo, vm, "b2")
    repo.delete_backup("vm2", "b2")  # a valid removal record of vm2's b2
    records = list((env / "r" / repo.backend.physical("vms/vm2/removed")).iterdir())
    assert len(records) == 1
    target = env / "r" / repo.backend.physical("vms/vm1/removed")
    target.mkdir()
    shutil.copy(records[0], target / records[0].name)  # moved to vm1, whose b2 the store now withholds
    (target / ("0" * 32 + ".json")).write_bytes(b'{"format": "nbdbackup removal", "vm": "vm1", "backups": ["b2"]}')
    (env / "r" / repo.backend.physical("vms/vm1/backups/b2/manifest.json")).unlink()
    with pytest.raises(RepositoryRolledBack, match="b2"):
        Repository.open(env / "r", create=False).backup_names("vm1")


def test_unencrypted_repositories_keep_no_record(env, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(env / "plain-host"))
    repo = Repository.open(env / "p", create=True)
    commit(repo, "vm1", "a1")
    assert repo.seen is None and not (env / "plain-host").exists()
    repo.delete_backup("vm1", "a1")
    assert not list((env / "p").rglob("removed"))


def test_record_file_is_private_and_names_the_repository(env):
    repo = Repository.open(env / "r", create=True, encryption="repokey")
    commit(repo, "vm1", "a1")
    record = seen.default_dir() / f"{repo.id}.json"
    doc = json.loads(record.read_text())
    assert doc["repository"] == repo.id and doc["vms"] == {"vm1": ["a1"]}
    assert record.stat().st_mode & 0o077 == 0 and record.parent.stat().st_mode & 0o077 == 0


def test_a_withheld_manifest_is_not_cleaned_up_as_an_unfinished_backup(env):
    """The start of a backup removes folders without a manifest: not before the check."""
    repo = Repository.open(env / "r", create=True, encryption="repokey")
    commit(repo, "vm1", "a1")
    repo.write_index("vm1", "a1", "vda", 0, [])
    (env / "r" / repo.backend.physical("vms/vm1/backups/a1/manifest.json")).unlink()
    before = tree(env / "r")
    with pytest.raises(RepositoryRolledBack):
        Repository.open(env / "r", create=False).incomplete_backups("vm1")
    assert tree(env / "r") == before


@pytest.mark.s3
def test_s3_store_withholding_a_backup_is_detected_and_prune_elsewhere_is_not(env, monkeypatch, s3_repo):
    from nbdbackup.repository.location import S3Location, S3Settings
    from nbdbackup.repository.s3 import S3Backend

    settings = S3Settings(endpoint=s3_repo.server.endpoint, region="us-east-1", addressing="path", retries=2)

    def open_repo(**kwargs) -> Repository:
        return Repository.open(S3Backend(S3Location(s3_repo.bucket, "repo"), settings), **kwargs)

    repo = open_repo(create=True, encryption="repokey")
    for cp in ("alpha", "bravo", "charlie"):
        commit(repo, "vm1", cp)
    repo.backend.sync()
    host(monkeypatch, env, "host-b")
    open_repo(create=False).delete_backup("vm1", "alpha")  # another host deletes: no alarm on this one
    host(monkeypatch, env, "host-a")
    assert open_repo(create=False).backup_names("vm1") == ["bravo", "charlie"]

    manifest = "repo/" + repo.backend.physical("vms/vm1/backups/charlie/manifest.json")
    assert manifest in s3_repo.keys()
    s3_repo.client().delete_object(Bucket=s3_repo.bucket, Key=manifest)  # the store withholds it
    with pytest.raises(RepositoryRolledBack, match="charlie"):
        open_repo(create=False).manifests("vm1")
    assert not any("vm1" in k or "charlie" in k or "alpha" in k for k in s3_repo.keys())

