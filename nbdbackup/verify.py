"""Verify: read back everything the backups of a VM reference, and check it.

Reads go in the format's order (docs/FORMAT.md, Integrity): each manifest
(its seal), then each index (its checksum and its digest in the manifest),
then every chunk the indexes reference (its header, length and SHA-256).

    pass 1  manifests and indexes; per distinct chunk, the longest prefix any
            entry needs (memory grows with distinct chunks, not references)
    pass 2  each distinct chunk (or a random sample) read and decoded once,
            by a thread pool (zstd and hashlib release the GIL), at most
            2 x workers chunks in memory at a time
    pass 3  only if a chunk is bad: the indexes are read again to name every
            backup, disk and offset that uses it

Nothing here prints or exits; the CLI turns the report into text or JSON and
the exit status.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import CheckpointUnknown, RepositoryDamaged, UsageError
from .names import check_name
from .records import IndexEntry, Manifest
from .repository import Repository

# Offsets named per damaged chunk and disk; the rest are only counted.
FIRST_OFFSETS = 3
# check_chunk() appends "(<where>)" to its messages; the report names the uses itself.
_WHERE = "verify"


@dataclass(frozen=True)
class VerifyRequest:
    vm: str
    checkpoint: str | None = None  # None: every backup; "latest": the newest
    sample_percent: float | None = None  # None: every chunk
    workers: int = 4
    seed: int | None = None  # for the sample; None: unpredictable


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a backup.

    A manifest problem has no disk; an index problem has a disk but no chunk;
    a chunk problem names the chunk and where the disk uses it: offset is the
    first use, offsets the first few, uses how many entries of the disk use it.
    """

    error: str
    disk: str | None = None
    offset: int | None = None
    chunk: str | None = None  # chunk id, hexadecimal
    offsets: tuple[int, ...] = ()
    uses: int = 0


@dataclass(frozen=True)
class BackupCheck:
    checkpoint: str
    problems: tuple[Problem, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class VerifyReport:
    vm: str
    backups: tuple[BackupCheck, ...]
    chunks_referenced: int  # distinct chunks the checked indexes reference
    chunks_checked: int  # distinct chunks read (all of them unless sampled)
    bytes_read: int  # bytes of chunk content read and checked
    damaged_chunks: int
    sample_percent: float | None = None

    @property
    def damaged(self) -> tuple[str, ...]:
        """Checkpoint names of the damaged backups."""
        return tuple(b.checkpoint for b in self.backups if not b.ok)

    @property
    def error(self) -> RepositoryDamaged | None:
        """The run's error once the report is shown (exit 6), or None when nothing is damaged."""
        damaged = self.damaged
        if not damaged:
            return None
        verb = "is" if len(damaged) == 1 else "are"
        return RepositoryDamaged(f"{len(damaged)} of {len(self.backups)} backups of {self.vm} {verb} damaged: {', '.join(damaged)}")


@dataclass
class _Backup:
    checkpoint: str
    manifest: Manifest | None
    problems: list[Problem]
    readable_disks: list[str]
    gone: bool = False  # deleted (by prune or delete) while we read it: not reported


def run_verify(
    repo: Repository,
    req: VerifyRequest,
    *,
    on_start: Callable[[int], None] = lambda total: None,
    progress: Callable[[int], None] = lambda n: None,
) -> VerifyReport:
    """Check the backups req names; on_start gets the bytes of chunk content to read, progress each chunk's."""
    if req.workers < 1:
        raise UsageError(f"workers must be at least 1, not {req.workers}")
    if req.sample_percent is not None and not 0 < req.sample_percent <= 100:
        raise UsageError(f"a sample is a percentage above 0 and at most 100, not {req.sample_percent}")

    backups = _load_backups(repo, req.vm, req.checkpoint)

    # Pass 1: indexes.  needed[chunk] = the longest prefix of the chunk any entry reads.
    needed: dict[bytes, int] = {}
    for b in backups:
        for _disk, entries in _indexes(repo, b):
            for e in entries:
                end = e.chunk_offset + e.length
                if needed.get(e.chunk, -1) < end:
                    needed[e.chunk] = end

    # Pass 2: chunks, each once.
    chosen = sorted(needed)
    if req.sample_percent is not None and chosen:
        count = min(len(chosen), math.ceil(round(len(chosen) * req.sample_percent / 100, 6)))  # round: 7.000000000000001 is 7
        chosen = sorted(random.Random(req.seed).sample(chosen, count))
    on_start(sum(needed[c] for c in chosen))
    bad, lengths, bytes_read = _check_chunks(repo, chosen, req.workers, progress)
    short = {c: n for c, n in lengths.items() if n < needed[c]}

    # Pass 3: who uses the bad chunks.
    if bad or short:
        for b in backups:
            for disk, entries in _indexes(repo, b):
                b.problems.extend(_chunk_problems(disk, entries, bad, short))

    return VerifyReport(
        vm=req.vm,
        backups=tuple(BackupCheck(b.checkpoint, _in_disk_order(b)) for b in backups if not b.gone),
        chunks_referenced=len(needed),
        chunks_checked=len(chosen),
        bytes_read=bytes_read,
        damaged_chunks=len(bad) + len(short),
        sample_percent=req.sample_percent,
    )


def _in_disk_order(b: _Backup) -> tuple[Problem, ...]:
    """Manifest problems first, then by disk (as the manifest lists them) and offset."""
    order = {d.id: i for i, d in enumerate(b.manifest.disks)} if b.manifest else {}
    return tuple(sorted(b.problems, key=lambda p: (p.disk is not None, order.get(p.disk or "", len(order)), -1 if p.offset is None else p.offset)))


def _load_backups(repo: Repository, vm: str, checkpoint: str | None) -> list[_Backup]:
    """The backups to check: readable manifests oldest first, then damaged ones by name.

    'latest' is the newest readable manifest.  A damaged manifest might be
    newer, so damaged manifests are checked (and reported) with it.
    """
    check_name("VM", vm)
    if checkpoint is not None and checkpoint != "latest":
        check_name("checkpoint", checkpoint)
    names = repo.backup_names(vm)
    if checkpoint not in (None, "latest"):
        if checkpoint not in names:
            known = ", ".join(names[-5:]) or "none"
            raise CheckpointUnknown(f"VM {vm} has no backup at checkpoint {checkpoint!r}", hint=f"its backups: {known}")
        names = [checkpoint]
    good: list[_Backup] = []
    damaged: list[_Backup] = []
    for name in names:
        try:
            m = repo.manifest(vm, name)
        except RepositoryDamaged as exc:
            damaged.append(_Backup(name, None, [Problem(exc.message)], []))
            continue
        except OSError as exc:
            damaged.append(_Backup(name, None, [Problem(f"manifest of backup {name} cannot be read: {exc.strerror or exc}")], []))
            continue
        if m is None:  # deleted since it was listed
            continue
        if m.vm != vm or m.checkpoint != name:
            damaged.append(_Backup(name, None, [Problem(f"manifest of backup {name} describes backup {m.checkpoint} of VM {m.vm}")], []))
            continue
        good.append(_Backup(name, m, [], [d.id for d in m.disks]))
    good.sort(key=lambda b: (b.manifest.created if b.manifest else "", b.checkpoint))
    if checkpoint == "latest":
        good = good[-1:]
    if not good and not damaged:
        what = "no backups" if checkpoint is None else "no backup to verify"
        raise CheckpointUnknown(f"VM {vm} has {what}", hint="check the VM name and --repo")
    return good + damaged


def _indexes(repo: Repository, b: _Backup) -> Iterable[tuple[str, list[IndexEntry]]]:
    """(disk, entries) of each disk of b whose index reads back sound; the others become problems
    and are not read again (pass 3 reads only what pass 1 found sound)."""
    if b.manifest is None:
        return
    for disk in list(b.readable_disks):
        try:
            _size, entries = repo.read_index(b.manifest, disk)
        except RepositoryDamaged as exc:
            error = exc.message
        except OSError as exc:
            error = f"index of backup {b.checkpoint}, disk {disk} cannot be read: {exc.strerror or exc}"
        else:
            yield disk, entries
            continue
        if _deleted(repo, b.manifest.vm, b.checkpoint):  # a deletion removes the manifest before the indexes
            b.gone = True
            b.readable_disks.clear()
            return
        b.problems.append(Problem(error, disk=disk))
        b.readable_disks.remove(disk)


def _deleted(repo: Repository, vm: str, checkpoint: str) -> bool:
    try:
        return repo.manifest(vm, checkpoint) is None
    except (RepositoryDamaged, OSError):
        return False


def _check_chunks(repo: Repository, chunk_ids: list[bytes], workers: int,
                  progress: Callable[[int], None]) -> tuple[dict[bytes, str], dict[bytes, int], int]:
    """Read and check each chunk once: ({bad chunk: error}, {good chunk: length}, bytes read)."""
    bad: dict[bytes, str] = {}
    lengths: dict[bytes, int] = {}
    total = 0

    def check(cid: bytes) -> tuple[bytes, int, str | None]:
        try:
            return cid, repo.check_chunk(cid, _WHERE), None
        except RepositoryDamaged as exc:
            return cid, 0, exc.message.removesuffix(f" ({_WHERE})")
        except OSError as exc:
            return cid, 0, f"chunk {cid.hex()} cannot be read: {exc.strerror or exc}"

    def collect(done: Iterable[cf.Future]) -> None:
        nonlocal total
        for fut in done:
            cid, length, error = fut.result()
            if error is None:
                lengths[cid] = length
                total += length
                progress(length)
            else:
                bad[cid] = error

    with cf.ThreadPoolExecutor(workers, "verify") as pool:
        inflight: set[cf.Future] = set()
        for cid in chunk_ids:
            while len(inflight) >= 2 * workers:
                done, inflight = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
                collect(done)
            inflight.add(pool.submit(check, cid))
        collect(cf.as_completed(inflight))
    return bad, lengths, total


def _chunk_problems(disk: str, entries: list[IndexEntry], bad: dict[bytes, str], short: dict[bytes, int]) -> list[Problem]:
    """One problem per bad chunk this disk uses, naming its first few offsets."""
    uses: dict[tuple[bytes, str], list[int]] = {}
    counts: dict[tuple[bytes, str], int] = {}
    for e in entries:
        if e.chunk in bad:
            error = bad[e.chunk]
        elif e.chunk in short and e.chunk_offset + e.length > short[e.chunk]:
            error = f"chunk {e.chunk.hex()} holds {short[e.chunk]} bytes, fewer than the index entry needs"
        else:
            continue
        key = (e.chunk, error)
        counts[key] = counts.get(key, 0) + 1
        offsets = uses.setdefault(key, [])
        if len(offsets) < FIRST_OFFSETS:
            offsets.append(e.offset)
    found = [Problem(error, disk=disk, offset=offsets[0], chunk=cid.hex(), offsets=tuple(offsets), uses=counts[(cid, error)])
             for (cid, error), offsets in uses.items()]
    return sorted(found, key=lambda p: p.offsets)
