"""Restore: replay one backup point into new images through writable NBD exports.

Every backup's index is complete, so one pass over one index restores a disk.
The target images are new (all zero), so only non-zero data is written and
the result stays sparse.  Each chunk is checked against its id as it is
read; nothing is renamed into place unless every disk was restored.  Raw
images are written by the workers themselves (rawimage.py); qcow2 images
through qemu-storage-daemon's NBD exports.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import logging
import os
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .capture import CancelToken, Tuning
from .errors import CheckpointUnknown, NbdIOError, RepositoryDamaged, RestoreTargetError, UsageError
from .inuse import in_use
from .nbdio import NbdEndpoint, data_runs
from .pipeline import Pipeline
from .rawimage import ALIGN, RawImage, aligned_buffer, create_raw, direct_io_works
from .records import IndexEntry, Manifest
from .repository import Repository
from .storage_daemon import StorageDaemon, TargetImage, create_image

log = logging.getLogger(__name__)

CHUNK_CACHE = 4  # decompressed chunks kept per writer thread
DOWNLOADS = 8  # chunk downloads in flight or done ahead of the writers (repositories that are not directories)
FORMATS = ("qcow2", "raw")


@dataclass(frozen=True)
class RestoreRequest:
    vm: str
    checkpoint: str
    output: Path
    format: str = "qcow2"
    disks: tuple[str, ...] = ()
    force: bool = False


@dataclass(frozen=True)
class RestoredImage:
    disk: str
    path: Path
    format: str


def find_backup(repo: Repository, vm: str, checkpoint: str) -> Manifest:
    if checkpoint != "latest":
        found = repo.manifest(vm, checkpoint)  # a damaged manifest raises RepositoryDamaged (exit 6)
        if found is not None:
            return found
    # "latest" must be the newest backup: with a damaged manifest about, which one that is is unknown.
    try:
        manifests = repo.manifests(vm, strict=checkpoint == "latest")
    except RepositoryDamaged as exc:
        raise RepositoryDamaged(f"cannot tell which backup is the latest: {exc}", hint="name the backup with --to CHECKPOINT; run `nbdbackup verify`") from None
    if checkpoint == "latest" and manifests:
        return manifests[-1]
    for m in manifests:
        if m.checkpoint == checkpoint:
            return m
    known = ", ".join(m.checkpoint for m in manifests[-5:]) or "none"
    raise CheckpointUnknown(f"VM {vm} has no backup at checkpoint {checkpoint!r}", hint=f"newest backups: {known}")


def run_restore(
    repo: Repository,
    req: RestoreRequest,
    *,
    socket_dir: Path,
    tuning: Tuning = Tuning(),
    cancel: CancelToken = CancelToken(),
    progress: Callable[[int], None] = lambda n: None,
    on_start: Callable[[int], None] = lambda total: None,
) -> list[RestoredImage]:
    if req.format not in FORMATS:
        raise UsageError(f"unknown format {req.format!r}", hint="use qcow2 or raw")
    m = find_backup(repo, req.vm, req.checkpoint)
    chosen = [d for d in m.disks if not req.disks or d.id in req.disks]
    unknown = set(req.disks) - {d.id for d in m.disks}
    if unknown:
        raise UsageError(f"backup {m.checkpoint} has no disk {', '.join(sorted(unknown))}", hint=f"its disks: {', '.join(d.id for d in m.disks)}")
    indexes = {d.id: repo.read_index(m, d.id)[1] for d in chosen}

    out = req.output
    finals = {d.id: out / f"{d.id}.{req.format}" for d in chosen}
    for path in finals.values():
        if (path.exists() or path.is_symlink()) and not req.force:
            raise RestoreTargetError(f"{path} exists", hint="choose another --output or pass --force to overwrite")
        refuse_if_in_use(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RestoreTargetError(f"cannot create output directory {out}: {exc.strerror}") from None

    tag = secrets.token_hex(3)
    images = [TargetImage(d.id, out / f".{d.id}.{req.format}.partial-{tag}", req.format, d.size) for d in chosen]
    try:
        for img in images:
            create_raw(img.path, img.size) if img.format == "raw" else create_image(img)
        images = [dataclasses.replace(img, direct=direct_io_works(img.path)) for img in images]
        on_start(sum(e.length for entries in indexes.values() for e in entries))
        if req.format == "raw":  # a plain file: the workers write it themselves
            for img in images:
                with RawImage(img.path, f"disk {img.export}") as raw:
                    _write_disk(repo, m, img.export, indexes[img.export], raw, tuning, cancel, progress)
        else:
            with StorageDaemon(images, socket_dir) as daemon:
                for img in images:
                    _write_disk(repo, m, img.export, indexes[img.export], daemon.socket, tuning, cancel, progress)
        for img in images:  # again: a VM may have been started on a target meanwhile
            refuse_if_in_use(finals[img.export])
        for img in images:
            os.replace(img.path, finals[img.export])
    finally:
        for img in images:
            img.path.unlink(missing_ok=True)
    return [RestoredImage(d.id, finals[d.id], req.format) for d in chosen]


def refuse_if_in_use(path: Path) -> None:
    """--force replaces only files that no running process writes (a VM's image above all:
    QEMU would go on writing the replaced file, and the restored image would silently diverge)."""
    usage = in_use(path)
    if usage is not None:
        raise RestoreTargetError(f"will not replace {usage.describe()}",
                                 hint="shut the VM (or the process) down first, or restore to another --output")


def _batches(entries: Sequence[IndexEntry], limit: int) -> Iterator[list[IndexEntry]]:
    """Consecutive entries, at most `limit` bytes a batch (entries sharing a chunk stay together)."""
    batch: list[IndexEntry] = []
    size = 0
    for e in entries:
        if batch and size + e.length > limit and e.chunk != batch[-1].chunk:
            yield batch
            batch, size = [], 0
        batch.append(e)
        size += e.length
    if batch:
        yield batch


def _write_disk(repo: Repository, m: Manifest, disk_id: str, entries: list[IndexEntry], target: RawImage | Path,
                tuning: Tuning, cancel: CancelToken, progress: Callable[[int], None]) -> None:
    """Write one disk's entries: into a RawImage, or through NBD connections to the export at socket target."""
    ahead: dict[bytes, cf.Future[bytes | memoryview]] = {}  # chunk downloads started when their batch was queued
    raw = target if isinstance(target, RawImage) else None

    def chunk(cid: bytes, offset: int) -> memoryview:
        """The decoded chunk, in one of this thread's reused page-aligned buffers.  A small cache:
        after incrementals, neighbouring entries often share a chunk."""
        local = pipe.local()
        cache: OrderedDict[bytes, tuple[memoryview, memoryview]] = local.__dict__.setdefault("chunks", OrderedDict())
        fut = ahead.pop(cid, None)  # taken even on a cache hit: what is in `ahead` is bounded
        if cid in cache:
            cache.move_to_end(cid)
            return cache[cid][1]
        where = f"backup {m.checkpoint}, disk {disk_id}, offset {offset}"
        blob = fut.result() if fut is not None else repo.fetch_chunk(cid, where)
        spare = cache.popitem(last=False)[1][0] if len(cache) >= CHUNK_CACHE else None

        def buffer(length: int) -> memoryview:
            return spare if spare is not None and len(spare) >= length else aligned_buffer(max(length, tuning.chunk_size))

        data = repo.decode_chunk_into(blob, cid, where, buffer)
        buf = memoryview(data.obj)  # the whole buffer the view lies in
        cache[cid] = (buf, data)
        return data

    def work(batch: list[IndexEntry]) -> int:
        if cancel.signum is not None:
            return 0
        for e in batch:
            data = chunk(e.chunk, e.offset)[e.chunk_offset:e.chunk_offset + e.length]
            if len(data) != e.length:
                raise RepositoryDamaged(f"chunk {e.chunk.hex()} is shorter than its index says (backup {m.checkpoint}, disk {disk_id}, offset {e.offset})")
            runs = [(start, stop) for start, stop, zero in data_runs(e.offset, data) if not zero]
            if raw is not None:
                for start, stop in runs:  # data[0] sits at e.chunk_offset in an aligned buffer
                    raw.write(data[start - e.offset:stop - e.offset], start,
                              memory_aligned=(e.chunk_offset + start - e.offset) % ALIGN == 0)
                continue
            ep = pipe.endpoint()
            try:
                for start, stop in runs:
                    ep.pwrite(data[start - e.offset:stop - e.offset], start)
            except NbdIOError as exc:
                raise RestoreTargetError(f"writing disk {disk_id}: {exc}") from None
        return sum(e.length for e in batch)

    def connect() -> NbdEndpoint:  # a worker's own connection (qcow2 targets: raw images take no NBD)
        assert not isinstance(target, RawImage)
        return NbdEndpoint(target, disk_id, writable=True)

    # Downloads from a remote store (S3) run ahead: a batch's chunks are requested when the batch is
    # queued (at most DOWNLOADS not yet taken by a writer: memory), while the writers decompress and write.
    remote = repo.root is None
    with Pipeline(tuning.workers, tuning.depth, connect, lambda written, _: progress(written), "restore") as pipe, \
            (cf.ThreadPoolExecutor(DOWNLOADS, "download") if remote else contextlib.nullcontext()) as downloads:
        for batch in _batches(entries, tuning.chunk_size):
            cancel.check()
            if downloads is not None:
                for e in batch:
                    if e.chunk not in ahead and len(ahead) < DOWNLOADS:  # else its writer downloads it
                        ahead[e.chunk] = downloads.submit(repo.fetch_chunk, e.chunk, f"backup {m.checkpoint}, disk {disk_id}, offset {e.offset}")
            pipe.submit(work, batch, None)
        pipe.drain()
        cancel.check()
        if raw is not None:
            raw.flush()
        else:
            pipe.endpoint().flush()  # multi-conn: one flush covers every connection's writes

