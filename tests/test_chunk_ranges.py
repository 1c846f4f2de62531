"""A rollback's writers read only the ranges they need of each chunk, but check the whole chunk
first (Repository.read_chunk_ranges, chunks.read_ranges): decoded in small pieces, from the
chunk file itself in a local directory, or from the fetched (and decrypted) chunk elsewhere."""

from __future__ import annotations

import os
import random
import signal
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


REPOS = ["directory", "memory", "encrypted"]


def make_repo(kind: str, tmp_path: Path) -> Repository:
    if kind == "directory":  # the chunk file is read piece by piece
        return Repository.open(tmp_path / "repo", create=True)
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
    """Damage anywhere in the chunk, also after the last range asked for, is found before the
    caller may use what was copied: the whole content is checked."""
    repo = make_repo("directory", tmp_path)
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
    import sys, time
    from pathlib import Path
    from nbdbackup import storage_daemon
    if sys.argv[1] == "preexec":
        storage_daemon._SETPRIV = ""  # as where setpriv(1) is missing
    with open("/dev/null", "wb") as out:
        proc = storage_daemon.spawn_dying_with_parent(["sleep", "60"], stdout=out)
    print(proc.pid, flush=True)
    time.sleep(60)
""")


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


@pytest.mark.parametrize("how", ["setpriv", "preexec"])
def test_spawned_daemon_dies_with_nbdbackup(how):
    parent = subprocess.Popen([sys.executable, "-c", CHILD, how], stdout=subprocess.PIPE, text=True)
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
    """read_ranges hashes the content piece by piece: every kind of chunk id (version 1's SHA-256,
    BLAKE3, an encrypted repository's keyed BLAKE3) gives the same id that way."""
    from nbdbackup.repository.chunkid import ChunkIds

    chunk_ids = ChunkIds.keyed(b"k" * 32) if ids == "keyed" else getattr(ChunkIds, ids)()
    data = random.Random(1).randbytes(3 * MiB + 5)
    hasher = chunk_ids.hasher()
    for at in range(0, len(data), 100_000):
        hasher.update(memoryview(data)[at:at + 100_000])
    assert hasher.digest() == chunk_ids(data)
