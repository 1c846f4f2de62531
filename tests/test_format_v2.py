"""Repository format version 2 (BLAKE3 chunk ids) beside version 1 (SHA-256), both read and written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cli
import pytest
from blake3 import blake3
from harness import assert_image_equals

from nbdbackup.errors import RepositoryDamaged, RepositoryUnusable
from nbdbackup.repository import FORMAT_VERSION, Repository
from nbdbackup.repository.chunkid import ChunkIds, derive_chunk_id_key

GOLDEN = Path(__file__).parent / "golden"
KiB, MiB = 1024, 1024 * 1024


def chunk_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "chunks").rglob("*") if p.is_file() and not p.name.startswith(".")}


def test_version_2_repository_keeps_blake3_chunk_ids(tmp_path):
    """Version 2 is what nbdbackup created before version 3: such a repository keeps its ids and
    chunk files (version 1: the content hashed whole, one zstd frame)."""
    assert FORMAT_VERSION == 3
    shutil.copytree(GOLDEN / "v2" / "repo", tmp_path / "r")
    repo = Repository.open(tmp_path / "r", create=False)
    config = json.loads((tmp_path / "r/config.json").read_text())
    assert config["version"] == 2 and config["chunk_id"] == {"algorithm": "blake3"}
    data = b"nbdbackup" * 50000
    cid = repo.chunk_id(data)
    assert cid == blake3(data).digest() and cid != hashlib.sha256(data).digest()
    repo.put_chunk(cid, data, 3)
    assert (tmp_path / "r/chunks" / cid.hex()[:2] / cid.hex()).read_bytes()[:6] == b"NBDC\x01\x01"
    reopened = Repository.open(tmp_path / "r", create=False)
    assert reopened.version == 2 and reopened.chunk_id.algorithm == "blake3"
    assert reopened.get_chunk(cid, "t") == data


def test_version_1_repository_keeps_sha256_ids(tmp_path):
    shutil.copytree(GOLDEN / "v1" / "repo", tmp_path / "r")
    repo = Repository.open(tmp_path / "r", create=False)
    assert repo.version == 1 and repo.chunk_id.algorithm == "sha256"
    data = bytes(range(256)) * 1000
    cid = repo.chunk_id(data)
    assert cid == hashlib.sha256(data).digest()
    repo.put_chunk(cid, data, 3)
    assert Repository.open(tmp_path / "r", create=False).get_chunk(cid, "t") == data
    assert json.loads((tmp_path / "r/config.json").read_text())["version"] == 1


def test_chunk_named_by_the_other_algorithm_fails_its_checksum(tmp_path):
    shutil.copytree(GOLDEN / "v2" / "repo", tmp_path / "r")
    repo = Repository.open(tmp_path / "r", create=False)
    data = b"x" * 100000
    wrong = hashlib.sha256(data).digest()  # a version 1 name in a version 2 repository
    repo.put_chunk(wrong, data, 3)
    with pytest.raises(RepositoryDamaged, match="checksum"):
        repo.get_chunk(wrong, "t")


@pytest.mark.parametrize("chunk_id, error, message", [
    ({"algorithm": "sha3"}, RepositoryUnusable, "does not know"),
    ({"algorithm": "blake3-keyed"}, RepositoryDamaged, "without an .encryption. member"),
    (None, RepositoryDamaged, "how chunks are named"),
    ("blake3", RepositoryDamaged, "how chunks are named"),
])
def test_version_2_config_chunk_id_is_checked(tmp_path, chunk_id, error, message):
    shutil.copytree(GOLDEN / "v2" / "repo", tmp_path / "r")
    conf = tmp_path / "r/config.json"
    doc = json.loads(conf.read_text())
    if chunk_id is None:
        del doc["chunk_id"]
    else:
        doc["chunk_id"] = chunk_id
    conf.write_text(json.dumps(doc))
    with pytest.raises(error, match=message):
        Repository.open(tmp_path / "r", create=False)


def test_keyed_chunk_ids_test_vectors():
    """The seam for encrypted repositories (docs/FORMAT.md, "Chunk ids"): these values are the format."""
    master = bytes(range(32))
    assert derive_chunk_id_key(master).hex() == "6549e9e02fee77b2d6f49d484f30e9c7950a5897587c5e391aa5463e6fd427bc"
    keyed = ChunkIds.keyed(master)
    assert keyed.algorithm == "blake3-keyed" and keyed.config() == {"algorithm": "blake3-keyed"}
    assert keyed(b"nbdbackup").hex() == "80d8b8853dc6e72932da3579bcad3f557846fe5e7caa14e71f8ee917539b184f"
    assert ChunkIds.blake3()(b"nbdbackup").hex() == "82403d4c3ae8a33a8272bfd0e17bb7cd139620e9ec421ed13cfb5b1d3d60a55b"
    assert keyed(b"nbdbackup") != ChunkIds.keyed(bytes(32))(b"nbdbackup")
    with pytest.raises(ValueError):
        derive_chunk_id_key(b"short")


def test_backups_into_a_version_1_repository_stay_version_1(vm_factory, tmp_path):
    """An existing v1 repository gets v1 backups (SHA-256 names) next to its old ones; all restore."""
    repo = tmp_path / "repo"
    shutil.copytree(GOLDEN / "v1" / "repo", repo)
    vm = vm_factory({"vda": 2 * MiB})
    vm.start()
    vm.write("vda", 0, 1 * MiB, 0x5A)
    vm.write("vda", 1 * MiB + 64 * KiB, 4 * KiB, 0x11)
    full = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket).stdout.strip()
    expected_full = vm.expected("vda")
    vm.write("vda", 512 * KiB, 64 * KiB, 0x77)
    inc = cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket).stdout.strip()
    expected_inc = vm.expected("vda")
    assert json.loads((repo / "config.json").read_text())["version"] == 1
    names = chunk_files(repo)
    assert len(names) > 4  # the golden repository's chunks and new ones
    for name in names:  # every chunk file is named by the SHA-256 of its content
        content = Repository.open(repo, create=False).get_chunk(bytes.fromhex(name), "t")
        assert hashlib.sha256(content).hexdigest() == name
    cli.run(repo, "verify", "vm1")
    cli.run(repo, "verify", "golden")
    assert_image_equals(cli.restore(repo, vm, full, tmp_path / "a")["vda"], expected_full, "qcow2")
    assert_image_equals(cli.restore(repo, vm, inc, tmp_path / "b")["vda"], expected_inc, "qcow2")


def test_backups_into_a_new_repository_are_version_3(vm_factory, repo, tmp_path):
    vm = vm_factory({"vda": 2 * MiB})
    vm.start()
    vm.write("vda", 64 * KiB, 900 * KiB, 0x42)
    full = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket).stdout.strip()
    config = json.loads((repo / "config.json").read_text())
    assert config["version"] == 3 and config["chunk_id"] == {"algorithm": "blake3-tree", "piece": 256 * KiB}
    names = chunk_files(repo)
    assert names
    for name, blob in names.items():
        content = Repository.open(repo, create=False).get_chunk(bytes.fromhex(name), "t")
        assert ChunkIds.tree()(content).hex() == name and blob[:5] == b"NBDC\x02"
    cli.run(repo, "verify", "vm1")
    assert_image_equals(cli.restore(repo, vm, full, tmp_path / "a")["vda"], vm.expected("vda"), "qcow2")


def test_copy_keeps_the_source_format_and_renames_chunks_between_schemes(tmp_path):
    """copy sends chunks under their names: a new target gets the source's version, a target
    of the other version is refused (exit 7 in the CLI) before anything is written."""
    from test_repository import manifest

    from nbdbackup.capture import CancelToken
    from nbdbackup.copy import CopyRequest, copy_backups

    shutil.copytree(GOLDEN / "v1" / "repo", tmp_path / "v1")
    source = Repository.open(tmp_path / "v1", create=False)
    target = Repository.open(tmp_path / "new", create=True, like=source)
    assert target.version == 1 and json.loads((tmp_path / "new/config.json").read_text())["version"] == 1
    report = copy_backups(source, target, CopyRequest("golden", every=True), cancel=CancelToken())
    assert [b.copied for b in report.backups] == [True, True]
    other = Repository.open(tmp_path / "v2", create=True)
    data = b"z" * 5000
    other.put_chunk(other.chunk_id(data), data, 3)
    other.commit(manifest(other, vm="golden", cp="x"))
    # between chunk-id schemes, chunks are renamed to the target's ids and the indexes rewritten
    report = copy_backups(source, other, CopyRequest("golden", every=True), cancel=CancelToken())
    assert [b.copied for b in report.backups] == [True, True]
    for m in other.manifests("golden"):
        for d in m.disks:
            for e in other.read_index(m, d.id)[1]:
                assert other.chunk_id(other.get_chunk(e.chunk, "t")) == e.chunk
    report = copy_backups(other, target, CopyRequest("golden", every=True), cancel=CancelToken())
    assert [b.checkpoint for b in report.backups if b.copied] == ["x"]
