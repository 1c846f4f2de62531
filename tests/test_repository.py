"""Repository format: chunks, indexes, manifests, modes, versions (no QEMU needed)."""

import json
import os
import stat

import pytest

from nbdbackup.errors import RepositoryDamaged, RepositoryUnusable
from nbdbackup.records import CheckpointRecord, DiskBackup, IndexEntry, Manifest
from nbdbackup.repository import Repository


def manifest(repo, vm="vm1", cp="cp1", entries=()):
    digest = repo.write_index(vm, cp, "vda", 1 << 20, list(entries))
    return Manifest(vm=vm, checkpoint=cp, kind="full", since=None, created="2026-01-01T00:00:00Z", chain="c",
                    disks=(DiskBackup("vda", 1 << 20, digest, 0, 0, True),))


def test_chunks_round_trip_dedup_and_checksum(tmp_path):
    repo = Repository.open(tmp_path / "r", create=True)
    data = os.urandom(5000) + bytes(100000)
    cid = repo.chunk_id(data)
    assert repo.put_chunk(cid, data, 3) > 0
    assert repo.put_chunk(cid, data, 3) == 0  # stored once
    assert repo.get_chunk(cid, "t") == data
    path = tmp_path / "r" / "chunks" / cid.hex()[:2] / cid.hex()
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0xFF
    path.write_bytes(blob)
    with pytest.raises(RepositoryDamaged, match=cid.hex()):
        repo.get_chunk(cid, "t")
    path.unlink()
    with pytest.raises(RepositoryDamaged, match="missing"):
        repo.get_chunk(cid, "t")


def test_incompressible_chunk_is_stored_plain(tmp_path):
    repo = Repository.open(tmp_path / "r", create=True)
    data = os.urandom(65536)
    cid = repo.chunk_id(data)
    repo.put_chunk(cid, data, 3)
    assert repo.get_chunk(cid, "t") == data


def _encoding(tmp_path, cid):
    return (tmp_path / "r" / "chunks" / cid.hex()[:2] / cid.hex()).read_bytes()[5]


def test_chunk_mixing_random_and_text_is_compressed_all_random_stored_plain(tmp_path):
    """Four samples decide: a 4 MiB chunk whose middle is random but whose other quarters hold
    text is compressed (one sample from its middle used to store it as is); all random is stored
    as is; every level, fast (negative) ones included, reads back identical."""
    from nbdbackup.repository import chunks

    repo = Repository.open(tmp_path / "r", create=True)
    text = (b"The quick brown fox jumps over the lazy dog. " * 30000)[:1 << 20]
    mixed = text + os.urandom(2 << 20) + text
    random = os.urandom(4 << 20)
    for data, level, encoding in ((mixed, 1, chunks.ZSTD), (mixed, -1, chunks.ZSTD), (mixed, 2, chunks.ZSTD),
                                  (random, 1, chunks.STORED)):
        cid = repo.chunk_id(data)
        stored = repo.put_chunk(cid, data, level)
        assert _encoding(tmp_path, cid) == encoding, level
        if encoding == chunks.ZSTD:
            assert stored < (2 << 20) + (64 << 10)  # the text quarters shrink, the random half does not
        assert repo.get_chunk(cid, "t") == data
        (tmp_path / "r" / "chunks" / cid.hex()[:2] / cid.hex()).unlink()
        repo.new_chunks.discard(cid)


def test_backup_is_visible_only_after_commit(tmp_path):
    repo = Repository.open(tmp_path / "r", create=True)
    m = manifest(repo)
    assert repo.manifests("vm1") == [] and repo.incomplete_backups("vm1") == ["cp1"]
    repo.commit(m)
    assert repo.manifests("vm1") == [m] and repo.incomplete_backups("vm1") == []
    assert repo.read_index(m, "vda") == (1 << 20, [])


def test_truncated_index_and_manifest_are_detected(tmp_path):
    repo = Repository.open(tmp_path / "r", create=True)
    m = manifest(repo, entries=[IndexEntry(0, 10, b"x" * 32)])
    repo.commit(m)
    idx = tmp_path / "r/vms/vm1/backups/cp1/vda.index"
    idx.write_bytes(idx.read_bytes()[:-1])
    with pytest.raises(RepositoryDamaged, match="index of backup cp1, disk vda"):
        repo.read_index(m, "vda")
    man = tmp_path / "r/vms/vm1/backups/cp1/manifest.json"
    man.write_bytes(man.read_bytes()[:-10])
    assert repo.manifests("vm1") == []  # skipped with a warning: other backups stay listed
    with pytest.raises(RepositoryDamaged, match="cp1"):
        repo.manifests("vm1", strict=True)


def test_modes_are_private(tmp_path):
    repo = Repository.open(tmp_path / "r", create=True)
    repo.commit(manifest(repo))
    repo.save_checkpoints("vm1", [CheckpointRecord("cp1", "t", "c", ("vda",), "nbdbackup.x.cp1")])
    for root, dirs, files in os.walk(tmp_path / "r"):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o700, d
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) == 0o600, f
    assert stat.S_IMODE(os.stat(tmp_path / "r").st_mode) == 0o700


def test_newer_format_and_foreign_directories_are_refused(tmp_path):
    with pytest.raises(RepositoryUnusable, match="there is no repository"):
        Repository.open(tmp_path / "r")  # opening creates nothing unless asked
    assert not (tmp_path / "r").exists()
    Repository.open(tmp_path / "r", create=True)
    conf = tmp_path / "r/config.json"
    doc = json.loads(conf.read_text())
    doc["version"] = 99
    conf.write_text(json.dumps(doc))
    with pytest.raises(RepositoryUnusable, match="format version 99"):
        Repository.open(tmp_path / "r")
    (tmp_path / "other").mkdir()
    (tmp_path / "other/file").write_text("x")
    with pytest.raises(RepositoryUnusable, match="not an nbdbackup repository"):
        Repository.open(tmp_path / "other")


def test_checkpoint_records_round_trip(tmp_path):
    repo = Repository.open(tmp_path / "r", create=True)
    recs = [CheckpointRecord("a", "t1", "c", ("vda",), "nbdbackup.x.a", "confirmed"), CheckpointRecord("b", "t2", "c", ("vda", "vdb"), "nbdbackup.x.b")]
    repo.save_checkpoints("vm1", recs)
    assert repo.checkpoints("vm1") == recs


def test_checkpoint_records_without_counts_are_read_and_bad_counts_refused(tmp_path):
    from nbdbackup.repository.manifest import checkpoints_from_bytes, seal

    rec = {"name": "a", "created": "t", "chain": "c", "disks": ["vda"], "bitmap": "nbdbackup.x.a", "state": "confirmed"}
    [old] = checkpoints_from_bytes(seal({"version": 1, "checkpoints": [rec]}), "t")
    assert old.counts == {}
    with pytest.raises(RepositoryDamaged):
        checkpoints_from_bytes(seal({"version": 1, "checkpoints": [{**rec, "counts": {"vda": "x"}}]}), "t")
