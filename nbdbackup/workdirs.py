"""Private scratch and runtime directories: created 0700, removed on exit."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import UsageError


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
        if owner is not None:
            _check_reachable(configured, owner)
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


def _check_reachable(scratch: Path, owner: Owner) -> None:
    """A configured scratch directory, when QEMU runs as another user: QEMU must be able to
    enter it (search permission on it and on every directory above it) to open the overlays
    in the private subdirectory nbdbackup hands it.  Created 0711 if missing, like the default
    place; else refused up front (UsageError) with what it needs."""
    scratch = Path(os.path.abspath(scratch))
    if not scratch.exists():
        try:
            scratch.parent.mkdir(parents=True, exist_ok=True)
            scratch.mkdir(mode=0o711)
            os.chmod(scratch, 0o711)  # the umask must not take o+x away
        except FileExistsError:
            pass
        except OSError as exc:
            raise UsageError(f"cannot create the scratch directory {scratch}: {exc.strerror}") from None
    if not scratch.is_dir():
        raise UsageError(f"the scratch directory {scratch} is not a directory", hint="fix `scratch` in the configuration file")
    blocking = _first_unsearchable(scratch, owner)
    if blocking is not None:
        uid, _ = owner
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = f"uid {uid}"
        raise UsageError(
            f"QEMU runs as user {user} and cannot enter the scratch directory {scratch}: {blocking} is not searchable by that user",
            hint=f"make {blocking} (and every directory above the scratch directory) searchable by {user}, e.g. `chmod o+x {blocking}` "
                 f"(QEMU needs no read or write permission there: nbdbackup gives it a private subdirectory), "
                 f"or remove `scratch` to use {SHARED_SCRATCH}",
        )


_PROBE = """
import os, sys
from pathlib import Path
path = Path(sys.argv[1])
for p in [*reversed(path.parents), path]:
    if not os.access(p, os.X_OK):
        print(p)
        sys.exit(1)
"""


def _first_unsearchable(path: Path, owner: Owner) -> Path | None:
    """The first directory from / down to path that the user `owner` cannot search (ACLs
    and groups included: asked as that user), or None."""
    uid, gid = owner
    try:
        groups = os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)  # what QEMU's -runas gives itself (initgroups)
    except KeyError:
        groups = [gid]
    proc = subprocess.run([sys.executable, "-I", "-c", _PROBE, str(path)], user=uid, group=gid, extra_groups=groups,
                          capture_output=True, text=True, cwd="/")
    if proc.returncode == 0:
        return None
    return Path(proc.stdout.strip() or path)
