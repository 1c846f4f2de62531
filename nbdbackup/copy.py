"""Copy backups from one repository to another (directory <-> S3, S3 -> S3): off-site copies.

Plan, then act.  For each backup chosen (oldest first) that the target lacks:

1. every chunk its indexes reference that the target does not have is read from
   the source, checked against its id (chunks.decode), and written to the target
   as the same bytes (no recompression) where its chunk file is valid there, a
   bounded number in flight;
2. its indexes are written as the same bytes (their SHA-256 is in the manifest);
3. the target is synced, then the manifest is written: the copy exists only now.

Between repositories whose chunk ids differ (an encrypted one and any other:
each has its own chunk-id key; or version 1 and 2), a chunk is stored in the
target under the id the target computes from its content, and the indexes
are rewritten with those ids (the manifest then names the new indexes'
checksums).  Its chunk file is the same bytes too, unless one of the two
repositories stores pieces' hashes in its chunk files (version 3): then the
chunk is encoded for the target (compressed at zstd level 1, the default).
Through the repositories' object layer, every object is
decrypted with the source's key and encrypted with the target's: a copy
re-encrypts for the target's key.

An interrupted copy leaves chunks and indexes without a manifest: nothing that
looks like a backup (the next `copy` or backup reuses the chunks; garbage
collection frees them otherwise).  Checkpoint records are not copied: they
describe the source's chain in QEMU; a copy is for restoring.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .capture import CancelToken, Tuning
from .errors import RepositoryDamaged, UsageError
from .records import Manifest
from .repository import Repository
from .repository.chunks import decode
from .repository.crypto import OVERHEAD
from .restore import find_backup

PROBE = b"nbdbackup copy: do the two repositories name chunks alike?"


@dataclass(frozen=True)
class CopyRequest:
    vm: str
    checkpoint: str | None = None  # None: the newest backup (unless every)
    every: bool = False
    workers: int = 8
    target: str = ""  # the repository to copy to: a directory or s3://BUCKET/PREFIX


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
    done = []
    for m in choose(source, req):
        if target.manifest(m.vm, m.checkpoint) is not None:
            done.append(CopiedBackup(m.checkpoint, False))
            continue
        done.append(_copy_one(source, target, m, req.workers, cancel, progress))
    return CopyReport(req.vm, target.backend.location, tuple(done))


def _copy_one(source: Repository, target: Repository, m: Manifest, workers: int, cancel: CancelToken,
              progress: Callable[[int], None]) -> CopiedBackup:
    same_ids = source.chunk_id(PROBE) == target.chunk_id(PROBE)
    # a chunk file names no id, but a version 3 one holds its pieces' hashes, which depend on the ids' keys
    same_files = same_ids or not (source.chunk_id.piece or target.chunk_id.piece)
    indexes: dict[str, tuple[int, list]] = {}
    wanted: dict[bytes, None] = {}  # insertion-ordered set
    for d in m.disks:
        size, entries = source.read_index(m, d.id)  # checked against the manifest
        indexes[d.id] = (size, entries)
        for e in entries:
            wanted.setdefault(e.chunk)
    renamed: dict[bytes, bytes] = {}  # source id -> target id (when the ids differ)
    sent = present = nbytes = 0
    where = f"backup {m.checkpoint} of {m.vm}"

    def one(cid: bytes) -> int:
        key = source._chunk_key(cid)
        if same_ids and target.backend.exists(key):
            return -1
        try:
            blob = source.backend.read(key)
        except FileNotFoundError:
            raise RepositoryDamaged(f"chunk {cid.hex()} is missing ({where})") from None
        except RepositoryDamaged as exc:
            raise RepositoryDamaged(f"chunk {cid.hex()} is damaged ({where}): {exc}") from None
        data = decode(blob, cid, where, source.chunk_id)  # never send damage
        new, hashes = (cid, ()) if same_ids else target.chunk_id.with_pieces(data)
        renamed[cid] = new
        new_key = target._chunk_key(new)
        if not same_ids and target.backend.exists(new_key):
            return -1
        if not same_files:
            return target.put_chunk(new, data, Tuning.level, hashes) or -1
        target.backend.write(new_key, blob)
        if target.backend.size(new_key) != len(blob) + (OVERHEAD if target.encrypted else 0):
            raise RepositoryDamaged(f"chunk {new.hex()} arrived truncated in {target.backend.location}")
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
    disks = []
    for d in m.disks:
        size, entries = indexes[d.id]
        if not same_ids:
            entries = [replace(e, chunk=renamed[e.chunk]) for e in entries]
        digest = target.write_index(m.vm, m.checkpoint, d.id, size, entries)
        disks.append(replace(d, index_sha256=digest))
    copied = replace(m, disks=tuple(disks))
    for d in copied.disks:
        target.read_index(copied, d.id)  # read back: the manifest's checksum holds in the target
    target.commit(copied)
    return CopiedBackup(m.checkpoint, True, sent, present, nbytes)
