"""Names that reach the filesystem or QEMU: checked here, and only here."""

from __future__ import annotations

import re
import secrets
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


def bitmap_namespace(repository_id: str) -> str:
    """Prefix of the bitmaps a repository owns: nbdbackup.<first 8 hex digits of its id>.

    Bitmaps of other tools never start with "nbdbackup."; those of another
    repository backing up the same VM have another namespace and are left alone.
    """
    return f"{BITMAP_PREFIX}{repository_id[:8]}."


def twin_bitmap(namespace: str) -> str:
    """The bitmap that records exactly what the active checkpoint bitmap records, on every disk:
    if another tool clears or changes the active bitmap, the two differ."""
    return f"{namespace}@twin"


def block_namespace(repository_id: str) -> str:
    """Prefix of the block nodes, jobs and exports a repository's backups create:
    nbdbackup-<first 8 hex digits of its id>-.  A backup cleans up leftovers of its
    own repository only, never another repository's backup in progress."""
    return f"nbdbackup-{repository_id[:8]}-"


def is_nbdbackup_bitmap(bitmap: str) -> bool:
    return bitmap.startswith(BITMAP_PREFIX)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
