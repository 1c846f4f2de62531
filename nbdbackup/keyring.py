"""`init` and `key ...`: create a repository, manage the keys of an encrypted one.

Keys wrap the master key; changing them never re-encrypts data (repository/keys.py).
Every operation first unlocks the repository with the current passphrase, so a
wrong passphrase changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import Settings
from .errors import EncryptionMismatch, RepositoryUnusable, UsageError
from .repository import Repository
from .repository import keys as keymod
from .repository.location import Location


@dataclass(frozen=True)
class InitResult:
    path: Location
    repo_id: str
    encryption: str
    key_file: Path | None  # keyfile mode: where the key is (back it up!)


def init(settings: Settings, encryption: str | None) -> InitResult:
    mode = encryption or settings.encryption or keymod.NONE
    if mode not in keymod.MODES:
        raise UsageError(f"unknown encryption {mode!r}; choose one of {', '.join(keymod.MODES)}")
    from .repository.location import backend_for

    backend = backend_for(settings.repo, settings.s3_for(settings.repo))
    if backend.exists("config.json"):
        raise RepositoryUnusable(f"{settings.repo} is a repository already", hint="give a new or empty location with --repo")
    repo = Repository.open(backend, create=True, encryption=mode)
    if not repo.encrypted and mode != keymod.NONE:  # lost a race with a concurrent creation of another kind
        raise EncryptionMismatch(f"{settings.repo} was created meanwhile without encryption")
    key_file = repo.key_store.file if repo.key_store is not None and repo.key_store.mode == keymod.KEYFILE else None
    return InitResult(settings.repo, repo.id, mode if repo.encrypted else keymod.NONE, key_file)


@dataclass(frozen=True)
class KeyInfo:
    id: str
    created: str
    kdf: str
    current: bool  # the key the given passphrase opened


@dataclass(frozen=True)
class _Unlocked:
    """An encrypted repository opened with the current passphrase: its keys, master key and the key it opened."""

    id: str
    store: keymod.KeyStore
    master_key: bytes
    key_id: str


def _open(settings: Settings) -> _Unlocked:
    repo = Repository.open(settings.repo, create=False, s3=settings.s3_for(settings.repo))
    if repo.cipher is None or repo.key_store is None or repo.key_id is None:
        raise EncryptionMismatch(f"repository {settings.repo} is not encrypted: it has no keys")
    return _Unlocked(repo.id, repo.key_store, repo.cipher.master_key, repo.key_id)


def list_keys(settings: Settings) -> list[KeyInfo]:
    repo = _open(settings)
    return [KeyInfo(k["id"], k.get("created", ""), f"{k['kdf']['algorithm']} m={k['kdf']['memory_cost']}KiB t={k['kdf']['iterations']} "
                    f"p={k['kdf']['lanes']}", k["id"] == repo.key_id) for k in repo.store.keys()]


def add_key(settings: Settings) -> str:
    """A new passphrase for the same master key (from NBDBACKUP_NEW_PASSWORD_* or a prompt); its id."""
    repo = _open(settings)
    doc = keymod.wrap(repo.master_key, keymod.NEW.get(confirm=True), repo.id)
    repo.store.add(doc)
    return doc["id"]


def remove_key(settings: Settings, key_id: str) -> None:
    repo = _open(settings)
    ids = [k["id"] for k in repo.store.keys()]
    if key_id not in ids:
        raise UsageError(f"the repository has no key {key_id!r}", hint="see 'nbdbackup key list'")
    if len(ids) == 1:
        raise EncryptionMismatch("refusing to remove the repository's last key: the backups could never be read again")
    repo.store.remove(key_id)


def change_passphrase(settings: Settings) -> str:
    """Replace the key the current passphrase opens by one with a new passphrase; the new key's id."""
    repo = _open(settings)
    doc = keymod.wrap(repo.master_key, keymod.NEW.get(confirm=True), repo.id)
    repo.store.add(doc)  # the new one first: a crash leaves both, never none
    repo.store.remove(repo.key_id)
    return doc["id"]


def export_key(settings: Settings, target: Path | None) -> bytes:
    """A key file holding every key of the repository (still protected by their passphrases)."""
    repo = _open(settings)
    data = keymod.key_file_bytes(repo.id, repo.store.keys())
    if target is not None:
        keymod.write_key_file(target, repo.id, repo.store.keys(), exclusive=True)
    return data
