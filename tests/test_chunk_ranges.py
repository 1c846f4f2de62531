"""A rollback's writers read only the ranges they need of each chunk (Repository.read_chunk_ranges,
chunks.read_ranges), every byte checked before they may use it: in a version 3 repository only the
pieces holding the ranges are read, decoded and checked (each against its hash, the hashes against
the chunk id); in older ones the whole chunk is checked, decoded in small pieces.  From the chunk
file itself in a local directory, or from the fetched (and decrypted) chunk elsewhere."""

from __future__ import annotations

import io
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nbdbackup.errors import RepositoryDamaged
from nbdbackup.repository import Repository, chunks
from nbdbackup.repository.memory import MemoryBackend

MiB = 1024 * 1024


def contents() -> list[bytes]:
    rng = random.Random(5)
    text = b"".join(b"line %d of a text file\n" % i for i in range(200_000))[:3 * MiB + 12345]  # zstd
    noise = rng.randbytes(2 * MiB + 7)  # stored as is
    return [text, noise, b"", b"tiny chunk"]


def ranges_for(data: bytes) -> list[tuple[int, int]]:
    """Ranges as a rollback asks them: several, out of order, overlapping, empty, the whole."""
    n = len(data)
    picks = [(0, min(n, 10)), (n // 2, n - n // 2), (n // 3, n // 4), (min(n, n // 3 + 1), n // 4), (n, 0), (max(0, n - 1), min(n, 1))]
    return picks + [(0, n)]


def expected(data: bytes, ranges: list[tuple[int, int]]) -> bytes:
    return b"".join(data[at:at + n] for at, n in ranges)


REPOS = ["directory", "memory", "encrypted", "directory-v2"]


def make_repo(kind: str, tmp_path: Path) -> Repository:
    if kind == "directory":  # the chunk file is read piece by piece
        return Repository.open(tmp_path / "repo", create=True)
    if kind == "directory-v2":  # format version 2: the content hashed whole, one zstd frame
        return Repository.open(tmp_path / "repo", create=True, like=Repository(MemoryBackend("v2"), "0" * 32, version=2))
    if kind == "memory":  # fetched whole first
        return Repository.open(MemoryBackend("r"), create=True)
    return Repository.open(MemoryBackend("r"), create=True, encryption="repokey", passphrase=b"pass phrase")


@pytest.mark.parametrize("kind", REPOS)
@pytest.mark.parametrize("step_size", [chunks.STEP, 4096, 1000])  # pieces that cut through the ranges
def test_ranges_of_checked_chunks(kind, step_size, tmp_path):
    repo = make_repo(kind, tmp_path)
    step = memoryview(bytearray(step_size))
    for data in contents():
        cid = repo.chunk_id(data)
        repo.put_chunk(cid, data, 1)
        ranges = ranges_for(data)
        want = expected(data, ranges)
        out = memoryview(bytearray(len(want) + 3))
        repo.read_chunk_ranges(cid, "here", ranges, out, step)
        assert bytes(out[:len(want)]) == want


@pytest.mark.parametrize("encoding", ["zstd", "stored"])
def test_damaged_chunk_files_are_refused_whole(encoding, tmp_path):
    """Version 2 and older: damage anywhere in the chunk, also after the last range asked for, is
    found before the caller may use what was copied: the whole content is checked."""
    repo = make_repo("directory-v2", tmp_path)
    assert repo.version == 2
    data = contents()[0 if encoding == "zstd" else 1]
    cid = repo.chunk_id(data)
    repo.put_chunk(cid, data, 1)
    path = tmp_path / "repo" / "chunks" / cid.hex()[:2] / cid.hex()
    blob = path.read_bytes()
    assert blob[5] == (chunks.ZSTD if encoding == "zstd" else chunks.STORED)
    step = memoryview(bytearray(chunks.STEP))
    out = memoryview(bytearray(len(data)))
    first = [(0, 100)]  # only the start is asked for
    for damaged in (blob[:-5], blob[:len(blob) - 100] + bytes(x ^ 0x40 for x in blob[-100:]), blob + b"more",
                    blob[:4] + b"\x09" + blob[5:], blob[:8]):
        path.write_bytes(damaged)
        with pytest.raises(RepositoryDamaged, match="fails its checksum|does not decompress|truncated|bad header"):
            repo.read_chunk_ranges(cid, "backup X, disk vda, offset 0", first, out, step)
    path.write_bytes(blob)
    repo.read_chunk_ranges(cid, "here", first, out, step)
    assert bytes(out[:100]) == data[:100]
    with pytest.raises(RepositoryDamaged, match=r"shorter than its index says \(backup X"):
        repo.read_chunk_ranges(cid, "backup X", [(len(data) - 10, 11)], out, step)
    path.unlink()
    with pytest.raises(RepositoryDamaged, match="is missing"):
        repo.read_chunk_ranges(cid, "here", first, out, step)


class CountingFile(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.got = 0

    def read(self, n: int = -1) -> bytes:
        out = super().read(n)
        self.got += len(out)
        return out


@pytest.mark.parametrize("encoding", ["zstd", "stored"])
def test_version_3_reads_and_checks_only_the_pieces_asked_for(encoding, tmp_path):
    """Version 3: the header's piece hashes are checked against the chunk id, then only the pieces
    holding the ranges are read and decoded, each checked against its hash.  Damage in a piece
    read is refused; damage in one not read does not stop a reader of the others (who gets only
    checked bytes), and `verify` (the whole chunk) finds it."""
    repo = make_repo("directory", tmp_path)
    piece = repo.chunk_id.piece
    data = contents()[0 if encoding == "zstd" else 1]
    cid = repo.chunk_id(data)
    repo.put_chunk(cid, data, 1)
    path = tmp_path / "repo" / "chunks" / cid.hex()[:2] / cid.hex()
    blob = path.read_bytes()
    pieces = -(-len(data) // piece)
    table = pieces * 32 + (pieces * 4 if encoding == "zstd" else 0)
    assert blob[:7] == b"NBDC\x02" + bytes([chunks.ZSTD if encoding == "zstd" else chunks.STORED, 18])
    step = memoryview(bytearray(chunks.STEP))
    out = memoryview(bytearray(len(data)))
    middle = [(5 * piece + 10, 1000)]  # inside the sixth piece
    f = CountingFile(blob)
    chunks.read_ranges(f, cid, "here", repo.chunk_id, middle, out, step)
    assert bytes(out[:1000]) == data[5 * piece + 10:5 * piece + 1010]
    sixth = struct.unpack_from(f"<{pieces}I", blob, chunks.HEADER_SIZE + pieces * 32)[5] if encoding == "zstd" else piece
    assert f.got == chunks.HEADER_SIZE + table + sixth  # the header, its table and the sixth piece: nothing else
    last, first = [(len(data) - 1, 1)], [(0, 100)]
    damaged_last = bytearray(blob)
    damaged_last[-3] ^= 0x40
    for damaged, asked in ((blob[:chunks.HEADER_SIZE + 5] + bytes([blob[chunks.HEADER_SIZE + 5] ^ 1]) + blob[chunks.HEADER_SIZE + 6:], first),
                           (blob[:8], first), (blob[:chunks.HEADER_SIZE + table - 1], middle), (blob[:4] + b"\x01" + blob[5:], first),
                           (blob[:6] + b"\x11" + blob[7:], first), (bytes(damaged_last), last), (blob[:-5], last)):
        path.write_bytes(damaged)
        with pytest.raises(RepositoryDamaged, match="fails its checksum|does not decompress|truncated|bad header"):
            repo.read_chunk_ranges(cid, "backup X, disk vda, offset 0", asked, out, step)
    for damaged in (bytes(damaged_last), blob[:-5]):  # the first piece is still whole and checked
        path.write_bytes(damaged)
        repo.read_chunk_ranges(cid, "here", first, out, step)
        assert bytes(out[:100]) == data[:100]
        with pytest.raises(RepositoryDamaged):
            repo.get_chunk(cid, "serve")
        with pytest.raises(RepositoryDamaged):
            repo.check_chunk(cid, "verify")
    damaged_first = bytearray(blob)
    damaged_first[chunks.HEADER_SIZE + table + 7] ^= 0x40
    path.write_bytes(bytes(damaged_first))
    with pytest.raises(RepositoryDamaged):
        repo.read_chunk_ranges(cid, "here", first, out, step)
    repo.read_chunk_ranges(cid, "here", last, out, step)  # the last piece is whole
    assert bytes(out[:1]) == data[-1:]


def test_damaged_chunk_in_an_encrypted_repository(tmp_path):
    repo = make_repo("encrypted", tmp_path)
    data = contents()[0]
    cid = repo.chunk_id(data)
    repo.put_chunk(cid, data, 1)
    inner = repo.backend.inner
    key = next(k for k in inner.list("chunks"))  # the one chunk, under its keyed name
    sealed = bytearray(inner.read(key))
    sealed[len(sealed) // 2] ^= 1
    inner.write(key, bytes(sealed))
    with pytest.raises(RepositoryDamaged):
        repo.read_chunk_ranges(cid, "here", [(0, 10)], memoryview(bytearray(10)), memoryview(bytearray(chunks.STEP)))


def test_out_too_small_is_a_programming_error(tmp_path):
    repo = make_repo("directory", tmp_path)
    data = contents()[3]
    cid = repo.chunk_id(data)
    repo.put_chunk(cid, data, 1)
    with pytest.raises(ValueError):
        repo.read_chunk_ranges(cid, "here", [(0, 4), (2, 4)], memoryview(bytearray(7)), memoryview(bytearray(16)))


# -- qemu-storage-daemon is started without a fork of nbdbackup, and still dies with it -----------------------


CHILD = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    from nbdbackup import storage_daemon
    if sys.argv[1] == "preexec":
        storage_daemon._SETPRIV = ""  # as where setpriv(1) is missing
    signum = signal.Signals[sys.argv[2]]
    # With SIGKILL asked for, the program ignores SIGTERM: only the signal asked for ends it.
    cmd = ["sleep", "60"] if signum == signal.SIGTERM else ["sh", "-c", "trap '' TERM; exec sleep 60"]
    with open("/dev/null", "wb") as out:
        proc = storage_daemon.spawn_dying_with_parent(cmd, stdout=out, signum=signum)
    print(proc.pid, flush=True)
    time.sleep(60)
""")


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGKILL"])  # SIGKILL: nbdkit's (serving.Process kill=True)
@pytest.mark.parametrize("how", ["setpriv", "preexec"])
def test_spawned_daemon_dies_with_nbdbackup(how, signame):
    parent = subprocess.Popen([sys.executable, "-c", CHILD, how, signame], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":  # setpriv has exec'd it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert os.getsid(pid) == pid  # a session of its own: a terminal's Ctrl-C reaches nbdbackup only
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while alive(pid):
            assert time.monotonic() < deadline, "the spawned process outlived its parent"
            time.sleep(0.01)
    finally:
        parent.kill()
        parent.wait()


@pytest.mark.parametrize("ids", ["sha256", "blake3", "keyed"])
def test_incremental_hasher_names_chunks_as_the_whole_content_does(ids):
    """read_ranges hashes an older chunk's content part by part: every kind of chunk id that hashes
    the content whole (version 1's SHA-256, BLAKE3, an encrypted repository's keyed BLAKE3) gives
    the same id that way.  Version 3's tree ids are checked piece by piece instead: no hasher."""
    from nbdbackup.repository.chunkid import ChunkIds

    chunk_ids = {"sha256": ChunkIds.sha256, "blake3": ChunkIds.blake3, "keyed": lambda: ChunkIds.keyed(b"k" * 32)}[ids]()
    data = random.Random(1).randbytes(3 * MiB + 5)
    hasher = chunk_ids.hasher()
    for at in range(0, len(data), 100_000):
        hasher.update(memoryview(data)[at:at + 100_000])
    assert hasher.digest() == chunk_ids(data)
    with pytest.raises(TypeError, match="piece by piece"):
        ChunkIds.tree().hasher()


def test_a_chunk_serving_many_disk_ranges_is_read_once_per_byte():
    """A deduplicated chunk may hold the data of thousands of disk ranges: the writer asks for
    each byte of the chunk once (sorted, merged spans), so its buffer stays within the chunk's size."""
    from nbdbackup.rollback import chunk_spans

    same = [(i * 4 * MiB, 0, 4 * MiB) for i in range(1000)]  # a disk full of one 4 MiB chunk
    assert chunk_spans(same) == [(0, 4 * MiB)]
    copies = [(0, 100, 50), (4096, 100, 50), (8192, 120, 10), (9000, 0, 10), (9999, 150, 5), (12000, 300, 0)]
    assert chunk_spans(copies) == [(0, 10), (100, 55), (300, 0)]
    assert chunk_spans([(0, 0, 10), (10, 10, 10)]) == [(0, 20)]  # touching: one span


def test_rollback_writer_lays_back_shared_and_zero_ranges(tmp_path):
    """rollback.write_disk against a real NBD server (nbdkit memory, writable): ranges of one
    chunk used by many disk ranges (deduplicated), overlapping uses, zeroes inside the data and
    ranges the backup holds no data for; every byte must come out as the backup has it."""
    from types import SimpleNamespace

    from nbdbackup.capture import CancelToken, Tuning
    from nbdbackup.nbdio import NbdEndpoint
    from nbdbackup.records import Extent, IndexEntry
    from nbdbackup.rollback import CHANGED, DiskRollback, write_disk

    repo = Repository.open(tmp_path / "repo", create=True)
    rng = random.Random(3)
    text = b"".join(b"row %d\n" % i for i in range(300_000))[:2 * MiB]
    content = bytearray(text)
    content[MiB:MiB + 128 * 1024] = bytes(128 * 1024)  # zeroes in the data: written as a hole
    content = bytes(content)
    noise = rng.randbytes(MiB)
    cids = []
    for data in (content, noise):
        cid = repo.chunk_id(data)
        repo.put_chunk(cid, data, 1)
        cids.append(cid)
    size = 64 * MiB
    entries = []
    backup = bytearray(size)
    for i in range(40):  # one chunk range at 40 disk places
        at = 8 * MiB + i * 256 * 1024
        entries.append(IndexEntry(at, 200 * 1024, cids[0], 64 * 1024))
        backup[at:at + 200 * 1024] = content[64 * 1024:264 * 1024]
    entries.append(IndexEntry(19 * MiB, 200 * 1024, cids[0], 100 * 1024))  # overlaps those: inside one merged span
    backup[19 * MiB:19 * MiB + 200 * 1024] = content[100 * 1024:300 * 1024]
    entries.append(IndexEntry(20 * MiB, 2 * MiB, cids[0], 0))  # the whole chunk, zeroes included
    backup[20 * MiB:22 * MiB] = content
    entries.append(IndexEntry(30 * MiB, MiB, cids[1], 0))
    backup[30 * MiB:31 * MiB] = noise
    entries.sort(key=lambda e: e.offset)
    regions = (Extent(0, 2 * MiB), Extent(8 * MiB, 12 * MiB), Extent(20 * MiB + 512 * 1024, 11 * MiB))
    plan = DiskRollback("vda", tmp_path / "none", CHANGED, regions, size, size)
    sock = tmp_path / "mem.sock"
    server = subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock), "memory", str(size)])
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.01)
        with NbdEndpoint(sock, "", writable=True) as ep:
            ep.write_batch([(0, size, rng.randbytes(size))])  # today's content, to be rolled back
            before = ep.pread(size, 0)
        written, zeroed = write_disk(repo, SimpleNamespace(checkpoint="C"), plan, entries, sock, "",
                                     Tuning(workers=3, depth=4), CancelToken(), lambda n: None)
        with NbdEndpoint(sock, "") as ep:
            after = ep.pread(size, 0)
    finally:
        server.terminate()
        server.wait(timeout=10)
    expected = bytearray(before)
    for r in regions:
        expected[r.offset:r.end] = backup[r.offset:r.end]
    assert after == bytes(expected)
    assert written + zeroed == sum(r.length for r in regions)


@pytest.mark.parametrize("kind", REPOS)
def test_check_chunk_checks_what_get_chunk_checks_and_reuses_its_buffers(kind, tmp_path):
    """verify's check_chunk: the content's length for a sound chunk, RepositoryDamaged for a
    damaged one, from every kind of repository; chunk after chunk through the same buffers."""
    repo = make_repo(kind, tmp_path)
    for data in contents():
        cid = repo.chunk_id(data)
        repo.put_chunk(cid, data, 1)
        assert repo.check_chunk(cid, "verify") == len(data) == len(repo.get_chunk(cid, "verify"))
    with pytest.raises(RepositoryDamaged, match="missing"):
        repo.check_chunk(bytes(32), "verify")
    data = os.urandom(300 * 1024)
    cid = repo.chunk_id(data)
    repo.put_chunk(cid, data, 1)
    key = repo._chunk_key(cid)
    store, name = (repo.backend.inner, repo.backend.physical(key)) if repo.encrypted else (repo.backend, key)
    blob = bytearray(store.read(name))
    blob[-20] ^= 1
    store.write(name, bytes(blob))
    with pytest.raises(RepositoryDamaged):
        repo.check_chunk(cid, "verify")
