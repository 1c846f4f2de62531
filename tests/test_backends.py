"""ONE suite for every Backend (directory, memory, S3 on a real SeaweedFS): a backend is
correct when it passes these tests (restic's internal/backend/test, in small).
Then the lock objects that repositories outside a directory use, on memory and S3."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from nbdbackup.errors import LockHeld
from nbdbackup.lock import object_lock
from nbdbackup.repository import LocalBackend, Repository
from nbdbackup.repository.location import S3Location, S3Settings
from nbdbackup.repository.memory import MemoryBackend

KINDS = ["local", "memory", pytest.param("s3", marks=pytest.mark.s3)]


def make_backend(kind: str, request: pytest.FixtureRequest, tmp_path):
    if kind == "local":
        return LocalBackend(tmp_path / "backend")
    if kind == "memory":
        return MemoryBackend()
    from nbdbackup.repository.s3 import S3Backend

    s3_repo = request.getfixturevalue("s3_repo")
    settings = S3Settings(endpoint=s3_repo.server.endpoint, region="us-east-1", addressing="path", retries=2)
    backend = S3Backend(S3Location(s3_repo.bucket, "pre/fix"), settings)
    backend.check()
    return backend


@pytest.fixture(params=KINDS)
def backend(request, tmp_path):
    return make_backend(request.param, request, tmp_path)


@pytest.fixture(params=["memory", pytest.param("s3", marks=pytest.mark.s3)])
def object_backend(request, tmp_path):
    return make_backend(request.param, request, tmp_path)


def test_missing_key_errors(backend):
    with pytest.raises(FileNotFoundError):
        backend.read("no/such")
    with pytest.raises(FileNotFoundError):
        backend.size("no/such")
    with pytest.raises(FileNotFoundError):
        backend.age("no/such")
    assert backend.exists("no/such") is False
    backend.delete("no/such")  # no error
    assert list(backend.list("no")) == []


def test_write_read_size_and_buffers(backend):
    backend.write("a/b/c", b"hello")
    backend.write("a/parts", [b"he", bytearray(b"ll"), memoryview(b"o!")])
    assert backend.read("a/b/c") == b"hello" and backend.read("a/parts") == b"hello!"
    assert backend.size("a/b/c") == 5 and backend.exists("a/b/c")
    assert 0 <= backend.age("a/b/c") < 60
    backend.write("empty", b"", durable=True)
    assert backend.read("empty") == b"" and backend.size("empty") == 0


def test_read_range(backend):
    blob = bytes(range(256)) * 40  # 10240 bytes
    backend.write("chunks/ab/range", blob)
    for offset, length in ((0, 12), (100, 1000), (10000, 240), (10000, 500), (0, len(blob)), (5, 0)):
        assert backend.read_range("chunks/ab/range", offset, length) == blob[offset:offset + length], (offset, length)
    assert backend.read_range("chunks/ab/range", len(blob), 10) == b""
    assert backend.read_range("chunks/ab/range", len(blob) + 100, 10) == b""
    with pytest.raises(FileNotFoundError):
        backend.read_range("chunks/ab/none", 0, 10)
    with pytest.raises(FileNotFoundError):
        backend.read_range("chunks/ab/none", 0, 0)


def test_replace_is_atomic(backend):
    """Readers see the old or the new object, never a mixture or a part."""
    old, new = b"A" * (1 << 20), b"B" * (1 << 20) + b"tail"
    backend.write("obj", old)
    seen: set[bytes] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(backend.read("obj")[-8:])

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(6):
            backend.write("obj", new if i % 2 == 0 else old)
    finally:
        stop.set()
        t.join()
    assert seen <= {old[-8:], new[-8:]}
    assert backend.read("obj") == old


def test_exclusive_create(backend):
    backend.write("x", b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        backend.write("x", b"second", exclusive=True)
    assert backend.read("x") == b"first"
    backend.write("x", b"third")  # a plain write replaces
    assert backend.read("x") == b"third"


def test_exclusive_create_race_has_one_winner(backend):
    """Where the store decides exclusive writes atomically, exactly one of many racers wins."""
    assert backend.atomic_exclusive
    wins, losses = [], []
    barrier = threading.Barrier(6)

    def racer(i: int) -> None:
        barrier.wait()
        try:
            backend.write("race", f"writer {i}".encode(), exclusive=True)
            wins.append(i)
        except FileExistsError:
            losses.append(i)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 5
    assert backend.read("race") == f"writer {wins[0]}".encode()


def test_listing_is_per_folder_and_follows_deletes(backend):
    for key in ("chunks/aa/1", "chunks/ab/2", "chunksx/3", "vms/v/backups/c/m.json", "config.json"):
        backend.write(key, key.encode())
    assert sorted(backend.list("chunks")) == ["chunks/aa/1", "chunks/ab/2"]
    assert sorted(backend.list("chunks/aa")) == ["chunks/aa/1"]
    assert sorted(backend.list("")) == ["chunks/aa/1", "chunks/ab/2", "chunksx/3", "config.json", "vms/v/backups/c/m.json"]
    backend.delete("chunks/aa/1")
    backend.remove_folder("chunks/aa")
    assert sorted(backend.list("chunks")) == ["chunks/ab/2"]
    assert not backend.exists("chunks/aa/1")
    backend.sync()
    backend.delete_partial_writes()
    assert sorted(backend.list("chunks")) == ["chunks/ab/2"]


def test_many_keys_are_listed_past_one_page(backend):
    """S3 lists 1000 keys a page: listing must follow the pages."""
    n = 300 if isinstance(backend, (LocalBackend, MemoryBackend)) else 1100  # past one page where there are pages
    keys = {f"many/{i:05d}" for i in range(n)}
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: backend.write(k, b"."), keys))
    assert set(backend.list("many")) == keys


def test_bad_keys_are_refused(backend):
    for key in ("../x", "/abs", "a/../b"):
        with pytest.raises(ValueError):
            backend.write(key, b"")


def test_repository_logic_on_the_backend(backend):
    """The repository format on top of any backend: create, reopen, commit visibility, GC."""
    from test_repository import manifest

    repo = Repository.open(backend, create=True)
    assert Repository.open(backend, create=False).id == repo.id
    data = os.urandom(1000)
    cid = repo.chunk_id(data)
    assert repo.put_chunk(cid, data, 3) > 0 and repo.put_chunk(cid, data, 3) == 0
    m = manifest(repo)
    assert repo.manifests("vm1") == [] and repo.incomplete_backups("vm1") == ["cp1"]
    repo.commit(m)
    assert repo.manifests("vm1") == [m] and repo.vms() == ["vm1"]
    assert repo.remove_unreferenced()[0] == 1  # nothing references the chunk
    repo.delete_backup("vm1", "cp1")
    assert repo.manifests("vm1") == [] and repo.incomplete_backups("vm1") == []


# -- lock objects ------------------------------------------------------------------------


def test_shared_locks_coexist_exclusive_waits(object_backend):
    with object_lock(object_backend, "repository", what="R", shared=True):
        with object_lock(object_backend, "repository", what="R", shared=True):
            with pytest.raises(LockHeld, match="holds R"):
                with object_lock(object_backend, "repository", what="R", wait=0.2):
                    pass
    with object_lock(object_backend, "repository", what="R"):  # all released: exclusive is free
        with pytest.raises(LockHeld):
            with object_lock(object_backend, "repository", what="R", shared=True):
                pass
    assert list(object_backend.list("locks")) == []


def test_exclusive_lock_is_taken_when_the_holder_lets_go(object_backend):
    got = threading.Event()
    with object_lock(object_backend, "vm-a", what="VM a"):
        def waiter() -> None:
            with object_lock(object_backend, "vm-a", what="VM a", wait=20):
                got.set()

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.3)
        assert not got.is_set()
    t.join()
    assert got.is_set()


def test_other_hosts_lock_blocks_until_stale(object_backend, monkeypatch):
    """A lock of another host is respected while fresh, ignored and removed once stale."""
    body = json.dumps({"host": "other-host", "pid": 1, "exclusive": True, "what": "x"}).encode()
    object_backend.write("locks/vm-a/foreign", body)
    with pytest.raises(LockHeld, match="on other-host"):
        with object_lock(object_backend, "vm-a", what="VM a"):
            pass
    object_backend.delete("locks/vm-a/foreign")
    object_backend.write("locks/vm-b/junk", b"[not a lock")  # unreadable: held until stale
    with pytest.raises(LockHeld, match="an unknown host"):
        with object_lock(object_backend, "vm-b", what="VM b"):
            pass
    object_backend.write("locks/vm-a/foreign", body)
    if isinstance(object_backend, MemoryBackend):
        monkeypatch.setenv("NBDBACKUP_LOCK_STALE", "0.2")
        time.sleep(0.3)
    else:
        monkeypatch.setenv("NBDBACKUP_LOCK_STALE", "1")
        time.sleep(2.1)  # S3 times have one-second resolution
    for name in ("vm-a", "vm-b"):
        with object_lock(object_backend, name, what=name):
            pass
    assert list(object_backend.list("locks")) == []


def test_lock_of_a_dead_process_on_this_host_is_removed(object_backend):
    from nbdbackup.lock import host_id

    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    object_backend.write("locks/vm-a/dead", json.dumps({"host": host_id(), "pid": dead, "exclusive": True}).encode())
    with object_lock(object_backend, "vm-a", what="VM a"):
        pass
    assert list(object_backend.list("locks")) == []


def test_held_lock_is_refreshed_and_checked(object_backend, monkeypatch):
    monkeypatch.setenv("NBDBACKUP_LOCK_REFRESH", "0.1")
    monkeypatch.setenv("NBDBACKUP_LOCK_STALE", "30")
    with object_lock(object_backend, "repository", what="R", shared=True) as held:
        first = held.refreshed
        time.sleep(0.3)
        assert held.refreshed > first  # rewritten in the background
        held.check()
        held.refreshed -= 60  # as if refreshes had failed for a minute
        with pytest.raises(LockHeld, match="lost R"):
            held.check()


def test_chunk_files_are_handed_to_writeback_as_they_are_written(tmp_path):
    """LocalBackend.write starts each file's writeback at once (sync_file_range): the call reaches
    the kernel (a bad descriptor fails, a file succeeds), and written data reads back whole."""
    from nbdbackup.repository import backend as local

    b = LocalBackend(tmp_path)
    data = os.urandom(3 << 20)
    b.write("chunks/ab/x", [data[:5], memoryview(data)[5:]])
    assert local._sync_file_range is not None  # resolved by that write
    assert local._sync_file_range(-1) == -1  # the real call: EBADF, not the no-op fallback
    with open(tmp_path / "chunks/ab/x", "rb") as f:
        assert local._sync_file_range(f.fileno()) == 0
    assert b.read("chunks/ab/x") == data
    b.sync()
