"""BackupImage (what `serve` exports): reads and extents of a hand-made backup, no QEMU."""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from nbdbackup.backupimage import BackupImage
from nbdbackup.errors import RepositoryDamaged
from nbdbackup.records import DiskBackup, IndexEntry, Manifest
from nbdbackup.repository import Repository
from nbdbackup.repository.memory import MemoryBackend

KiB, MiB = 1024, 1024 * 1024
DISK = 4 * MiB + 512


def make(tmp_path, version=3):
    """A backup of hand-made entries; version 3 is read a piece at a time (Repository.reads_pieces),
    version 2 a chunk at a time."""
    like = Repository(MemoryBackend("v2"), "0" * 32, version=2) if version == 2 else None
    repo = Repository.open(tmp_path / "repo", create=True, like=like)
    assert repo.reads_pieces == (version == 3)
    a = os.urandom(256 * KiB)
    b = bytes(range(256)) * 256  # 64 KiB
    ids = {}
    for data in (a, b):
        ids[data] = repo.chunk_id(data)
        repo.put_chunk(ids[data], data, 3)
    entries = [
        IndexEntry(64 * KiB, 256 * KiB, ids[a]),
        IndexEntry(320 * KiB, 64 * KiB, ids[b]),  # adjacent to the first: one data run
        IndexEntry(1 * MiB, 64 * KiB, ids[a], 128 * KiB),  # a slice of a shared chunk
        IndexEntry(2 * MiB - 4 * KiB, 60 * KiB, ids[b], 4 * KiB),
        IndexEntry(DISK - 512, 512, ids[b]),  # the disk's very end
    ]
    expected = bytearray(DISK)
    for e in entries:
        src = a if e.chunk == ids[a] else b
        expected[e.offset:e.end] = src[e.chunk_offset:e.chunk_offset + e.length]
    index_sha = repo.write_index("vm1", "cp1", "vda", DISK, entries)
    m = Manifest(vm="vm1", checkpoint="cp1", kind="full", since=None, created="2026-01-01T00:00:00Z", chain="c" * 32,
                 disks=(DiskBackup("vda", DISK, index_sha, sum(e.length for e in entries), 0, True),))
    repo.commit(m)
    return repo, m, bytes(expected), entries


@pytest.mark.parametrize("version", [3, 2])
def test_reads_match_the_backup_at_any_offset_and_from_many_threads(tmp_path, version):
    repo, m, expected, _ = make(tmp_path, version)
    image = BackupImage(repo, m, "vda", cache_bytes=64 * KiB)  # less than a chunk: evictions all the time
    assert image.size == DISK
    assert image.read(0, DISK) == expected
    rnd = random.Random(7)
    spans = [(off, rnd.randrange(1, 300 * KiB)) for off in (rnd.randrange(0, DISK - 1) for _ in range(300))]
    spans = [(off, min(n, DISK - off)) for off, n in spans]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda s: image.read(*s), spans))
    for (off, n), data in zip(spans, got, strict=True):
        assert data == expected[off:off + n], (off, n)
    with pytest.raises(ValueError):
        image.read(DISK - 10, 11)


def test_extents_are_data_exactly_where_the_index_has_entries(tmp_path):
    repo, m, _, entries = make(tmp_path)
    image = BackupImage(repo, m, "vda")
    runs = list(image.extents(0, DISK))
    assert runs[0] == (0, 64 * KiB, False)
    assert runs[1] == (64 * KiB, 320 * KiB, True)  # two adjacent entries, one run
    assert sum(n for _, n, _ in runs) == DISK
    pos = 0
    for off, n, _ in runs:  # contiguous, alternating
        assert off == pos
        pos += n
    assert all(x[2] != y[2] for x, y in zip(runs, runs[1:], strict=False))
    data = sum(n for _, n, d in runs if d)
    assert data == sum(e.length for e in entries)
    # A window in the middle of a hole and of an entry.
    assert list(image.extents(1 * MiB - 4 * KiB, 8 * KiB)) == [(1 * MiB - 4 * KiB, 4 * KiB, False), (1 * MiB, 4 * KiB, True)]


@pytest.mark.parametrize("version", [3, 2])
def test_a_damaged_chunk_is_an_error_not_data(tmp_path, version):
    repo, m, _, entries = make(tmp_path, version)
    h = entries[0].chunk.hex()
    path = tmp_path / "repo" / "chunks" / h[:2] / h
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    image = BackupImage(repo, m, "vda")
    with pytest.raises(RepositoryDamaged):
        image.read(64 * KiB, 4 * KiB)
    assert image.read(2 * MiB, 4 * KiB)  # other chunks still read


def test_read_ahead_loads_the_next_chunks_of_a_reader_moving_forward(tmp_path):
    """One request at a time, front to back (like QEMU's block-stream): after the first two chunks,
    each chunk is loaded before the reader asks for it; random reads start no read-ahead."""
    import threading
    import time

    repo = Repository.open(tmp_path / "repo", create=True)
    chunks = [os.urandom(64 * KiB) for _ in range(12)]
    entries = []
    for i, data in enumerate(chunks):
        cid = repo.chunk_id(data)
        repo.put_chunk(cid, data, 3)
        entries.append(IndexEntry(i * 64 * KiB, 64 * KiB, cid))
    size = len(chunks) * 64 * KiB
    sha = repo.write_index("vm1", "cp1", "vda", size, entries)
    m = Manifest(vm="vm1", checkpoint="cp1", kind="full", since=None, created="2026-01-01T00:00:00Z", chain="c" * 32,
                 disks=(DiskBackup("vda", size, sha, size, 0, True),))
    repo.commit(m)
    expected = b"".join(chunks)

    image = BackupImage(repo, m, "vda", cache_bytes=64 * MiB, read_ahead=3)
    waited, by_reader = [], []
    real_get = repo.get_chunk

    def slow_get(cid, where):  # a remote store: every load takes a while
        waited.append(cid)
        if threading.current_thread() is threading.main_thread():
            by_reader.append(cid)
        time.sleep(0.05)
        return real_get(cid, where)

    repo.get_chunk = slow_get
    got = bytearray()
    for off in range(0, size, 16 * KiB):
        got += image.read(off, 16 * KiB)
        time.sleep(0.01)  # the reader's own work: read-ahead runs meanwhile
    image.close()
    assert bytes(got) == expected
    assert image.loads == len(chunks) + 1  # every chunk once, and the piece the first read took (not known as sequential yet)
    assert sorted(waited) == sorted(e.chunk for e in entries)
    assert len(by_reader) < 6, f"the reader itself loaded {len(by_reader)} of {len(chunks)} chunks"  # 12 without read-ahead

    # random access: nothing is loaded that nobody asked for
    image = BackupImage(repo, m, "vda", cache_bytes=64 * MiB, read_ahead=3)
    for i in (7, 2, 10, 5):
        assert image.read(i * 64 * KiB, 4 * KiB) == expected[i * 64 * KiB:i * 64 * KiB + 4 * KiB]
    image.close()
    assert image.loads == 4


def one_chunk_backup(repo, data, entries):
    cid = repo.chunk_id(data)
    repo.put_chunk(cid, data, 3)
    entries = [IndexEntry(off, n, cid, at) for off, n, at in entries]
    size = max(e.end for e in entries)
    sha = repo.write_index("vm1", "cp1", "vda", size, entries)
    m = Manifest(vm="vm1", checkpoint="cp1", kind="full", since=None, created="2026-01-01T00:00:00Z", chain="c" * 32,
                 disks=(DiskBackup("vda", size, sha, sum(e.length for e in entries), 0, True),))
    repo.commit(m)
    return m, cid


def test_a_random_read_decodes_one_piece_not_the_chunk(tmp_path):
    """Format 3 in a directory: a 4 KiB read loads the one 256 KiB piece that holds it; a small
    read across a piece boundary loads both; a read of a piece or more loads the whole chunk,
    which then serves small reads too; a damaged piece stops only the reads that need it."""
    repo = Repository.open(tmp_path / "repo", create=True)
    piece = repo.chunk_id.piece
    data = bytes(random.Random(3).choices(b"nbdbackup pieces ", k=4 * MiB))
    m, cid = one_chunk_backup(repo, data, [(0, 4 * MiB, 0)])
    image = BackupImage(repo, m, "vda")
    assert image.read(5 * piece + 100, 4 * KiB) == data[5 * piece + 100:5 * piece + 100 + 4 * KiB]
    assert image.loads == 1
    assert list(image._cache) == [(cid, 5)] and len(image._cache[cid, 5]) == piece
    assert image.read(7 * piece - 10, 20) == data[7 * piece - 10:7 * piece + 10]
    assert image.loads == 3
    assert image.read(5 * piece, 8 * KiB) == data[5 * piece:5 * piece + 8 * KiB] and image.loads == 3  # cached
    assert image.read(piece, piece) == data[piece:2 * piece] and image.loads == 4 and (cid, None) in image._cache
    assert image.read(9 * piece, 4 * KiB) == data[9 * piece:9 * piece + 4 * KiB] and image.loads == 4  # from the chunk

    h = cid.hex()
    path = tmp_path / "repo" / "chunks" / h[:2] / h
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1  # in the last piece's frame
    path.write_bytes(bytes(blob))
    image = BackupImage(repo, m, "vda")
    assert image.read(0, 64 * KiB) == data[:64 * KiB]
    with pytest.raises(RepositoryDamaged, match="fails its checksum|does not decompress"):
        image.read(4 * MiB - 4 * KiB, 4 * KiB)
    with pytest.raises(RepositoryDamaged, match="fails its checksum|does not decompress"):
        image.read(0, piece)  # the whole chunk


@pytest.mark.parametrize("version", [3, 2])
def test_an_index_entry_beyond_its_chunk_is_an_error(tmp_path, version):
    like = Repository(MemoryBackend("v2"), "0" * 32, version=2) if version == 2 else None
    repo = Repository.open(tmp_path / "repo", create=True, like=like)
    data = os.urandom(300 * KiB)  # two pieces, the second short
    m, _ = one_chunk_backup(repo, data, [(0, 256 * KiB, 0), (256 * KiB, 64 * KiB, 256 * KiB)])  # 20 KiB too many
    assert BackupImage(repo, m, "vda").read(0, 300 * KiB) == data
    assert BackupImage(repo, m, "vda").read(256 * KiB, 40 * KiB) == data[256 * KiB:296 * KiB]
    for at, n in ((300 * KiB, 4 * KiB), (0, 320 * KiB)):  # a piece, the whole chunk
        with pytest.raises(RepositoryDamaged, match="shorter than its index says"):
            BackupImage(repo, m, "vda").read(at, n)


def test_the_cache_is_bounded_in_bytes_whatever_it_holds(tmp_path):
    repo = Repository.open(tmp_path / "repo", create=True)
    piece = repo.chunk_id.piece
    data = bytes(random.Random(4).choices(b"xyz ", k=4 * MiB))
    m, cid = one_chunk_backup(repo, data, [(0, 4 * MiB, 0)])
    image = BackupImage(repo, m, "vda", cache_bytes=4 * MiB)
    for i in range(16):  # 16 pieces: a chunk's worth, all kept
        assert image.read(i * piece + 1, 4 * KiB) == data[i * piece + 1:i * piece + 1 + 4 * KiB]
    assert image.loads == 16 and len(image._cache) == 16 and image._held == 4 * MiB
    assert image.read(0, 4 * MiB) == data and image.loads == 17  # the whole chunk pushes the pieces out
    assert list(image._cache) == [(cid, None)] and image._held == 4 * MiB
    assert image.read(3 * piece, 4 * KiB) == data[3 * piece:3 * piece + 4 * KiB] and image.loads == 17


def test_a_reader_going_on_from_its_last_read_gets_whole_chunks(tmp_path):
    repo = Repository.open(tmp_path / "repo", create=True)
    data = bytes(random.Random(5).choices(b"abc ", k=4 * MiB))
    m, cid = one_chunk_backup(repo, data, [(0, 4 * MiB, 0)])
    image = BackupImage(repo, m, "vda")
    assert image.read(8 * KiB, 4 * KiB) == data[8 * KiB:12 * KiB] and list(image._cache) == [(cid, 0)]
    assert image.read(12 * KiB, 4 * KiB) == data[12 * KiB:16 * KiB]  # where the last one ended
    assert list(image._cache) == [(cid, 0), (cid, None)] and image.loads == 2
    assert image.read(3 * MiB, 4 * KiB) == data[3 * MiB:3 * MiB + 4 * KiB] and image.loads == 2  # the chunk serves it


@pytest.mark.parametrize("encrypted", [False, True])
def test_from_an_object_store_a_small_read_fetches_the_header_and_one_piece(encrypted):
    """Unencrypted format 3 outside a directory (S3; here in memory): two ranged requests, the
    chunk file's head (header and table) and the piece, never the whole chunk file; encrypted
    chunks are fetched whole (their tag covers all of them)."""
    backend = MemoryBackend("store")
    repo = Repository.open(backend, create=True, **({"encryption": "repokey", "passphrase": b"pass"} if encrypted else {}))
    assert repo.reads_pieces is not encrypted
    data = os.urandom(4 * MiB)  # stored as is: each piece is 256 KiB of the file
    m, cid = one_chunk_backup(repo, data, [(0, 4 * MiB, 0)])
    calls = []
    real_read, real_range = backend.read, backend.read_range
    backend.read = lambda key: calls.append(("read", key, None)) or real_read(key)
    backend.read_range = lambda key, off, n: calls.append(("range", key, n)) or real_range(key, off, n)
    image = BackupImage(repo, m, "vda")
    assert image.read(9 * 256 * KiB + 5, 100) == data[9 * 256 * KiB + 5:9 * 256 * KiB + 105]
    chunk_calls = [c for c in calls if "chunks/" in c[1]]
    if encrypted:
        assert [c[0] for c in chunk_calls] == ["read"] and (cid, None) in image._cache
    else:
        assert chunk_calls == [("range", repo._chunk_key(cid), 4096), ("range", repo._chunk_key(cid), 256 * KiB)]
        assert list(image._cache) == [(cid, 9)]
    image.close()
