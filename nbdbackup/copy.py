"""Copy backups from one repository to another (directory <-> S3, S3 -> S3): off-site copies.

Plan, then act.  For each backup chosen (oldest first) that the target lacks:

1. every chunk its indexes reference that the target does not have is read from
   the source, checked against its id (chunks.decode), and written to the target
   as the same bytes (no recompression), a bounded number in flight;
2. its indexes are written as the same bytes (their SHA-256 is in the manifest);
3. the target is synced, then the manifest is written: the copy exists only now.

An interrupted copy leaves chunks and indexes without a manifest: nothing that
looks like a backup (the next `copy` or backup reuses the chunks; garbage
collection frees them otherwise).  Checkpoint records are not copied: they
describe the source's chain in QEMU; a copy is for restoring.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .capture import CancelToken
from .errors import RepositoryDamaged, RepositoryUnusable, UsageError
from .records import Manifest
from .repository import Repository
from .repository.chunks import decode
from .restore import find_backup


@dataclass(frozen=True)
class CopyRequest:
    vm: str
    checkpoint: str | None = None  # None: the newest backup (unless every)
    every: bool = False
    workers: int = 8


@dataclass(frozen=True)
class CopiedBackup:
    checkpoint: str
    copied: bool  # False: the target had it already
    chunks_sent: int = 0
    chunks_present: int = 0
    bytes_sent: int = 0


@dataclass(frozen=True)
class CopyReport:
    vm: str
    target: str
    backups: tuple[CopiedBackup, ...]


def choose(source: Repository, req: CopyRequest) -> list[Manifest]:
    """The backups to copy, oldest first (side-effect free)."""
    if not req.every:
        return [find_backup(source, req.vm, req.checkpoint or "latest")]
    manifests = source.manifests(req.vm, strict=True)
    if not manifests:
        raise UsageError(f"there are no backups of {req.vm} in {source.backend.location}")
    return manifests


def copy_backups(source: Repository, target: Repository, req: CopyRequest, *, cancel: CancelToken,
                 progress: Callable[[int], None] = lambda n: None) -> CopyReport:
    """Copy the chosen backups; the caller holds the locks (source shared, target shared + VM)."""
    if source.id == target.id and source.backend.location == target.backend.location:
        raise UsageError("the source and the target are the same repository")
    if source.chunk_id.algorithm != target.chunk_id.algorithm:  # chunks are copied under their names
        raise RepositoryUnusable(
            f"{source.backend.location} names chunks by {source.chunk_id.algorithm} (format version {source.version}), "
            f"{target.backend.location} by {target.chunk_id.algorithm} (format version {target.version}): backups cannot be copied between them",
            hint="copy into a new, empty location: it is created with the source's format")
    done = []
    for m in choose(source, req):
        if target.manifest(m.vm, m.checkpoint) is not None:
            done.append(CopiedBackup(m.checkpoint, False))
            continue
        done.append(_copy_one(source, target, m, req.workers, cancel, progress))
    return CopyReport(req.vm, target.backend.location, tuple(done))


def _copy_one(source: Repository, target: Repository, m: Manifest, workers: int, cancel: CancelToken,
              progress: Callable[[int], None]) -> CopiedBackup:
    indexes: dict[str, bytes] = {}
    wanted: dict[bytes, None] = {}  # insertion-ordered set
    for d in m.disks:
        for e in source.read_index(m, d.id)[1]:  # checked against the manifest
            wanted.setdefault(e.chunk)
        indexes[d.id] = source.backend.read(f"{source._backup_key(m.vm, m.checkpoint)}/{d.id}.index")
    sent = present = nbytes = 0

    def one(cid: bytes) -> int:
        key = source._chunk_key(cid)
        if target.backend.exists(key):
            return -1
        blob = source.backend.read(key) if source.backend.exists(key) else None
        if blob is None:
            raise RepositoryDamaged(f"chunk {cid.hex()} is missing (backup {m.checkpoint} of {m.vm})")
        decode(blob, cid, f"backup {m.checkpoint} of {m.vm}", source.chunk_id)  # never send damage
        target.backend.write(key, blob)
        if target.backend.size(key) != len(blob):
            raise RepositoryDamaged(f"chunk {cid.hex()} arrived truncated in {target.backend.location}")
        return len(blob)

    with cf.ThreadPoolExecutor(max(1, workers), "copy") as pool:
        pending: set[cf.Future[int]] = set()
        ids: Sequence[bytes] = list(wanted)
        for cid in ids:
            cancel.check()
            if len(pending) >= 2 * workers:
                finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for f in finished:
                    n = f.result()
                    sent, present, nbytes = sent + (n >= 0), present + (n < 0), nbytes + max(n, 0)
                    progress(max(n, 0))
            pending.add(pool.submit(one, cid))
        for f in cf.as_completed(pending):
            n = f.result()
            sent, present, nbytes = sent + (n >= 0), present + (n < 0), nbytes + max(n, 0)
            progress(max(n, 0))
    cancel.check()
    base = target._backup_key(m.vm, m.checkpoint)
    for disk_id, blob in indexes.items():
        target.backend.write(f"{base}/{disk_id}.index", blob)
        target.read_index(m, disk_id)  # read back: the manifest's checksum holds in the target
    target.commit(m)
    return CopiedBackup(m.checkpoint, True, sent, present, nbytes)
