"""verify: every damaged chunk, index and manifest is found and blamed on the right backups.

The first tests build small repositories with the Repository API (no QEMU);
the rest damage copies of real backups of a two-disk QEMU VM.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import cli
import pytest
from harness import TestVM, missing_programs

from nbdbackup.errors import CheckpointUnknown, RepositoryDamaged
from nbdbackup.records import DiskBackup, IndexEntry, Manifest
from nbdbackup.repository import Repository
from nbdbackup.repository import index as index_codec
from nbdbackup.repository.chunks import HEADER_SIZE
from nbdbackup.verify import FIRST_OFFSETS, VerifyRequest, run_verify

KiB, MiB = 1024, 1024 * 1024
DISK = 64 * MiB


# -- a repository made by hand -------------------------------------------------


def put(repo: Repository, data: bytes) -> bytes:
    cid = repo.chunk_id(data)
    repo.put_chunk(cid, data, 3)
    return cid


def commit(repo: Repository, cp: str, disks: dict[str, list[IndexEntry]], *, created: str | None = None) -> None:
    recorded = tuple(DiskBackup(d, DISK, repo.write_index("vm1", cp, d, DISK, entries), sum(e.length for e in entries), 0, True)
                     for d, entries in disks.items())
    repo.commit(Manifest(vm="vm1", checkpoint=cp, kind="full", since=None, created=created or f"2026-01-01T00:00:0{cp[-1]}.000Z",
                         chain="c" * 32, disks=recorded))


def chunk_path(root: Path, cid: bytes | str) -> Path:
    h = cid if isinstance(cid, str) else cid.hex()
    return root / "chunks" / h[:2] / h


def flip_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[HEADER_SIZE + (len(blob) - HEADER_SIZE) // 2] ^= 0x40
    path.write_bytes(bytes(blob))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def by_checkpoint(report) -> dict[str, tuple]:
    return {b.checkpoint: b.problems for b in report.backups}


@pytest.fixture
def shared(tmp_path):
    """cp1..cp3, each using chunk S (cp1 five times on vda), and one chunk of its own on vdb."""
    root = tmp_path / "r"
    repo = Repository.open(root, create=True)
    s = put(repo, b"S" * 70000)
    own = {}
    for i in (1, 2, 3):
        own[i] = put(repo, bytes([i]) * 5000)
        uses = 5 if i == 1 else 1
        vda = [IndexEntry(n * MiB + i * 4096, 1000, s, 10 * n) for n in range(uses)]
        commit(repo, f"cp{i}", {"vda": vda, "vdb": [IndexEntry(0, 5000, own[i])]})
    return root, repo, s, own


def test_a_shared_chunk_is_read_once_and_blamed_on_every_backup_using_it(shared, monkeypatch):
    root, repo, s, own = shared
    reads = defaultdict(int)
    check_chunk = repo.check_chunk

    def counting(cid, where):
        reads[cid] += 1
        return check_chunk(cid, where)

    monkeypatch.setattr(repo, "check_chunk", counting)
    healthy = run_verify(repo, VerifyRequest("vm1"))
    assert [b.ok for b in healthy.backups] == [True, True, True]
    assert (healthy.chunks_referenced, healthy.chunks_checked, healthy.damaged_chunks) == (4, 4, 0)
    assert healthy.bytes_read == 70000 + 3 * 5000
    assert dict(reads) == {s: 1, own[1]: 1, own[2]: 1, own[3]: 1}

    flip_byte(chunk_path(root, s))
    report = run_verify(repo, VerifyRequest("vm1", workers=2))
    assert report.damaged == ("cp1", "cp2", "cp3") and report.damaged_chunks == 1
    problems = by_checkpoint(report)
    [p1] = problems["cp1"]
    assert (p1.disk, p1.chunk, p1.uses) == ("vda", s.hex(), 5)
    assert p1.offsets == tuple(n * MiB + 4096 for n in range(FIRST_OFFSETS)) and p1.offset == 4096
    assert s.hex() in p1.error and "(verify)" not in p1.error
    for i in (2, 3):
        [p] = problems[f"cp{i}"]
        assert (p.disk, p.offset, p.offsets, p.uses) == ("vda", i * 4096, (i * 4096,), 1)


def test_a_missing_chunk_fails_only_the_backups_using_it(shared):
    root, repo, s, own = shared
    chunk_path(root, own[2]).unlink()
    report = run_verify(repo, VerifyRequest("vm1"))
    assert report.damaged == ("cp2",)
    [p] = by_checkpoint(report)["cp2"]
    assert (p.disk, p.offset, p.chunk) == ("vdb", 0, own[2].hex()) and "missing" in p.error


def test_an_entry_reaching_past_the_end_of_its_chunk(tmp_path):
    repo = Repository.open(tmp_path / "r", create=True)
    c = put(repo, b"x" * 1000)
    commit(repo, "cp1", {"vda": [IndexEntry(0, 1000, c), IndexEntry(MiB, 600, c, 400)]})  # 400 + 600 = 1000: fits
    commit(repo, "cp2", {"vda": [IndexEntry(0, 1000, c), IndexEntry(MiB, 600, c, 500)]})  # 500 + 600 > 1000
    report = run_verify(repo, VerifyRequest("vm1"))
    assert report.damaged == ("cp2",)
    [p] = by_checkpoint(report)["cp2"]
    assert (p.disk, p.offset, p.chunk) == ("vda", MiB, c.hex()) and "1000 bytes" in p.error


def test_a_sample_reads_that_share_of_the_chunks_and_at_least_one(tmp_path):
    repo = Repository.open(tmp_path / "r", create=True)
    commit(repo, "cp1", {"vda": [IndexEntry(n * MiB, 100, put(repo, bytes([n]) * 100)) for n in range(20)]})
    for percent, expected in ((25, 5), (33, 7), (0.1, 1), (100, 20)):
        report = run_verify(repo, VerifyRequest("vm1", sample_percent=percent))
        assert (report.chunks_referenced, report.chunks_checked, report.sample_percent) == (20, expected, percent)
    first = [run_verify(repo, VerifyRequest("vm1", sample_percent=50, seed=7)).bytes_read for _ in range(2)]
    assert first[0] == first[1] == 1000


def test_damaged_manifests_are_reported_by_folder_name(shared):
    root, repo, s, own = shared
    truncate(root / "vms/vm1/backups/cp3/manifest.json")
    report = run_verify(repo, VerifyRequest("vm1"))
    assert [(b.checkpoint, b.ok) for b in report.backups] == [("cp1", True), ("cp2", True), ("cp3", False)]
    [p] = by_checkpoint(report)["cp3"]
    assert p.disk is None and "manifest of backup cp3" in p.error
    # The newest readable backup is cp2; cp3 might be newer, so it is reported with it.
    latest = run_verify(repo, VerifyRequest("vm1", checkpoint="latest"))
    assert [(b.checkpoint, b.ok) for b in latest.backups] == [("cp2", True), ("cp3", False)]
    only = run_verify(repo, VerifyRequest("vm1", checkpoint="cp1"))
    assert [(b.checkpoint, b.ok) for b in only.backups] == [("cp1", True)]


def test_a_backup_deleted_while_it_is_verified_is_not_reported_as_damage(shared, monkeypatch):
    _root, repo, _s, _own = shared
    read_index = repo.read_index

    def deleting(m, disk):
        if m.checkpoint == "cp2":
            repo.delete_backup("vm1", "cp2")  # as a prune would, between manifest and index
        return read_index(m, disk)

    monkeypatch.setattr(repo, "read_index", deleting)
    report = run_verify(repo, VerifyRequest("vm1"))
    assert [(b.checkpoint, b.ok) for b in report.backups] == [("cp1", True), ("cp3", True)]


def test_unknown_backups_are_refused(shared, tmp_path):
    _root, repo, _s, _own = shared
    with pytest.raises(CheckpointUnknown, match="nope"):
        run_verify(repo, VerifyRequest("vm1", checkpoint="nope"))
    with pytest.raises(CheckpointUnknown, match="no backups"):
        run_verify(repo, VerifyRequest("vm2"))


def test_cli_on_a_hand_made_repository(shared):
    root, repo, s, own = shared
    ok = cli.run(root, "verify", "vm1")
    assert ok.stdout.splitlines()[:3] == ["cp1  ok", "cp2  ok", "cp3  ok"]
    assert "3 backups of vm1 checked, 0 damaged; 4 chunks checked" in ok.stdout
    chunk_path(root, own[3]).unlink()
    bad = cli.run(root, "verify", "vm1", expect=RepositoryDamaged.exit_code)
    assert f"cp3  DAMAGED  disk vdb at offset 0: chunk {own[3].hex()} is missing" in bad.stdout.splitlines()
    assert "nbdbackup: error: 1 of 3 backups of vm1 is damaged: cp3" in bad.stderr
    flip_byte(chunk_path(root, s))
    worse = cli.run(root, "verify", "vm1", expect=RepositoryDamaged.exit_code)
    assert f"cp1  DAMAGED  disk vda at offset 4096: chunk {s.hex()}" in worse.stdout
    assert f"(also at {MiB + 4096}, {2 * MiB + 4096} and 2 more)" in worse.stdout.splitlines()[0]
    assert worse.stdout.splitlines()[-1].endswith("2 damaged chunks")
    assert "nbdbackup: error: 3 of 3 backups of vm1 are damaged: cp1, cp2, cp3" in worse.stderr
    cli.run(root, "verify", "vm1", "--sample", "0", expect=2)
    cli.run(root, "verify", "vm1", "--checkpoint", "../x", expect=2)


# -- real backups of a QEMU VM ---------------------------------------------------


SIZES = {"vda": 8 * MiB, "vdb": 6 * MiB}
STEPS = [
    [("vda", 0, 1 * MiB, 0x11), ("vda", 4 * MiB + 512 * KiB, 512 * KiB, 0x12), ("vdb", 1 * MiB, 256 * KiB, 0x21)],
    [("vda", 0, 64 * KiB, 0x13), ("vdb", 2 * MiB, 64 * KiB, 0x22)],
    [("vda", 5 * MiB + 128 * KiB, 64 * KiB, 0x14), ("vdb", 3 * MiB, 64 * KiB, 0x23)],
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A repository holding three backups (cp0 full, cp1 and cp2 incremental) of a two-disk VM."""
    missing = missing_programs()
    if missing:
        pytest.fail(f"QEMU tests need {', '.join(missing)} on PATH", pytrace=False)
    base = tmp_path_factory.mktemp("verify")
    repo = base / "repo"
    vm = TestVM(base / "vm1", SIZES, name="vm1")
    try:
        vm.start()
        for i, step in enumerate(STEPS):
            for disk, offset, length, pattern in step:
                vm.write(disk, offset, length, pattern)
            cli.run(repo, "full" if i == 0 else "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", f"cp{i}")
    finally:
        vm.cleanup()
    return repo


@pytest.fixture
def repo(pristine, tmp_path):
    """A copy of the pristine repository, free to damage."""
    copy = tmp_path / "repo"
    shutil.copytree(pristine, copy)
    return copy


def users(repo: Path) -> dict[str, dict[tuple[str, str], list[int]]]:
    """chunk id -> {(checkpoint, disk): offsets where the disk uses it}, from the index files."""
    found: dict[str, dict[tuple[str, str], list[int]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted((repo / "vms/vm1/backups").glob("*/*.index")):
        _size, entries = index_codec.decode(path.read_bytes(), str(path))
        for e in entries:
            found[e.chunk.hex()][(path.parent.name, path.stem)].append(e.offset)
    return found


def verify(repo: Path, *args: str, expect: int = 0) -> dict:
    return json.loads(cli.run(repo, "verify", "vm1", "--json", *args, expect=expect).stdout)


def damaged(report: dict) -> dict[str, list[dict]]:
    return {b["checkpoint"]: b["problems"] for b in report["backups"] if not b["ok"]}


def assert_blamed(report: dict, chunk: str, used: dict[tuple[str, str], list[int]], words: str) -> None:
    """Exactly the backups and disks using chunk are damaged, at the offsets where they use it."""
    expected = {cp: {disk: offs for (c, disk), offs in used.items() if c == cp} for cp, _ in used}
    assert set(damaged(report)) == set(expected)
    for cp, problems in damaged(report).items():
        assert {p["disk"]: p["offsets"] for p in problems} == {d: offs[:FIRST_OFFSETS] for d, offs in expected[cp].items()}
        for p in problems:
            assert p["chunk"] == chunk and p["offset"] == p["offsets"][0] and words in p["error"]


@pytest.mark.qemu
def test_healthy_backups_verify_clean_in_full_and_as_a_sample(repo):
    chunks = users(repo)
    report = verify(repo)
    assert [(b["checkpoint"], b["ok"], b["problems"]) for b in report["backups"]] == [(f"cp{i}", True, []) for i in range(3)]
    assert report["chunks_checked"] == report["chunks_referenced"] == len(chunks) >= 5
    assert report["sample_percent"] is None and report["damaged"] == 0 and report["bytes_read"] > 0
    text = cli.run(repo, "verify", "vm1").stdout.splitlines()
    assert text[:3] == ["cp0  ok", "cp1  ok", "cp2  ok"]
    assert text[3].startswith("3 backups of vm1 checked, 0 damaged;")

    sample = verify(repo, "--sample", "50")
    assert sample["chunks_checked"] == math.ceil(len(chunks) / 2) and sample["sample_percent"] == 50
    assert "(a random 50% sample of" in cli.run(repo, "verify", "vm1", "--sample", "50").stdout
    assert [b["checkpoint"] for b in verify(repo, "--checkpoint", "latest")["backups"]] == ["cp2"]


@pytest.mark.qemu
def test_a_flipped_byte_in_a_chunk_of_the_newest_backup_fails_only_that_backup(repo):
    newest = {c: u for c, u in users(repo).items() if {cp for cp, _ in u} == {"cp2"}}
    chunk, used = sorted(newest.items())[0]
    flip_byte(chunk_path(repo, chunk))
    report = verify(repo, expect=6)
    assert_blamed(report, chunk, used, chunk)
    assert [b["ok"] for b in report["backups"]] == [True, True, False] and report["damaged_chunks"] == 1

    proc = cli.run(repo, "verify", "vm1", expect=6)
    ((_cp, disk), offsets), *_ = sorted(used.items())
    assert f"cp2  DAMAGED  disk {disk} at offset {offsets[0]}: chunk {chunk}" in proc.stdout
    assert proc.stdout.splitlines()[:2] == ["cp0  ok", "cp1  ok"]
    assert "nbdbackup: error: 1 of 3 backups of vm1 is damaged: cp2" in proc.stderr


@pytest.mark.qemu
def test_a_flipped_byte_in_a_chunk_every_backup_uses_fails_them_all(repo):
    everywhere = {c: u for c, u in users(repo).items() if {cp for cp, _ in u} == {"cp0", "cp1", "cp2"}}
    chunk, used = sorted(everywhere.items())[0]
    flip_byte(chunk_path(repo, chunk))
    report = verify(repo, expect=6)
    assert_blamed(report, chunk, used, chunk)
    proc = cli.run(repo, "verify", "vm1", expect=6)
    assert "3 of 3 backups of vm1 are damaged: cp0, cp1, cp2" in proc.stderr


@pytest.mark.qemu
def test_a_missing_chunk_file_fails_the_backups_using_it(repo):
    chunk, used = sorted(users(repo).items(), key=lambda kv: (-len(kv[1]), kv[0]))[0]
    chunk_path(repo, chunk).unlink()
    report = verify(repo, expect=6)
    assert_blamed(report, chunk, used, "missing")


@pytest.mark.qemu
def test_a_truncated_index_fails_its_backup_and_disk(repo):
    truncate(repo / "vms/vm1/backups/cp1/vdb.index")
    report = verify(repo, expect=6)
    assert list(damaged(report)) == ["cp1"]
    [p] = damaged(report)["cp1"]
    assert p["disk"] == "vdb" and p["offset"] is None and "index of backup cp1, disk vdb" in p["error"]
    proc = cli.run(repo, "verify", "vm1", expect=6)
    assert "cp1  DAMAGED  disk vdb: index of backup cp1, disk vdb does not match its manifest" in proc.stdout


@pytest.mark.qemu
def test_a_truncated_manifest_fails_its_backup_by_name(repo):
    truncate(repo / "vms/vm1/backups/cp1/manifest.json")
    report = verify(repo, expect=6)
    assert [(b["checkpoint"], b["ok"]) for b in report["backups"]] == [("cp0", True), ("cp2", True), ("cp1", False)]
    [p] = damaged(report)["cp1"]
    assert p["disk"] is None and "manifest of backup cp1" in p["error"]
    proc = cli.run(repo, "verify", "vm1", "--checkpoint", "cp1", expect=6)
    assert proc.stdout.startswith("cp1  DAMAGED  manifest of backup cp1")
    assert "1 of 1 backups of vm1 is damaged: cp1" in proc.stderr
