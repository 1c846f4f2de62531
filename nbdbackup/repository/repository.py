"""The repository: one object tying the format (docs/FORMAT.md) to a Backend.

Layout (keys of the backend):

    config.json                               format name, version, repository id
    chunks/<2 hex>/<64 hex>                   chunk files (chunks.py)
    vms/<vm>/checkpoints.json                 checkpoint records of the VM's chain
    vms/<vm>/backups/<checkpoint>/<disk>.index  one complete index per disk (index.py)
    vms/<vm>/backups/<checkpoint>/manifest.json the backup exists iff this does

Write order (crash safety): chunks, indexes, sync, manifest (durable).
An encrypted repository wraps its backend in crypto.EncryptedBackend: the
keys above are then logical, the backend below sees encrypted names and objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..errors import EncryptionMismatch, RepositoryDamaged, RepositoryUnusable, UsageError
from ..lock import file_lock, object_lock, remove_dead_holders
from ..names import check_name, utc_now
from ..records import CheckpointRecord, IndexEntry, Manifest
from . import chunks, crypto, index, keys, manifest, seen
from .backend import DIR_MODE, Backend, LocalBackend, RangedReader
from .chunkid import ChunkIds
from .location import Location, S3Location, S3Settings, backend_for

log = logging.getLogger(__name__)

FORMAT_NAME = "nbdbackup repository"
FORMAT_VERSION = 3  # what new repositories get; every version from 1 up is read and written
READABLE_VERSIONS = (1, 2, 3)
PRESENT_LIMIT = 250_000  # chunk ids put_chunk keeps in memory (~25 MiB) to skip a HEAD per chunk
REMOVAL_FORMAT = "nbdbackup removal"  # vms/<vm>/removed/<random>.json (encrypted repositories)
LOCAL_CACHE = Path("/var/tmp")  # scratch of repositories that are not local directories


CONFIG_MAC_CONTEXT = "nbdbackup 2026-11 config mac v2"


def _config_mac(config: dict, master_key: bytes) -> str:
    """Keyed BLAKE3 of config.json's canonical form without encryption.config_mac (encrypted repositories)."""
    from blake3 import blake3

    doc = json.loads(json.dumps(config))
    doc["encryption"].pop("config_mac", None)
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return blake3(canonical, key=crypto.derive(master_key, CONFIG_MAC_CONTEXT)).hexdigest()


class Repository:
    """An open repository.  version is its format version (a repository keeps it for life);
    chunk_id computes chunk ids the way its config.json says (chunkid.py)."""

    def __init__(self, backend: Backend, repo_id: str, root: Path | None = None, *,
                 version: int = FORMAT_VERSION, chunk_id: ChunkIds | None = None) -> None:
        self.backend = backend
        self.id = repo_id
        self.root = root
        self.version = version
        self.chunk_id = chunk_id or (ChunkIds.sha256() if version == 1 else ChunkIds.blake3() if version == 2 else ChunkIds.tree())
        self.cipher: crypto.Cipher | None = None  # set when the repository is encrypted and unlocked
        self.key_store: keys.KeyStore | None = None
        self.key_id: str | None = None
        self._held: list = []  # lock objects held through lock()
        self.new_chunks: set[bytes] = set()  # chunks this process created (a failed run removes them)
        self._present: set[bytes] | None = None  # chunks known to exist (remote backends): see put_chunk
        self._present_mutex = threading.Lock()
        self._listing: Future | None = None  # the chunk listing a backup started when its locks were taken
        self.seen: seen.SeenBackups | None = None  # encrypted: what this host saw (rollback detection)

    # -- opening ---------------------------------------------------------

    @classmethod
    def open(cls, where: Location | Backend, *, create: bool = False, s3: S3Settings | None = None,
             encryption: str | None = None, passphrase: bytes | None = None,
             passphrase_source: keys.PassphraseSource = keys.CURRENT, like: Repository | None = None,
             unlocked: keys.Unlocked | None = None) -> Repository:
        """The repository at a path, an s3:// location or on a ready Backend (tests: MemoryBackend);
        RepositoryUnusable if there is none, unless create (only backups, copy's target and init
        create one: a typo in --repo must not make a new repository); a new one gets like's format
        version and chunk ids when like is an unencrypted repository (copy).

        encryption: what the configuration asks for ("repokey", "keyfile", "none" or None = no
        opinion).  A new repository gets it; an existing unencrypted one is refused when
        encryption is asked for (a store that dropped the encryption must not get plaintext).
        An encrypted repository is unlocked here: every command needs its key (the passphrase:
        given, or asked from passphrase_source only when needed), or unlocked is the key already
        opened by the process that started this one (serving.py: nbdkit's plugin)."""
        backend = backend_for(where, s3) if isinstance(where, (str, Path, S3Location)) else where
        local = backend.root if isinstance(backend, LocalBackend) else None
        here = backend.location
        try:
            blob = backend.read("config.json")
        except FileNotFoundError:
            occupied = (any(not p.name.startswith(".") for p in local.iterdir()) if local.exists() else False) if local \
                else any(True for _ in backend.list(""))
            if occupied and backend.exists("config.json"):  # another run created it just now
                return cls.open(backend, create=False, encryption=encryption, passphrase=passphrase, passphrase_source=passphrase_source)
            if occupied:
                raise RepositoryUnusable(f"{here} is not an nbdbackup repository (no config.json)", hint="give an empty or new location with --repo") from None
            if not create:
                raise RepositoryUnusable(f"there is no repository at {here}", hint="check --repo; the first backup creates it") from None
            return cls._create(backend, encryption or keys.NONE, passphrase, passphrase_source, like)
        except NotADirectoryError:
            raise RepositoryUnusable(f"repository path {here} is not a directory") from None
        except PermissionError:
            raise RepositoryUnusable(f"no permission to read the repository at {here}") from None
        return cls._from_config(backend, blob, encryption, passphrase, passphrase_source, unlocked)

    @classmethod
    def _from_config(cls, backend: Backend, blob: bytes, encryption: str | None, passphrase: bytes | None,
                     passphrase_source: keys.PassphraseSource = keys.CURRENT, given: keys.Unlocked | None = None) -> Repository:
        here = backend.location
        local = backend.root if isinstance(backend, LocalBackend) else None
        try:
            config = json.loads(blob)
            name, version, repo_id = config["format"], config["version"], config["id"]
        except (ValueError, KeyError, TypeError):
            raise RepositoryDamaged(f"{here}/config.json is damaged") from None
        if name != FORMAT_NAME:
            raise RepositoryUnusable(f"{here} holds {name!r}, not an nbdbackup repository")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RepositoryDamaged(f"{here}/config.json is damaged (bad version {version!r})")
        if version not in READABLE_VERSIONS:
            raise RepositoryUnusable(
                f"repository {here} has format version {version}; this nbdbackup reads versions 1 to {FORMAT_VERSION}",
                hint="upgrade nbdbackup",
            )
        enc = config.get("encryption")
        if enc is None:
            if encryption not in (None, keys.NONE):
                raise EncryptionMismatch(f"repository {here} is not encrypted, but the configuration asks for encryption ({encryption})",
                                         hint="back up into a new repository, or remove the 'encryption' setting")
            if given is not None:  # it was encrypted when the parent process opened it
                raise EncryptionMismatch(f"repository {here} is not encrypted any more", hint="check who changed the repository")
            ids = ChunkIds.for_config(version, config, f"{here}/config.json")
            return cls(backend, repo_id, local, version=version, chunk_id=ids)
        if not isinstance(enc, dict) or enc.get("mode") not in (keys.REPOKEY, keys.KEYFILE) or version < 2:
            raise RepositoryDamaged(f"{here}/config.json is damaged (bad 'encryption')")
        if enc.get("cipher") != crypto.CIPHER_NAME:
            raise RepositoryUnusable(f"{here}: encrypted with {enc.get('cipher')!r}, which this nbdbackup does not know", hint="upgrade nbdbackup")
        store = keys.KeyStore(enc["mode"], repo_id, backend)
        unlocked = given if given is not None else keys.unlock(store, passphrase_source, passphrase=passphrase)
        if not hmac.compare_digest(str(enc.get("config_mac", "")), _config_mac(config, unlocked.master_key)):
            raise RepositoryDamaged(f"{here}/config.json fails authentication (changed since the repository was created)")
        ids = ChunkIds.for_config(version, config, f"{here}/config.json", master_key=unlocked.master_key)
        return cls._encrypted(backend, repo_id, version, ids, store, unlocked)

    @classmethod
    def _encrypted(cls, backend: Backend, repo_id: str, version: int, ids: ChunkIds,
                   store: keys.KeyStore, unlocked: keys.Unlocked) -> Repository:
        local = backend.root if isinstance(backend, LocalBackend) else None
        cipher = crypto.Cipher(unlocked.master_key)
        repo = cls(crypto.EncryptedBackend(backend, cipher), repo_id, local, version=version, chunk_id=ids)
        repo.cipher, repo.key_store, repo.key_id = cipher, store, unlocked.key_id
        repo.seen = seen.SeenBackups(repo_id, backend.location)
        return repo

    @classmethod
    def _create(cls, backend: Backend, encryption: str, passphrase: bytes | None,
                passphrase_source: keys.PassphraseSource = keys.CURRENT, like: Repository | None = None,
             unlocked: keys.Unlocked | None = None) -> Repository:
        if encryption not in keys.MODES:
            raise UsageError(f"unknown encryption {encryption!r}; choose one of {', '.join(keys.MODES)}")
        local = backend.root if isinstance(backend, LocalBackend) else None
        if local is not None:
            try:
                local.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                os.chmod(local, DIR_MODE)
            except OSError as exc:
                raise RepositoryUnusable(f"cannot create the repository at {local}: {exc.strerror}") from None
        repo_id = uuid.uuid4().hex
        if like is not None and not like.encrypted and encryption == keys.NONE:
            version, ids = like.version, like.chunk_id
        else:
            version, ids = FORMAT_VERSION, ChunkIds.tree()
        config: dict[str, Any] = {"format": FORMAT_NAME, "version": version, "id": repo_id, "created": utc_now()}
        store = None
        if encryption == keys.NONE:
            if version >= 2:
                config["chunk_id"] = ids.config()
        else:
            secret = passphrase if passphrase is not None else passphrase_source.get(confirm=True)
            master = keys.new_master_key()
            config["chunk_id"] = ChunkIds.tree(master).config()
            config["encryption"] = {"mode": encryption, "cipher": crypto.CIPHER_NAME}
            config["encryption"]["config_mac"] = _config_mac(config, master)
            store = keys.KeyStore(encryption, repo_id, backend)
            ours = keys.wrap(master, secret, repo_id)
            store.add(ours, create=True)  # the key first: config.json makes the repository exist
        try:
            backend.write("config.json", json.dumps(config, indent=1).encode() + b"\n", durable=True, exclusive=True)
        except FileExistsError:  # another run created it first: use theirs
            if store is not None and store.mode == keys.KEYFILE:
                store.file.unlink(missing_ok=True)
            elif store is not None:
                backend.delete(f"keys/{ours['id']}.json")
            return cls.open(backend, create=False, encryption=encryption, passphrase=secret if store else passphrase,
                            passphrase_source=passphrase_source)
        if store is None:
            return cls(backend, repo_id, local, version=version, chunk_id=ids)
        return cls._encrypted(backend, repo_id, FORMAT_VERSION, ChunkIds.tree(master), store, keys.Unlocked(master, ours["id"]))

    @property
    def encrypted(self) -> bool:
        return self.cipher is not None

    def unlocked_key(self) -> keys.Unlocked | None:
        """The opened key of an encrypted repository (None: not encrypted), for a serving child process."""
        if self.cipher is None or self.key_id is None:
            return None
        return keys.Unlocked(self.cipher.master_key, self.key_id)

    def local_name(self, name: str) -> str:
        """name as it may appear in lock and scratch names: keyed when encrypted."""
        return self.cipher.local_name(name) if self.cipher is not None else name

    @contextlib.contextmanager
    def lock(self, name: str, *, what: str, shared: bool = False, wait: float = 0.0) -> Iterator[None]:
        """Hold the lock called name: flock(2) on a local file for a directory repository,
        lock objects (docs/FORMAT.md, "Locks") for every other backend (encrypted like every object)."""
        if self.root is not None:
            with file_lock(self.lock_path(name), what=what, shared=shared, wait=wait):
                yield
            return
        with object_lock(self.backend, name, what=what, shared=shared, wait=wait) as held:
            self._held.append(held)
            if shared and name == "repository" and len(self._held) > 1:  # a VM's lock too: a backup or copy
                self._start_listing()
            try:
                yield
            finally:
                self._held.remove(held)
                self._present = None  # only a held lock keeps garbage collection from deleting chunks
                self._listing = None

    def remove_dead_locks(self, name: str) -> None:
        """Lock objects called name left by processes of this host that died (see lock.py); none for a directory."""
        if self.root is None:
            remove_dead_holders(self.backend, name)

    def check_locks(self) -> None:
        """Raise LockHeld if a lock object this run holds may have gone stale (see lock.py)."""
        for held in list(self._held):
            held.check()

    def lock_path(self, name: str) -> Path:
        """Where the lock file called name lives (locks are local files, whatever the backend)."""
        if self.root is None:
            raise RepositoryUnusable("this repository has no local directory for locks")
        locks = self.root / "locks"
        try:
            locks.mkdir(mode=DIR_MODE, exist_ok=True)
        except OSError:
            pass  # read-only: file_lock decides what that means
        return locks / f"{name}.lock"

    def local_dir(self, name: str) -> Path:
        """A private local directory: inside a directory repository, else below the
        local cache (/var/tmp/nbdbackup-<uid>/<repository id>/name)."""
        if self.root is not None:
            d = self.root / name
            d.mkdir(mode=DIR_MODE, exist_ok=True)
            return d
        base = LOCAL_CACHE / f"nbdbackup-{os.geteuid()}"
        for d in (base, base / self.id, base / self.id / name):
            d.mkdir(mode=DIR_MODE, exist_ok=True)
        return base / self.id / name

    # -- chunks ----------------------------------------------------------

    @staticmethod
    def _chunk_key(cid: bytes) -> str:
        h = cid.hex()
        return f"chunks/{h[:2]}/{h}"

    def put_chunk(self, cid: bytes, data: bytes | bytearray | memoryview, level: int, hashes: Sequence[bytes] | None = None) -> int:
        """Store data under cid (= self.chunk_id(data)) unless it is there already; returns bytes written.
        hashes: data's piece hashes when the caller has them (self.chunk_id.with_pieces), else computed
        here if the chunk file needs them.  data may be a view of a buffer the caller reuses as soon
        as this returns: nothing may keep it."""
        key = self._chunk_key(cid)
        present = self._known_chunks()
        if cid in present if present is not None else self.backend.exists(key):
            return 0
        parts = self.encode_chunk(data, level, hashes)
        self.backend.write(key, parts)
        self.new_chunks.add(cid)
        if present is not None:
            present.add(cid)
        return sum(len(p) for p in parts)

    def encode_chunk(self, data: bytes | bytearray | memoryview, level: int, hashes: Sequence[bytes] | None = None
                     ) -> list[bytes | bytearray | memoryview]:
        """The chunk file of data for this repository, as parts to write in order (chunks.encode):
        version 2 with its pieces' hashes (given, or computed here) when the ids are tree ids."""
        piece = self.chunk_id.piece
        if piece and hashes is None:
            hashes = self.chunk_id.piece_hashes(data)
        return chunks.encode(data, level, hashes or (), piece)

    def _known_chunks(self) -> set[bytes] | None:
        """The chunks in a repository that is not a directory, listed once while a lock is held
        (one request per 1000 chunks instead of a HEAD per chunk); None: ask the backend per chunk
        (a directory, or more than PRESENT_LIMIT chunks: memory)."""
        if self.root is not None or not self._held:
            return None
        with self._present_mutex:
            if self._present is None:
                first = self._listing.result() if self._listing is not None else None
                self._present = first if first is not None else self._list_chunks()
            return self._present if len(self._present) <= PRESENT_LIMIT else None

    def _list_chunks(self) -> set[bytes]:
        found: set[bytes] = set()
        for key in self.backend.list("chunks"):
            found.add(bytes.fromhex(key.rsplit("/", 1)[1]))
            if len(found) > PRESENT_LIMIT:
                break
        return found

    def _start_listing(self) -> None:
        """Start the chunk listing in a thread as soon as a backup holds its locks (garbage
        collection cannot delete a listed chunk from then on): it runs while QEMU prepares the
        backup instead of before its first chunk.  Only its first request (S3: up to 1000 chunks),
        so that runs that take these locks without storing chunks (copy, recover) waste one
        request at most; put_chunk lists the rest of a larger repository as before."""
        list_first = getattr(self.backend, "list_first", None)
        if list_first is None:
            return
        listing: Future = Future()

        def run() -> None:
            try:
                keys, complete = list_first("chunks")
                listing.set_result({bytes.fromhex(k.rsplit("/", 1)[1]) for k in keys} if complete else None)
            except BaseException:  # noqa: BLE001 - put_chunk lists again and reports what goes wrong
                listing.set_result(None)

        self._listing = listing
        threading.Thread(target=run, name="list-chunks", daemon=True).start()

    def get_chunk(self, cid: bytes, where: str) -> bytes | bytearray:
        """Chunk cid's content, checked, in memory of its own (serve's cache keeps it)."""
        backend = self.backend
        if not isinstance(backend, crypto.EncryptedBackend):
            return self.decode_chunk(self._fetch_chunk_transient(cid, where), cid, where)
        try:  # read and decrypted in this thread's buffer (decode copies out of it)
            plain = backend.read_plain_view(self._chunk_key(cid))
        except FileNotFoundError:
            raise _missing(cid, where) from None
        except crypto.ObjectDamaged as exc:
            raise RepositoryDamaged(f"chunk {cid.hex()} {exc.reason} ({where})") from None
        return chunks.decode(plain, cid, where, self.chunk_id)

    def check_chunk(self, cid: bytes, where: str) -> int:
        """Read and check chunk cid as get_chunk does, keeping nothing (verify): its content's
        length.  The chunk file and its content go through this thread's buffers, reused from
        chunk to chunk: no new memory per chunk, so none of its page faults."""
        return len(self.decode_chunk_into(self._fetch_chunk_transient(cid, where), cid, where, lambda n: _scratch("content", n)))

    def _fetch_chunk_transient(self, cid: bytes, where: str) -> bytes | memoryview:
        """fetch_chunk for a caller done with the chunk file before this thread reads the next
        one: from a directory it is read into this thread's reused buffer."""
        if not isinstance(self.backend, LocalBackend):
            return self.fetch_chunk(cid, where)
        try:
            return self.backend.read_into(self._chunk_key(cid), lambda n: _scratch("file", n))
        except FileNotFoundError:
            raise _missing(cid, where) from None

    def fetch_chunk(self, cid: bytes, where: str) -> bytes | memoryview:
        """The stored chunk file, unchecked (decode_chunk checks it): get_chunk in two steps, so
        downloads can run ahead of decompression (restore from S3)."""
        key, backend = self._chunk_key(cid), self.backend
        try:
            return backend.read_sealed(key) if isinstance(backend, crypto.EncryptedBackend) else backend.read(key)
        except FileNotFoundError:
            raise _missing(cid, where) from None

    def read_chunk_ranges(self, cid: bytes, where: str, ranges: Sequence[tuple[int, int]], out: memoryview, step: memoryview) -> None:
        """Copy the ranges (content offset, length) of chunk cid's content into out, one after
        another, every byte checked (chunks.read_ranges: version 3 decodes and checks only the
        pieces holding the ranges, older versions the whole chunk, in pieces through step).  From
        an unencrypted local directory only the parts of the chunk file needed are read; otherwise
        it is fetched (and decrypted) whole first."""
        with self._chunk_source(cid, where) as source:
            chunks.read_ranges(source, cid, where, self.chunk_id, ranges, out, step)

    @property
    def reads_pieces(self) -> bool:
        """Whether one piece of a chunk costs less than the chunk: tree ids (format 3), whose pieces
        are checked alone, unencrypted, so that a piece is read alone (from a file, or in ranges
        from an object store; an encrypted chunk is authenticated whole)."""
        return bool(self.chunk_id.piece) and self.cipher is None

    def read_chunk_piece(self, cid: bytes, where: str, i: int) -> memoryview:
        """Piece i of chunk cid's content (chunk_id.piece bytes, the last piece shorter), checked
        (chunks.read_piece), in a buffer of its own.  Tree ids only.  From an object store: two
        requests (the header with its table, then the piece), see reads_pieces."""
        with self._chunk_source(cid, where, ranged=self.reads_pieces) as source:
            return chunks.read_piece(source, cid, where, self.chunk_id, i)

    @contextlib.contextmanager
    def _chunk_source(self, cid: bytes, where: str, ranged: bool = False) -> Iterator[chunks.ChunkFile | bytes | memoryview]:
        """Chunk cid's file for reading in part: open, from an unencrypted local directory; with
        ranged, read in ranges from any other store; else fetched (and decrypted, into this
        thread's buffer) whole."""
        if isinstance(self.backend, LocalBackend):
            try:
                f = self.backend.open(self._chunk_key(cid))
            except FileNotFoundError:
                raise _missing(cid, where) from None
            with f:
                yield f
        elif ranged:
            try:
                yield RangedReader(self.backend, self._chunk_key(cid))
            except FileNotFoundError:
                raise _missing(cid, where) from None
        else:
            yield self._plain_chunk(self.fetch_chunk(cid, where), cid, where)

    def decode_chunk(self, blob: bytes | memoryview, cid: bytes, where: str) -> bytes | bytearray:
        """The content of the chunk file blob (from fetch_chunk): authenticated and decrypted when
        the repository is encrypted (into this thread's buffer: decode copies out of it), checked."""
        return chunks.decode(self._plain_chunk(blob, cid, where), cid, where, self.chunk_id)

    def decode_chunk_into(self, blob: bytes | memoryview, cid: bytes, where: str, buffer: Callable[[int], memoryview]) -> memoryview:
        """decode_chunk into a buffer the caller reuses (restore): buffer(length) gives one of at
        least the content's length; returns the view of it that holds the checked content."""
        return chunks.decode_into(self._plain_chunk(blob, cid, where), cid, where, self.chunk_id, buffer)

    def _plain_chunk(self, blob: bytes | memoryview, cid: bytes, where: str) -> bytes | memoryview:
        if self.cipher is None:
            return blob
        try:
            if isinstance(blob, memoryview) and not blob.readonly:  # read_sealed's own buffer: decrypted in place
                return self.cipher.open_in_place(self._chunk_key(cid), blob)
            return self.cipher.open_into(self._chunk_key(cid), blob)
        except crypto.ObjectDamaged as exc:
            raise RepositoryDamaged(f"chunk {cid.hex()} {exc.reason} ({where})") from None

    def referenced_chunks(self) -> set[bytes]:
        """Every chunk that a complete backup of any VM references."""
        used: set[bytes] = set()
        for vm in self.vms():
            for m in self.manifests(vm, strict=True):  # a damaged manifest stops GC: its chunks are unknown
                for d in m.disks:
                    used.update(e.chunk for e in self.read_index(m, d.id)[1])
        return used

    def stored_size(self, cids: set[bytes]) -> int:
        """Bytes the chunks cids take in the repository (those that exist)."""
        total = 0
        for cid in cids:
            try:
                total += self.backend.size(self._chunk_key(cid))
            except OSError:
                pass
        return total

    def remove_unreferenced(self, candidates: set[bytes] | None = None) -> tuple[int, int]:
        """Delete the chunks that no backup references (garbage collection), or only those of
        candidates (the chunks a failed run created); and leftovers of interrupted writes.
        The caller MUST hold the repository lock exclusively (docs/FORMAT.md, "Deleting chunks").
        Returns (chunks, bytes) freed."""
        if candidates is not None and not candidates:
            return 0, 0
        used = self.referenced_chunks()
        if candidates is None:
            keys = [k for k in self.backend.list("chunks") if bytes.fromhex(k.rsplit("/", 1)[1]) not in used]
        else:
            keys = [self._chunk_key(cid) for cid in candidates - used]
        freed = size = 0
        for key in keys:
            if freed % 256 == 0:
                self.check_locks()  # still ours: deleting many chunks takes a while
            try:
                size += self.backend.size(key)
            except FileNotFoundError:
                continue
            self.backend.delete(key)
            freed += 1
        self.backend.delete_partial_writes()
        self._present = None
        return freed, size

    # -- backups ---------------------------------------------------------

    @staticmethod
    def _backup_key(vm: str, checkpoint: str) -> str:
        check_name("VM", vm)
        check_name("checkpoint", checkpoint)
        return f"vms/{vm}/backups/{checkpoint}"

    def write_index(self, vm: str, checkpoint: str, disk_id: str, disk_size: int, entries: Sequence[IndexEntry]) -> str:
        check_name("disk", disk_id)
        blob = index.encode(disk_size, entries)
        self.backend.write(f"{self._backup_key(vm, checkpoint)}/{disk_id}.index", blob)
        return hashlib.sha256(blob).hexdigest()

    def read_index(self, m: Manifest, disk_id: str) -> tuple[int, list[IndexEntry]]:
        d = m.disk(disk_id)
        where = f"backup {m.checkpoint}, disk {disk_id}"
        if d is None:
            raise RepositoryDamaged(f"{where} is not in the manifest")
        try:
            blob = self.backend.read(f"{self._backup_key(m.vm, m.checkpoint)}/{disk_id}.index")
        except FileNotFoundError:
            raise RepositoryDamaged(f"index of {where} is missing") from None
        except crypto.ObjectDamaged as exc:
            raise RepositoryDamaged(f"index of {where} {exc.reason}") from None
        if hashlib.sha256(blob).hexdigest() != d.index_sha256:
            raise RepositoryDamaged(f"index of {where} does not match its manifest (truncated or modified)")
        size, entries = index.decode(blob, where)
        if size != d.size:
            raise RepositoryDamaged(f"index of {where} has disk size {size}, manifest says {d.size}")
        return size, entries

    def commit(self, m: Manifest) -> None:
        """Make the backup exist: everything it references durable first, then its manifest."""
        self.backend.sync()
        self.check_locks()  # a lock gone stale may no longer protect the chunks from garbage collection
        self.backend.write(f"{self._backup_key(m.vm, m.checkpoint)}/manifest.json", manifest.manifest_to_bytes(m), durable=True)
        if self.seen is not None:
            self.seen.add(m.vm, m.checkpoint)

    def manifest(self, vm: str, checkpoint: str) -> Manifest | None:
        key = f"{self._backup_key(vm, checkpoint)}/manifest.json"
        try:
            blob = self.backend.read(key)
        except FileNotFoundError:
            return None
        except crypto.ObjectDamaged as exc:
            raise RepositoryDamaged(f"manifest of backup {checkpoint} {exc.reason}") from None
        return manifest.manifest_from_bytes(blob, f"manifest of backup {checkpoint}")

    def manifests(self, vm: str, *, strict: bool = False) -> list[Manifest]:
        """Complete backups of vm, oldest first.

        A damaged manifest is skipped with a warning (one damaged backup must
        not hide the others), or raises RepositoryDamaged when strict.
        """
        found = []
        for name in self.backup_names(vm):
            try:
                m = self.manifest(vm, name)
            except RepositoryDamaged as exc:
                if strict:
                    raise
                log.warning("skipping backup %s of %s: %s (run `nbdbackup verify %s`)", name, vm, exc, vm)
                continue
            if m is not None:
                found.append(m)
        return sorted(found, key=lambda m: (m.created, m.checkpoint))

    def backup_names(self, vm: str) -> list[str]:
        """Checkpoint names of vm's backups (folders holding a manifest), sorted; no manifest is read.

        Unlike manifests(), this lists a backup whose manifest is damaged, so a
        check can report it by name.
        """
        check_name("VM", vm)
        names = set()
        for key in self.backend.list(f"vms/{vm}/backups"):
            parts = key.split("/")
            if len(parts) == 5 and parts[4] == "manifest.json":
                names.add(parts[3])
        if self.seen is not None:  # encrypted: a backup this host saw must not vanish unrecorded
            self.seen.check(vm, names, lambda: self.removed_backups(vm))
        return sorted(names)

    def removed_backups(self, vm: str) -> set[str]:
        """Backups of vm that removal records name (encrypted repositories: see seen.py).
        A record failing authentication is ignored (the store cannot excuse a deletion)."""
        names: set[str] = set()
        for key in self.backend.list(f"vms/{vm}/removed"):
            try:
                doc = json.loads(self.backend.read(key))
                if doc.get("format") != REMOVAL_FORMAT or doc.get("vm") != vm:
                    raise ValueError
                names.update(str(n) for n in doc["backups"])
            except FileNotFoundError:
                continue
            except (crypto.ObjectDamaged, ValueError, KeyError, TypeError, AttributeError):
                log.warning("ignoring the damaged removal record %s of %s", key.rsplit("/", 1)[-1], vm)
        return names

    def incomplete_backups(self, vm: str) -> list[str]:
        """Backup folders without a manifest: left by a run that did not finish."""
        check_name("VM", vm)
        files: dict[str, set[str]] = {}
        for key in self.backend.list(f"vms/{vm}/backups"):
            parts = key.split("/")
            if len(parts) == 5:
                files.setdefault(parts[3], set()).add(parts[4])
        if self.seen is not None:  # before anything is cleaned up: a withheld manifest is not an unfinished run
            self.seen.check(vm, (cp for cp, names in files.items() if "manifest.json" in names), lambda: self.removed_backups(vm))
        return sorted(cp for cp, names in files.items() if "manifest.json" not in names)

    def delete_backup(self, vm: str, checkpoint: str) -> None:
        """Manifest first (the backup stops existing), then its indexes.  Encrypted: a removal
        record before anything (durable), so that no host takes the deletion for a rollback."""
        base = self._backup_key(vm, checkpoint)
        if self.seen is not None and self.backend.exists(f"{base}/manifest.json"):  # else never complete, never seen
            record = {"format": REMOVAL_FORMAT, "version": 1, "vm": vm, "backups": [checkpoint], "removed": utc_now()}
            self.backend.write(f"vms/{vm}/removed/{uuid.uuid4().hex}.json", json.dumps(record).encode(), durable=True)
        self.backend.delete(f"{base}/manifest.json")
        self.backend.sync()
        for key in list(self.backend.list(base)):
            self.backend.delete(key)
        self.backend.remove_folder(base)
        if self.seen is not None:
            self.seen.forget(vm, checkpoint)

    def vms(self) -> list[str]:
        found = sorted({k.split("/")[1] for k in self.backend.list("vms")})
        if self.seen is not None:
            for vm in set(self.seen.vms()) - set(found):  # a VM whose every object is gone
                self.backup_names(vm)
        return found

    # -- checkpoint records ----------------------------------------------

    def checkpoints(self, vm: str) -> list[CheckpointRecord]:
        check_name("VM", vm)
        try:
            blob = self.backend.read(f"vms/{vm}/checkpoints.json")
        except FileNotFoundError:
            return []
        except crypto.ObjectDamaged as exc:
            raise RepositoryDamaged(f"checkpoint records of {vm} {exc.reason}") from None
        return manifest.checkpoints_from_bytes(blob, f"checkpoint records of {vm}")

    def save_checkpoints(self, vm: str, records: Sequence[CheckpointRecord]) -> None:
        check_name("VM", vm)
        blob = manifest.checkpoints_to_bytes(list(records))
        self.backend.write(f"vms/{vm}/checkpoints.json", blob, durable=True)


_scratch_buffers = threading.local()


def _scratch(name: str, size: int) -> memoryview:
    """This thread's reusable buffer `name`, of at least size bytes (4 MiB at least: a chunk)."""
    buf = getattr(_scratch_buffers, name, None)
    if buf is None or len(buf) < size:
        buf = memoryview(bytearray(max(size, 4 << 20)))
        setattr(_scratch_buffers, name, buf)
    return buf


def _missing(cid: bytes, where: str) -> RepositoryDamaged:
    return RepositoryDamaged(f"chunk {cid.hex()} is missing ({where})")
