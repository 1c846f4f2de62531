"""Private scratch and runtime directories: created 0700, removed on exit."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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


# Scratch space when QEMU runs as another user: it cannot reach into the 0700 repository.
SHARED_SCRATCH = Path("/var/tmp/nbdbackup")


Owner = tuple[int, int]  # (uid, gid)


def foreign_owner(qemu_user: Owner | None) -> Owner | None:
    """The user QEMU runs as, when nbdbackup (as root) must hand it its private
    directories and scratch files, so that QEMU can create its NBD socket and
    open the overlays; None when QEMU runs as root or as ourselves."""
    if qemu_user is None or qemu_user[0] == os.geteuid() or os.geteuid() != 0:
        return None
    return qemu_user


def scratch_base(configured: Path | None, repo_tmp: Callable[[], Path], owner: Owner | None) -> Path:
    """Where fleecing overlays grow: the configured place, else inside the repository,
    else (QEMU runs as another user) SHARED_SCRATCH, which others may traverse but not list."""
    if configured:
        return configured
    if owner is None:
        return repo_tmp()
    SHARED_SCRATCH.mkdir(mode=0o711, parents=True, exist_ok=True)
    return SHARED_SCRATCH


@contextlib.contextmanager
def private_dir(parent: Path | None = None, prefix: str = "nbdbackup-", owner: Owner | None = None) -> Iterator[Path]:
    """A new 0700 directory (owned by `owner` if given), removed with its content on exit."""
    base = parent or runtime_base()
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    os.chmod(path, 0o700)
    if owner:
        os.chown(path, *owner)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
