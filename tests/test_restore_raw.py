"""Restore to raw without an NBD server (rawimage.py) and chunk decoding into reused buffers: no QEMU.

The end-to-end restores (tests/test_full_backup.py, test_golden.py, ...) run the same code on
real backups; here the awkward cases: pieces on 512-byte boundaries, slices of shared chunks,
the disk's last partial block, memory that is not page-aligned, filesystems without O_DIRECT.
"""

from __future__ import annotations

import os
import random
import signal

import pytest
from test_backupimage import make

from nbdbackup.errors import RepositoryDamaged, RestoreTargetError
from nbdbackup.rawimage import ALIGN, RawImage, aligned_buffer, create_raw
from nbdbackup.records import DiskBackup, IndexEntry, Manifest
from nbdbackup.repository import Repository
from nbdbackup.restore import RestoreRequest, run_restore

KiB, MiB = 1024, 1024 * 1024


def test_restore_to_raw_writes_the_file_itself_identical_and_sparse(tmp_path):
    repo, m, expected, entries = make(tmp_path)
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    [image] = run_restore(repo, RestoreRequest("vm1", "cp1", tmp_path / "out", format="raw"), socket_dir=sockets)
    assert (image.disk, image.path, image.format) == ("vda", tmp_path / "out" / "vda.raw", "raw")
    path = image.path
    assert path.read_bytes() == expected
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert path.stat().st_blocks * 512 <= 1 * MiB  # holes stay holes: 0.5 MiB of data in a 4 MiB disk
    assert not list(sockets.iterdir())  # no qemu-storage-daemon was needed
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["vda.raw"]


@pytest.mark.parametrize("direct", [True, False])
def test_raw_image_writes_aligned_and_unaligned_pieces_alike(tmp_path, direct):
    size = 8 * MiB + 512
    path = tmp_path / "d.raw"
    create_raw(path, size)
    rnd = random.Random(3)
    buf = aligned_buffer(4 * MiB)
    buf[:] = rnd.randbytes(4 * MiB)
    expected = bytearray(size)
    pieces = [  # (disk offset, offset in buf, length)
        (0, 0, 1 * MiB),  # all aligned: O_DIRECT where the filesystem has it
        (1 * MiB + 512, 512, 64 * KiB),  # 512-byte aligned only
        (2 * MiB, 100, 3 * ALIGN),  # memory not aligned
        (3 * MiB, 0, 2 * ALIGN + 700),  # aligned body, unaligned tail
        (4 * MiB + ALIGN, ALIGN, 10),  # tiny
        (size - 512, 0, 512),  # the disk's last partial block
    ]
    with RawImage(path, "disk vda", direct=direct) as raw:
        if not direct:
            assert not raw.direct
        for offset, at, n in pieces:
            raw.write(buf[at:at + n], offset, memory_aligned=at % ALIGN == 0)
            expected[offset:offset + n] = buf[at:at + n]
        raw.flush()
    assert path.read_bytes() == bytes(expected)
    assert path.stat().st_size == size


def test_a_filesystem_refusing_direct_writes_falls_back_to_buffered(tmp_path, monkeypatch):
    path = tmp_path / "d.raw"
    create_raw(path, 1 * MiB)
    real = os.pwrite
    with RawImage(path, "disk vda") as raw:
        direct_fd = raw._direct_fd

        def pwrite(fd, data, offset):
            if fd == direct_fd and fd is not None:
                raise OSError(22, "Invalid argument")
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)
        buf = aligned_buffer(64 * KiB)
        buf[:] = b"x" * (64 * KiB)
        raw.write(buf, 0, memory_aligned=True)
        raw.write(buf, 64 * KiB, memory_aligned=True)
        assert not raw.direct
        raw.flush()
    assert path.read_bytes() == b"x" * (128 * KiB) + bytes(1 * MiB - 128 * KiB)


def test_write_errors_are_restore_target_errors(tmp_path):
    path = tmp_path / "d.raw"
    create_raw(path, 1 * MiB)
    with pytest.raises(RestoreTargetError, match="exists|File exists"):
        create_raw(path, 1 * MiB)
    raw = RawImage(path, "disk vda", direct=False)
    raw.close()
    raw._fd = 10 ** 6  # a closed descriptor: EBADF
    with pytest.raises(RestoreTargetError, match="writing disk vda"):
        raw.write(memoryview(b"abc"), 0, memory_aligned=False)


def test_decode_into_a_reused_buffer_checks_like_decode(tmp_path):
    repo = Repository.open(tmp_path / "repo", create=True)
    text = (b"restore me " * 500_000)[:4 * MiB]
    noise = os.urandom(1 * MiB)  # stored as is
    buf = aligned_buffer(4 * MiB)
    for data in (text, noise):
        cid = repo.chunk_id(data)
        blob = b"".join(bytes(p) for p in repo.encode_chunk(data, 2))
        asked: list[int] = []
        view = repo.decode_chunk_into(blob, cid, "here", lambda n, asked=asked: asked.append(n) or buf)
        assert asked == [len(data)]
        assert view == data and view.obj is buf.obj
        assert repo.decode_chunk(blob, cid, "here") == data
        damaged = bytearray(blob)
        damaged[len(blob) // 2] ^= 1
        with pytest.raises(RepositoryDamaged, match="fails its checksum|does not decompress"):
            repo.decode_chunk_into(bytes(damaged), cid, "here", lambda n: buf)
        with pytest.raises(RepositoryDamaged, match="fails its checksum|truncated|does not decompress"):
            repo.decode_chunk_into(blob[:-5], cid, "here", lambda n: buf)
    with pytest.raises(ValueError):
        repo.decode_chunk_into(blob, cid, "here", lambda n: aligned_buffer(4096))



# -- faults: the CLI on the hand-made backup (tests/faults.py) --------------------------------

def test_sigterm_while_writing_a_raw_image_leaves_nothing(tmp_path):
    from faults import Run, assert_one_line_error

    make(tmp_path)
    out = tmp_path / "out"
    with Run(tmp_path / "repo", "restore", "vm1", "--to", "cp1", "--output", out, "--format", "raw",
             pause="write", after=2) as run:
        run.wait_paused()
        run.signal(signal.SIGTERM)
        result = run.finish()
    assert_one_line_error(result, 143)
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_full_target_filesystem_is_a_restore_target_error(tmp_path):
    from faults import Run, assert_one_line_error, small_filesystem

    repo = Repository.open(tmp_path / "repo", create=True)
    data = os.urandom(4 * MiB)  # incompressible: 3 chunks x 4 MiB into a 8 MiB tmpfs
    cid = repo.chunk_id(data)
    repo.put_chunk(cid, data, 2)
    size = 16 * MiB
    entries = [IndexEntry(i * 4 * MiB, 4 * MiB, cid) for i in range(3)]
    sha = repo.write_index("vm1", "cp1", "vda", size, entries)
    repo.commit(Manifest(vm="vm1", checkpoint="cp1", kind="full", since=None, created="2026-01-01T00:00:00Z",
                         chain="c" * 32, disks=(DiskBackup("vda", size, sha, 12 * MiB, 0, True),)))
    with small_filesystem(tmp_path / "small", 8) as small:
        with Run(tmp_path / "repo", "restore", "vm1", "--to", "cp1", "--output", small / "out", "--format", "raw") as run:
            result = run.finish()
        line = assert_one_line_error(result, 8)
        assert "No space left" in line and "disk vda" in line, line
        assert sorted(p.name for p in (small / "out").iterdir()) == []
