"""Keys of an encrypted repository: the master key, wrapped by passphrases.

A *key* (docs/FORMAT.md, "Keys") is one wrapping of the repository's random
master key by one passphrase: Argon2id (parameters stored with it) turns the
passphrase into a 32-byte key that AES-256-GCM-encrypts the master key.

    repokey  keys live in the repository, one object per key: keys/<key id>.json
    keyfile  keys live only in a local key file (never in the repository)

A key file (`key export`, or keyfile mode) is JSON holding the repository id
and a list of keys.  Adding, removing or changing a passphrase touches only
keys: the data stays encrypted with the same master key.
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ForeignKey, KeyFileDamaged, KeyUnavailable, RepositoryUnusable, UsageError, WrongPassphrase
from ..names import utc_now

KEY_FORMAT = "nbdbackup key"
KEY_FILE_FORMAT = "nbdbackup key file"
KEY_VERSION = 1
MASTER_KEY_SIZE = 32
REPOKEY, KEYFILE, NONE = "repokey", "keyfile", "none"
MODES = (REPOKEY, KEYFILE, NONE)

# Argon2id parameters for new keys: OWASP's second recommendation (19 MiB, 2 passes, 1 lane), which it
# rates as strong as 46 MiB with 1 pass, and keeps a backup's peak memory low (measured: 46 MiB raised
# the peak RSS of a full backup by half).  Stored with each key, so they can change without a format change.
DEFAULT_KDF = {"algorithm": "argon2id", "iterations": 2, "lanes": 1, "memory_cost": 19456}


# -- passphrases ---------------------------------------------------------------

@dataclass(frozen=True)
class PassphraseSource:
    """Where passphrases come from: a file, a command, or a terminal prompt (never the command line)."""

    file_var: str = "NBDBACKUP_PASSWORD_FILE"
    command_var: str = "NBDBACKUP_PASSWORD_COMMAND"
    prompt: str = "Passphrase"

    def get(self, *, confirm: bool = False) -> bytes:
        path = os.environ.get(self.file_var)
        if path:
            try:
                raw = Path(path).read_bytes()
            except OSError as exc:
                raise KeyUnavailable(f"cannot read the passphrase file {path} (${self.file_var}): {exc.strerror}") from None
            return _strip_newline(raw)
        command = os.environ.get(self.command_var)
        if command:
            try:
                done = subprocess.run(command, shell=True, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=120, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise KeyUnavailable(f"the passphrase command (${self.command_var}) failed: {exc}") from None
            if done.returncode != 0:
                raise KeyUnavailable(f"the passphrase command (${self.command_var}) exited with status {done.returncode}")
            return _strip_newline(done.stdout)
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise KeyUnavailable("the repository is encrypted and no passphrase was given",
                                 hint=f"set ${self.file_var} or ${self.command_var}, or run on a terminal")
        try:
            first = getpass.getpass(f"{self.prompt}: ")
            if confirm and getpass.getpass(f"{self.prompt} (again): ") != first:
                raise UsageError("the two passphrases differ; nothing was changed")
        except (EOFError, KeyboardInterrupt):
            raise KeyUnavailable("no passphrase was given") from None
        return first.encode()


CURRENT = PassphraseSource()
NEW = PassphraseSource("NBDBACKUP_NEW_PASSWORD_FILE", "NBDBACKUP_NEW_PASSWORD_COMMAND", "New passphrase")


def copy_target_source() -> PassphraseSource:
    """`copy`'s target: $NBDBACKUP_TARGET_PASSWORD_FILE/_COMMAND when set, else the same as the source's."""
    if os.environ.get("NBDBACKUP_TARGET_PASSWORD_FILE") or os.environ.get("NBDBACKUP_TARGET_PASSWORD_COMMAND"):
        return PassphraseSource("NBDBACKUP_TARGET_PASSWORD_FILE", "NBDBACKUP_TARGET_PASSWORD_COMMAND", "Passphrase of the copy's target")
    return CURRENT


def _strip_newline(raw: bytes) -> bytes:
    line = raw.split(b"\n", 1)[0].rstrip(b"\r")
    if not line:
        raise KeyUnavailable("the passphrase given is empty")
    return line


# -- one key: the master key wrapped by one passphrase -------------------------

def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: Any) -> bytes:
    if not isinstance(s, str):
        raise TypeError("not a base64 string")
    return base64.b64decode(s, validate=True)


def _start_kek(passphrase: bytes, kdf: dict[str, Any]) -> Callable[[], bytes]:
    """Argon2id of passphrase with kdf's parameters, started: in a short-lived child process where
    fork() is possible, so that its memory (memory_cost KiB, freed at once) never counts in the
    long-running backup's peak memory nor raises its allocator's thresholds (docs/FORMAT.md,
    "Keys").  The child derives while this process goes on (it loads the cryptography package
    meanwhile: the two overlap instead of adding up when a command starts); the function returned
    waits for the result (or derives here when no child could).  Always call it: it reaps the child."""
    if kdf.get("algorithm") != "argon2id":
        raise KeyFileDamaged(f"unknown key derivation {kdf.get('algorithm')!r}")
    params = (_unb64(kdf["salt"]), int(kdf["iterations"]), int(kdf["lanes"]), int(kdf["memory_cost"]))
    child = _fork_argon2id(passphrase, params)

    def result() -> bytes:
        derived = _collect_argon2id(*child) if child is not None else None
        return derived if derived is not None else _argon2id(passphrase, params)

    return result


def _kek(passphrase: bytes, kdf: dict[str, Any]) -> bytes:
    """The key-encryption key: _start_kek's child derives it while the cryptography package
    (which every caller then needs) loads here, so that the two overlap; the child is reaped
    even when the import fails."""
    collect = _start_kek(passphrase, kdf)
    try:
        from cryptography.hazmat.primitives.ciphers import aead  # noqa: F401 - loaded now, used by the caller
    finally:
        key = collect()
    return key


def _argon2id(passphrase: bytes, params: tuple[bytes, int, int, int]) -> bytes:
    # argon2-cffi (libargon2, the reference implementation): only for encrypted repositories, and only
    # in the child where it can fork
    from argon2.low_level import Type, hash_secret_raw

    salt, iterations, lanes, memory_cost = params
    return hash_secret_raw(passphrase, salt, time_cost=iterations, memory_cost=memory_cost, parallelism=lanes,
                           hash_len=32, type=Type.ID, version=19)


CHILD_TIMEOUT = 120.0  # seconds a key derivation in the child may take before it is derived here instead


def _fork_argon2id(passphrase: bytes, params: tuple[bytes, int, int, int]) -> tuple[int, int] | None:
    """A forked child computing _argon2id: (its pid, the pipe's read end it answers on), to pass to
    _collect_argon2id (which reaps it: always call it); None when no child can be forked."""
    if not hasattr(os, "fork"):
        return None
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return None
    if pid == 0:  # the child: derive, send, leave without running any of the parent's clean-ups
        status = 1
        try:
            os.close(read_end)
            os.write(write_end, _argon2id(passphrase, params))  # 32 bytes: one atomic pipe write
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    return pid, read_end


def _collect_argon2id(pid: int, read_end: int) -> bytes | None:
    """The 32 bytes the child of _fork_argon2id sent, once it has exited; None if it failed or did
    not answer within CHILD_TIMEOUT seconds (it is killed then)."""
    received = b""
    deadline = time.monotonic() + CHILD_TIMEOUT
    try:
        # A child forked while another thread held a lock inside OpenSSL could wait forever: bounded.
        while select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))[0]:
            block = os.read(read_end, 64)
            if not block:
                break
            received += block
        else:
            os.kill(pid, signal.SIGKILL)
            received = b""
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    return received if status == 0 and len(received) == 32 else None


def _aad(repo_id: str, key_id: str) -> bytes:
    return f"nbdbackup key v1\0{repo_id}\0{key_id}".encode()


def wrap(master_key: bytes, passphrase: bytes, repo_id: str, kdf_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """A new key (JSON object) opening master_key with passphrase."""
    kdf = dict(kdf_params or DEFAULT_KDF)
    kdf["salt"] = _b64(secrets.token_bytes(16))
    key_id = secrets.token_hex(8)
    nonce = secrets.token_bytes(12)
    key = _kek(passphrase, kdf)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    wrapped = AESGCM(key).encrypt(nonce, master_key, _aad(repo_id, key_id))
    return {"format": KEY_FORMAT, "version": KEY_VERSION, "repository": repo_id, "id": key_id, "created": utc_now(),
            "kdf": kdf, "cipher": "aes-256-gcm", "nonce": _b64(nonce), "wrapped": _b64(wrapped)}


def check_key(doc: Any, repo_id: str, where: str) -> dict[str, Any]:
    """doc if it is a well-formed key of repository repo_id; else KeyFileDamaged/ForeignKey."""
    try:
        if not isinstance(doc, dict) or doc.get("format") != KEY_FORMAT or doc.get("version") != KEY_VERSION:
            raise TypeError("not a key")
        _unb64(doc["nonce"]), _unb64(doc["wrapped"]), _unb64(doc["kdf"]["salt"])
        str(doc["id"])
        for name in ("iterations", "lanes", "memory_cost"):
            int(doc["kdf"][name])
    except (KeyError, TypeError, ValueError):
        raise KeyFileDamaged(f"{where} is damaged: it is not an nbdbackup key") from None
    if doc.get("repository") != repo_id:
        raise ForeignKey(f"{where} belongs to another repository ({doc.get('repository')}), not to {repo_id}",
                         hint="give the key of this repository")
    return doc


def unwrap(doc: dict[str, Any], passphrase: bytes, repo_id: str) -> bytes | None:
    """The master key, or None when passphrase does not open this key."""
    try:
        key = _kek(passphrase, doc["kdf"])
    except (ValueError, KeyError, TypeError):
        raise KeyFileDamaged(f"key {doc.get('id')} is damaged") from None
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        master = AESGCM(key).decrypt(_unb64(doc["nonce"]), _unb64(doc["wrapped"]), _aad(repo_id, doc["id"]))
    except InvalidTag:
        return None
    except (ValueError, KeyError, TypeError):
        raise KeyFileDamaged(f"key {doc.get('id')} is damaged") from None
    return master


def new_master_key() -> bytes:
    return secrets.token_bytes(MASTER_KEY_SIZE)


# -- key files -------------------------------------------------------------------

def default_key_file(repo_id: str) -> Path:
    """$NBDBACKUP_KEY_FILE, else $XDG_CONFIG_HOME/nbdbackup/keys/<repository id>.json."""
    given = os.environ.get("NBDBACKUP_KEY_FILE")
    if given:
        return Path(given)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "nbdbackup" / "keys" / f"{repo_id}.json"


def key_file_bytes(repo_id: str, keys: Sequence[dict[str, Any]]) -> bytes:
    return json.dumps({"format": KEY_FILE_FORMAT, "version": KEY_VERSION, "repository": repo_id, "keys": list(keys)},
                      indent=1).encode() + b"\n"


def read_key_file(path: Path, repo_id: str) -> list[dict[str, Any]]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KeyUnavailable(f"the repository is encrypted and its key file {path} is missing",
                             hint="restore it from your key backup, or set NBDBACKUP_KEY_FILE") from None
    except OSError as exc:
        raise KeyUnavailable(f"cannot read the key file {path}: {exc.strerror}") from None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != KEY_FILE_FORMAT or not isinstance(doc.get("keys"), list):
            raise ValueError
    except ValueError:
        raise KeyFileDamaged(f"the key file {path} is damaged: it is not an nbdbackup key file") from None
    if doc.get("repository") != repo_id:
        raise ForeignKey(f"the key file {path} belongs to another repository ({doc.get('repository')}), not to {repo_id}",
                         hint="give this repository's key file")
    return [check_key(k, repo_id, f"the key file {path}") for k in doc["keys"]]


def write_key_file(path: Path, repo_id: str, keys: Sequence[dict[str, Any]], *, exclusive: bool = False) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_file_bytes(repo_id, keys))
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except FileExistsError:
        os.unlink(tmp)
        raise RepositoryUnusable(f"the key file {path} exists already", hint="move it away first") from None
    except OSError as exc:
        raise RepositoryUnusable(f"cannot write the key file {path}: {exc.strerror}") from None


# -- a key store: where a repository's keys live ----------------------------------

class KeyStore:
    """The keys of one repository, in the repository (repokey) or in a key file (keyfile).

    An explicit NBDBACKUP_KEY_FILE is used for a repokey repository too (an
    exported key: recovery when the repository's keys are lost)."""

    def __init__(self, mode: str, repo_id: str, backend: Any) -> None:
        self.mode = mode
        self.repo_id = repo_id
        self.backend = backend  # the raw backend: keys are not encrypted objects
        self.file = default_key_file(repo_id)
        self.use_file = mode == KEYFILE or bool(os.environ.get("NBDBACKUP_KEY_FILE"))

    def keys(self) -> list[dict[str, Any]]:
        if self.use_file:
            return read_key_file(self.file, self.repo_id)
        found = []
        for name in sorted(self.backend.list("keys")):
            try:
                doc = json.loads(self.backend.read(name))
            except FileNotFoundError:
                continue
            except ValueError:
                raise KeyFileDamaged(f"the repository's key {name} is damaged") from None
            found.append(check_key(doc, self.repo_id, f"the repository's key {name}"))
        if not found:
            raise KeyUnavailable("the repository is encrypted but holds no key",
                                 hint="set NBDBACKUP_KEY_FILE to an exported key file")
        return found

    def add(self, doc: dict[str, Any], *, create: bool = False) -> None:
        if self.mode == KEYFILE:
            existing = [] if create else read_key_file(self.file, self.repo_id)
            write_key_file(self.file, self.repo_id, [*existing, doc], exclusive=create)
        else:
            self.backend.write(f"keys/{doc['id']}.json", json.dumps(doc, indent=1).encode() + b"\n", durable=True, exclusive=True)

    def remove(self, key_id: str) -> None:
        if self.mode == KEYFILE:
            write_key_file(self.file, self.repo_id, [k for k in read_key_file(self.file, self.repo_id) if k["id"] != key_id])
        else:
            self.backend.delete(f"keys/{key_id}.json")
            self.backend.sync()


@dataclass(frozen=True)
class Unlocked:
    master_key: bytes = field(repr=False)
    key_id: str  # the key the passphrase opened

    def to_bytes(self) -> bytes:
        """For a child process that serves the repository (serving.py hands it over through a pipe)."""
        return json.dumps({"format": "nbdbackup unlocked key", "key": self.key_id, "master": _b64(self.master_key)}).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Unlocked:
        try:
            doc = json.loads(raw)
            if doc.get("format") != "nbdbackup unlocked key":
                raise ValueError
            master = _unb64(doc["master"])
            if len(master) != MASTER_KEY_SIZE:
                raise ValueError
            return cls(master, str(doc["key"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise KeyUnavailable("the key handed over by nbdbackup is unreadable") from None


# Master keys this process has unwrapped, by (repository, key document, passphrase): a
# run that opens the repository again (`auto --all`, one VM after another) skips the key derivation.
# In memory only, for this process's life; the passphrase must still open the key.
_unwrapped: dict[tuple[str, str, bytes], bytes] = {}
_unwrapping = threading.Lock()  # concurrent opens (`auto --all --jobs`) derive once


def unlock(store: KeyStore, source: PassphraseSource = CURRENT, *, passphrase: bytes | None = None) -> Unlocked:
    """Find the key the passphrase opens; WrongPassphrase if none does."""
    keys = store.keys()  # before asking: a missing or foreign key file fails without a prompt
    secret = passphrase if passphrase is not None else source.get()
    with _unwrapping:
        for doc in keys:
            seen = (store.repo_id, json.dumps(doc, sort_keys=True), secret)
            master = _unwrapped.get(seen) or unwrap(doc, secret, store.repo_id)
            if master is not None:
                _unwrapped[seen] = master
                return Unlocked(master, doc["id"])
    where = f"the key file {store.file}" if store.use_file else "the repository's keys"
    raise WrongPassphrase(f"wrong passphrase: it opens none of {where}")


