"""The backup data path against a real NBD server that needs no VM: nbdkit.

`capture` maps the export with base:allocation, reads only what holds data
(libnbd, several connections), stores chunks in an in-memory repository; the
chunks laid back at their offsets must give the export's bytes exactly, holes
must stay holes, and zeroes read as data must not be stored.  nbdkit's
`sparse-random` plugin gives a deterministic disk of data runs and holes, the
`data` plugin one with exactly placed bytes; both report their extents, as
QEMU's NBD server does.  (The end-to-end tests with QEMU stay: this one makes
a data-path fault show up in seconds.)
"""

from __future__ import annotations

import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from nbdbackup.capture import CancelToken, Tuning, capture
from nbdbackup.nbdio import NbdEndpoint
from nbdbackup.records import Extent
from nbdbackup.repository import Repository
from nbdbackup.repository.memory import MemoryBackend

MiB = 1024 * 1024


@contextmanager
def nbdkit(tmp_path: Path, *plugin_args: str):
    """nbdkit serving ``plugin_args`` read-only on a unix socket in tmp_path (stopped on every path)."""
    assert shutil.which("nbdkit"), "nbdkit is not installed (scripts/setup installs it)"
    sock = tmp_path / "nbdkit.sock"
    proc = subprocess.Popen(["nbdkit", "--foreground", "--readonly", "--exit-with-parent", "-U", str(sock), *plugin_args],
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "nbdkit did not create its socket"
            time.sleep(0.01)
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def backed_up(sock: Path, tuning: Tuning):
    """Capture the whole export into a new in-memory repository: (repository, result, size, source bytes)."""
    repo = Repository.open(MemoryBackend(), create=True)

    def connect(contexts=()):
        return NbdEndpoint(sock, "", contexts=contexts)

    with connect() as ep:
        size = ep.size
        source = ep.pread(size, 0)
    result = capture(repo, connect, [Extent(0, size)], tuning=tuning, cancel=CancelToken())
    return repo, result, size, source


def laid_back(repo: Repository, entries, size: int) -> bytes:
    image = bytearray(size)
    for e in entries:
        image[e.offset:e.offset + e.length] = repo.get_chunk(e.chunk, f"offset {e.offset}")[e.chunk_offset:e.chunk_offset + e.length]
    return bytes(image)


@pytest.mark.parametrize("chunk_mib,workers", [(4, 2), (1, 3)])
def test_sparse_random_disk_round_trips_and_holes_are_not_read(tmp_path, chunk_mib, workers):
    with nbdkit(tmp_path, "sparse-random", "64M", "percent=30", f"runlength={MiB}", "seed=7") as sock:
        repo, result, size, source = backed_up(sock, Tuning(chunk_size=chunk_mib * MiB, workers=workers, depth=4, level=1))
    assert laid_back(repo, result.entries, size) == source
    assert 0 < result.read_bytes < size  # holes were never read
    covered = sum(e.length for e in result.entries)
    assert covered <= result.read_bytes + len(result.entries) * chunk_mib * MiB
    offsets = [e.offset for e in result.entries]
    chunk = chunk_mib * MiB
    assert offsets == sorted(offsets) and all(e.offset // chunk == (e.offset + e.length - 1) // chunk for e in result.entries)


def test_zeroes_read_as_data_are_not_stored_and_dedup_holds(tmp_path):
    # Two identical 1 MiB runs at chunk-aligned offsets, a chunk-sized window holding only a run of
    # written zero bytes, and the last byte of the disk: the two runs share one chunk, the zeroes
    # (whether the server calls them data or a hole) have none.
    pattern = "(" + " ".join(str(b) for b in range(1, 256)) + ")*4112"  # 1,048,560 bytes, never zero
    layout = f"@0 {pattern} @{8 * MiB} {pattern} @{4 * MiB} (0)*{MiB} @{16 * MiB - 1} 255"
    with nbdkit(tmp_path, "data", layout, f"size={16 * MiB}") as sock:
        repo, result, size, source = backed_up(sock, Tuning(chunk_size=4 * MiB, workers=2, depth=4, level=2))
    assert laid_back(repo, result.entries, size) == source
    assert [e.offset // (4 * MiB) for e in result.entries] == [0, 2, 3]  # the window of zeroes has no chunk
    assert result.entries[0].chunk == result.entries[1].chunk  # same bytes at the same alignment: one chunk
    assert source[-1] == 255 and source[4 * MiB:8 * MiB] == bytes(4 * MiB)


def test_scattered_ranges_are_packed_into_few_chunks_each_at_its_own_offset(tmp_path):
    # An incremental's regions: 200 changed 64 KiB ranges scattered over a 64 MiB disk of data,
    # one range of written zeroes among them.  They are packed into chunks of at most 4 MiB (each
    # range its own entry at its chunk offset) instead of one small chunk per range.
    KiB = 1024
    layout = f"@0 (1 2 3 4 5 6 7)*{64 * MiB // 7} @{32 * MiB} (0)*{64 * KiB}"
    regions = sorted({Extent((i * 37 % 1024) * 64 * KiB, 64 * KiB) for i in range(200)} | {Extent(32 * MiB, 64 * KiB)},
                     key=lambda e: e.offset)
    repo = Repository.open(MemoryBackend(), create=True)
    with nbdkit(tmp_path, "data", layout, f"size={64 * MiB}") as sock:
        def connect(contexts=()):
            return NbdEndpoint(sock, "", contexts=contexts)

        with connect() as ep:
            source = ep.pread(64 * MiB, 0)
        result = capture(repo, connect, regions, tuning=Tuning(chunk_size=4 * MiB, workers=2, depth=4, level=1), cancel=CancelToken())
    changed = [r for r in regions if r.offset != 32 * MiB]  # the zeroes are not stored
    assert [(e.offset, e.length) for e in result.entries] == [(r.offset, r.length) for r in changed]
    chunks = {e.chunk for e in result.entries}
    assert len(chunks) == -(-len(regions) * 64 * KiB // (4 * MiB))  # 201 ranges of 64 KiB: 4 chunks
    assert len({(e.chunk, e.chunk_offset) for e in result.entries}) == len(result.entries)
    for e in result.entries:
        assert repo.get_chunk(e.chunk, "")[e.chunk_offset:e.chunk_offset + e.length] == source[e.offset:e.end]
    assert result.read_bytes in (len(changed) * 64 * KiB, len(regions) * 64 * KiB)  # the zeroes: a hole, or read as data
