"""Frozen records that cross module boundaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

BackupKind = Literal["full", "incremental"]


@dataclass(frozen=True)
class Disk:
    """One disk of a running VM, as QMP describes it."""

    id: str  # guest device id (qdev id), e.g. "vda": the stable name
    node: str  # block node holding the image format (and the bitmaps)
    size: int  # virtual size in bytes
    format: str  # "qcow2", "raw", ...
    filename: str  # the image file QEMU has open (QMP's "file"): rollback names it


@dataclass(frozen=True)
class Bitmap:
    """A dirty bitmap on a block node (query-named-block-nodes)."""

    node: str
    name: str
    count: int  # dirty bytes
    recording: bool
    persistent: bool
    busy: bool
    inconsistent: bool


@dataclass(frozen=True)
class Extent:
    """A byte range of a disk."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class IndexEntry:
    """disk[offset : offset+length] == chunk[chunk_offset : chunk_offset+length]."""

    offset: int
    length: int
    chunk: bytes  # SHA-256 of the chunk's uncompressed content
    chunk_offset: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class DiskBackup:
    """A disk as recorded in a backup manifest."""

    id: str
    size: int
    index_sha256: str
    data_bytes: int  # bytes of the disk covered by chunks (the rest is zero)
    read_bytes: int  # bytes read from the VM for this backup
    full_read: bool  # read in full (new disk, new chain, or size changed)


@dataclass(frozen=True)
class Manifest:
    """The record that makes a backup exist.  Written last."""

    vm: str
    checkpoint: str
    kind: BackupKind
    since: str | None
    created: str  # ISO 8601, UTC
    chain: str  # id of the checkpoint chain this backup belongs to
    disks: tuple[DiskBackup, ...]
    removed_disks: tuple[str, ...] = ()
    stored_bytes: int = 0  # compressed bytes of chunks this backup added
    read_bytes: int = 0
    duration: float = 0.0

    def disk(self, disk_id: str) -> DiskBackup | None:
        return next((d for d in self.disks if d.id == disk_id), None)


CheckpointState = Literal["pending", "confirmed"]


@dataclass(frozen=True)
class CheckpointRecord:
    """The repository's record of one checkpoint (one bitmap per disk in QEMU)."""

    name: str
    created: str
    chain: str
    disks: tuple[str, ...]
    bitmap: str  # name of its dirty bitmap on every disk
    state: CheckpointState = "pending"
    # Dirty bytes of its bitmap per disk, recorded once the bitmap stopped recording
    # (and after each of our merges into it): another tool's change shows as a difference.
    counts: dict[str, int] = field(default_factory=dict)
