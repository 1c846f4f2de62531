"""Private scratch and runtime directories: created 0700, removed on exit."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def runtime_base() -> Path:
    """Where short-lived sockets go: short paths (unix sockets allow 107 bytes)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        return Path(xdg)
    return Path(tempfile.gettempdir())


def remove_stale_dirs(parent: Path, prefix: str) -> None:
    """Remove private directories named prefix* that a killed run left in parent."""
    if parent.is_dir():
        for stale in parent.glob(f"{prefix}*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def private_dir(parent: Path | None = None, prefix: str = "nbdbackup-") -> Iterator[Path]:
    """A new 0700 directory, removed with its content on exit."""
    base = parent or runtime_base()
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    os.chmod(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
