"""What this host has seen of an encrypted repository: notices a store that serves an older state.

An untrusted store cannot forge or alter an object of an encrypted repository, but it can
delete objects, withhold them, or serve an older copy of the whole repository (docs/FORMAT.md,
"What the store can still do").  Each host keeps, per repository, the backups it has seen
(a local file: $XDG_STATE_HOME/nbdbackup/seen/<repository id>.json).  Every listing of a VM's
backups is compared with it: a backup this host saw that is gone must have a removal record,
an encrypted object that `prune`/`delete` write on any host before they delete a manifest
(Repository.delete_backup).  A backup gone without one means the store rolled the repository
back or withholds it: RepositoryRolledBack (exit 27), nothing changed.

The file is trusted (it is this host's own state, 0600 in a 0700 folder); losing it only
forgets what was seen (no alarm, less protection).  Concurrent runs on this host merge their
updates under a lock; an update lost to a race can only drop an entry, never raise an alarm.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import RepositoryRolledBack

FORMAT = "nbdbackup seen backups"
VERSION = 1


def default_dir() -> Path:
    """$XDG_STATE_HOME/nbdbackup/seen (default ~/.local/state/nbdbackup/seen)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "nbdbackup" / "seen"


class SeenBackups:
    """The backups this host has seen in one repository, per VM."""

    def __init__(self, repo_id: str, location: str, folder: Path | None = None) -> None:
        self.repo_id = repo_id
        self.location = location  # for messages
        self.path = (folder or default_dir()) / f"{repo_id}.json"
        self._vms: dict[str, set[str]] | None = None  # as last read or written

    # -- the checks ----------------------------------------------------------------

    def check(self, vm: str, listed: Iterable[str], removed: Callable[[], set[str]]) -> None:
        """The store lists `listed` as vm's backups; removed() gives the backups that removal
        records name (read only when needed).  RepositoryRolledBack when a backup seen here is gone
        without a removal record; otherwise the record becomes what is listed now."""
        now = set(listed)
        missing = self._load().get(vm, set()) - now
        gone: set[str] = set()
        if missing:
            gone = removed()
            unexplained = sorted(missing - gone)
            if unexplained:
                shown = ", ".join(unexplained[:3]) + (f" and {len(unexplained) - 3} more" if len(unexplained) > 3 else "")
                raise RepositoryRolledBack(
                    f"the repository at {self.location} no longer holds {len(unexplained)} backup(s) of {vm} that this host "
                    f"saw there ({shown}), and holds no record of their deletion: its storage serves an older state or "
                    f"withholds objects",
                    hint=f"nothing was changed; if you restored the storage from an older copy on purpose, remove {self.path}")
        self._update(vm, add=now, drop=gone)

    def add(self, vm: str, checkpoint: str) -> None:
        """A backup this run committed."""
        self._update(vm, add={checkpoint}, drop=set())

    def forget(self, vm: str, checkpoint: str) -> None:
        """A backup this run deleted (after writing its removal record)."""
        self._update(vm, add=set(), drop={checkpoint})

    def vms(self) -> list[str]:
        """VMs of which this host has seen backups."""
        return sorted(vm for vm, names in self._load().items() if names)

    # -- the file ------------------------------------------------------------------

    def _load(self) -> dict[str, set[str]]:
        if self._vms is None:
            self._vms = self._read()
        return self._vms

    def _read(self) -> dict[str, set[str]]:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # unreadable: start again (less protection, never a false alarm)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("repository") != self.repo_id:
            return {}
        vms = doc.get("vms")
        if not isinstance(vms, dict):
            return {}
        return {str(vm): {str(n) for n in names} for vm, names in vms.items() if isinstance(names, list)}

    def _update(self, vm: str, *, add: set[str], drop: set[str]) -> None:
        if self._vms is not None and add <= self._vms.get(vm, set()) and not drop & self._vms.get(vm, set()):
            return  # nothing new: no write
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(self.path.with_name(f".{self.path.name}.lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another run on this host may update it meanwhile: merge
                current = self._read()
                current[vm] = (current.get(vm, set()) | add) - drop
                self._write(current)
                self._vms = current
        except OSError:
            self._vms = self._load()  # cannot keep a record here (read-only home): check without one
            self._vms[vm] = (self._vms.get(vm, set()) | add) - drop

    def _write(self, vms: dict[str, set[str]]) -> None:
        doc = {"format": FORMAT, "version": VERSION, "repository": self.repo_id,
               "vms": {vm: sorted(names) for vm, names in sorted(vms.items()) if names}}
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        os.replace(tmp, self.path)
