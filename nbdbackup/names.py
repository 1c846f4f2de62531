"""Names that reach the filesystem or QEMU: checked here, and only here.

Everything nbdbackup creates in QEMU is named here, within QEMU's limits
(QEMU 7.2, verified; docs/CHAIN.md "Names in QEMU"):

    node names (fleece)    at most 31 characters; a letter, then letters, digits, - . _
    job ids, export ids    a letter, then letters, digits, - . _ (no length limit)
    dirty bitmap names     at most 1023 characters, any characters
    NBD export names       at most 4096 bytes, any characters

A guest device id may be anything (JSON -device and device_add accept any
string, of any length), so no QEMU name is ever built by appending one:
block-layer names carry a short hash of the disk id instead.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from .errors import UsageError

# Letters, digits and . _ - ; must start with a letter or digit (so never "." or "..").
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_NAME = 64
BITMAP_PREFIX = "nbdbackup."


def check_name(kind: str, value: str) -> str:
    """Return value if it is safe as a file name and a bitmap name; else UsageError."""
    if not value:
        raise UsageError(f"{kind} name is empty")
    if len(value) > MAX_NAME:
        raise UsageError(f"{kind} name is longer than {MAX_NAME} characters: {value[:MAX_NAME]!r}...")
    if not _SAFE.match(value):
        raise UsageError(
            f"{kind} name {value!r} is not allowed",
            hint="use letters, digits, '.', '_' and '-', starting with a letter or digit",
        )
    return value


def new_checkpoint_name(now: datetime | None = None) -> str:
    """A unique name that sorts by creation time: 20261125T224512Z-3f9a1c."""
    now = now or datetime.now(UTC)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z-" + secrets.token_hex(3)


# -- QEMU's limits ---------------------------------------------------------------

NODE_NAME_MAX = 31
BITMAP_NAME_MAX = 1023
NBD_EXPORT_NAME_MAX = 4096
QEMU_ID = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")  # node names, job ids, export ids
GRANULARITY = 65536  # of every bitmap nbdbackup creates: one bit per 64 KiB (2 MiB per TiB)


def _fits_id(name: str, max_len: int | None = None) -> str:
    if not QEMU_ID.match(name) or (max_len is not None and len(name) > max_len):
        raise ValueError(f"not a valid QEMU id: {name!r}")  # a bug in this module, never bad input
    return name


def _fits_bitmap(name: str) -> str:
    if len(name.encode()) > BITMAP_NAME_MAX:
        raise ValueError(f"bitmap name too long for QEMU: {name!r}")
    return name


# -- Bitmaps: nbdbackup.<ns>.<checkpoint> -------------------------------------------------

def bitmap_namespace(repository_id: str) -> str:
    """Prefix of the bitmaps a repository owns: nbdbackup.<first 8 hex digits of its id>.

    Bitmaps of other tools never start with "nbdbackup."; those of another
    repository backing up the same VM have another namespace and are left alone.
    """
    return f"{BITMAP_PREFIX}{repository_id[:8]}."


def checkpoint_bitmap(namespace: str, checkpoint: str) -> str:
    """The bitmap of a checkpoint, on each of its disks (at most 83 characters)."""
    return _fits_bitmap(namespace + checkpoint)


def twin_bitmap(namespace: str) -> str:
    """The bitmap that records exactly what the active checkpoint bitmap records, on every disk:
    if another tool clears or changes the active bitmap, the two differ."""
    return f"{namespace}@twin"


def check_bitmaps(namespace: str) -> tuple[str, str]:
    """Temporary (not persistent) copies of the active bitmap and its twin, taken at one instant."""
    return f"{namespace}@check-active", f"{namespace}@check-twin"


# The temporary export bitmap: it lives on the run's own fleece node only, so needs no namespace.
EXPORT_BITMAP = "nbdbackup-export"


# -- Block layer: nbdbackup-<ns>-<kind>-<disk key> -----------------------------------------

def block_namespace(repository_id: str) -> str:
    """Prefix of the block nodes, jobs and exports a repository's backups create:
    nbdbackup-<first 8 hex digits of its id>- (19 characters).  A backup cleans up
    leftovers of its own repository only, never another repository's backup in progress."""
    return f"nbdbackup-{repository_id[:8]}-"


def disk_key(disk_id: str) -> str:
    """8 hex digits standing for a disk id (any length, any characters) in QEMU ids."""
    return hashlib.sha256(disk_id.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class BlockNames:
    """Names of what a backup adds to QEMU's block layer for each disk, in its repository's
    namespace: nbdbackup-31c398d8-fl-<key> (node), -job-<key>, -exp-<key>; at most 31
    characters whatever the disk id."""

    namespace: str  # block_namespace(repository id)

    def fleece(self, disk_id: str) -> str:
        return _fits_id(f"{self.namespace}fl-{disk_key(disk_id)}", NODE_NAME_MAX)

    def job(self, disk_id: str) -> str:
        return _fits_id(f"{self.namespace}job-{disk_key(disk_id)}", NODE_NAME_MAX)

    def export(self, disk_id: str) -> str:
        return _fits_id(f"{self.namespace}exp-{disk_key(disk_id)}", NODE_NAME_MAX)

    def owns(self, name: str) -> bool:
        """A job or export of this namespace (left by an interrupted run, if no run is going on)."""
        return name.startswith(self.namespace)

    def is_fleece(self, node: str) -> bool:
        """A fleece node of this namespace, including those named by 0.1.0 (-fleece-<disk>)."""
        return node.startswith((f"{self.namespace}fl-", f"{self.namespace}fleece-"))


def nbd_export_name(disk_id: str) -> str:
    """What the NBD client asks for: the disk id itself (check_name keeps it within 64 characters)."""
    if len(disk_id.encode()) > NBD_EXPORT_NAME_MAX:
        raise ValueError(f"NBD export name too long: {disk_id!r}")
    return disk_id


def is_nbdbackup_bitmap(bitmap: str) -> bool:
    return bitmap.startswith(BITMAP_PREFIX)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
