"""Encryption of a repository's objects and names (docs/FORMAT.md, "Encryption").

Everything here uses the `cryptography` package (AES-256-GCM, AES-SIV) and
BLAKE3's key derivation; nothing is hand-written.  From the master key:

    object key   BLAKE3-derive_key("nbdbackup 2026-11 object key v2", master)  32 bytes, AES-256-GCM
    name key     BLAKE3-derive_key("nbdbackup 2026-11 name key v2", master)    64 bytes, AES-SIV (AES-256)
    local key    BLAKE3-derive_key("nbdbackup 2026-11 local name key v2", master)  keyed BLAKE3 of local names
    chunk-id key chunkid.derive_chunk_id_key(master)

An encrypted object is

    offset  size  field
    0       4     magic b"NBDE"
    4       1     version (1)
    5       1     cipher (1 = AES-256-GCM)
    6       2     reserved, zero
    8       12    nonce (random)
    20      ...   ciphertext, then the 16-byte GCM tag

with associated data = the 8 header bytes + the object's logical key (UTF-8),
so an object moved to another name fails authentication.

EncryptedBackend wraps any Backend: it encrypts what is written, decrypts and
authenticates what is read, and replaces the VM, checkpoint and disk names in
keys by their AES-SIV encryption, so the backend below never sees either.
"""

from __future__ import annotations

import base64
import logging
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# The cryptography package is imported only once a repository is encrypted (Cipher), so
# unencrypted repositories do not pay its memory (Debian's, on the system's OpenSSL: about
# 6 MiB; a PyPI wheel with its own OpenSSL: about 10 MiB).  Any version from 38 on: objects are
# decrypted through the streaming interface (older AESGCM.decrypt takes only bytes).
from ..errors import RepositoryDamaged
from .backend import Backend, Buffers, LocalBackend

log = logging.getLogger(__name__)

MAGIC = b"NBDE"
VERSION = 1
AES_256_GCM = 1
CIPHER_NAME = "aes-256-gcm"
HEADER = struct.Struct("<4sBBH")
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = HEADER.size + NONCE_SIZE + TAG_SIZE
SEAL_SLICE = 256 * 1024  # seal_stream: ciphertext made and written this much at a time (64 KiB: +25% CPU in writing)
NAME_PAD = 64  # names are at most 64 characters (names.py): padded, so the length does not show

OBJECT_CONTEXT = "nbdbackup 2026-11 object key v2"
NAME_CONTEXT = "nbdbackup 2026-11 name key v2"
LOCAL_CONTEXT = "nbdbackup 2026-11 local name key v2"


def _invalid_tag() -> type[Exception]:
    from cryptography.exceptions import InvalidTag

    return InvalidTag


def derive(master_key: bytes, context: str, length: int = 32) -> bytes:
    from blake3 import blake3

    return blake3(master_key, derive_key_context=context).digest(length=length)


class ObjectDamaged(RepositoryDamaged):
    """An object failed authentication (changed, truncated, or moved from another name)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key} {reason}")
        self.key = key
        self.reason = reason


_local = threading.local()


def _buffer(size: int, name: str = "buf") -> memoryview:
    """This thread's output buffer called name, at least size bytes (grown, never shrunk).

    Mapped memory of its own, not from the allocator: a long-lived buffer in a worker thread's
    malloc arena would pin the freed chunk-sized blocks around it there (the arena can only give
    memory back from its top), which cost a restore ~8 MiB of peak memory."""
    buf = getattr(_local, name, None)
    if buf is None or len(buf) < size:
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        setattr(_local, name, buf)
    return memoryview(buf)


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()


def _unb32(text: str) -> bytes:
    return base64.b32decode(text.upper() + "=" * (-len(text) % 8))


@dataclass(frozen=True)
class Cipher:
    """The keys of one unlocked repository."""

    master_key: bytes
    _object_key: bytes = field(init=False, repr=False)
    _siv: Any = field(init=False, repr=False)  # AESSIV
    _local: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_object_key", derive(self.master_key, OBJECT_CONTEXT))
        from cryptography.hazmat.primitives.ciphers.aead import AESSIV

        object.__setattr__(self, "_siv", AESSIV(derive(self.master_key, NAME_CONTEXT, 64)))
        object.__setattr__(self, "_local", derive(self.master_key, LOCAL_CONTEXT))

    # -- objects -----------------------------------------------------------

    def seal(self, key: str, data: Buffers, *, nonce: bytes | None = None) -> bytes:
        """The encrypted object for key.  nonce: only for test vectors; never reuse one."""
        return b"".join(self.seal_parts(key, data, nonce=nonce))

    def seal_parts(self, key: str, data: Buffers, *, nonce: bytes | None = None) -> list[bytes | memoryview]:
        """The encrypted object as parts to write in order: header and nonce, ciphertext, tag.

        The same AES-256-GCM as AESGCM.encrypt, through the streaming interface, so that the
        parts of data are encrypted straight into a per-thread buffer (no copies: a backup's
        memory stays as without encryption).  The ciphertext part is valid until this thread's
        next call: the caller writes it at once (Backend.write returns only when done)."""
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
        views = [memoryview(p).cast("B") for p in parts]
        total = sum(len(v) for v in views)
        header = HEADER.pack(MAGIC, VERSION, AES_256_GCM, 0)
        nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
        from cryptography.hazmat.primitives.ciphers import Cipher as _Cipher
        from cryptography.hazmat.primitives.ciphers import algorithms, modes

        encryptor: Any = _Cipher(algorithms.AES(self._object_key), modes.GCM(nonce)).encryptor()  # older stubs: bytes only
        encryptor.authenticate_additional_data(header + key.encode())
        buf = _buffer(total + 32)
        done = 0
        for v in views:
            done += encryptor.update_into(v, buf[done:])
        done += len(encryptor.finalize())
        return [header + nonce, buf[:done], encryptor.tag]

    def seal_stream(self, key: str, data: Buffers) -> Iterator[bytes | memoryview]:
        """seal() as parts made one at a time: header and nonce, ciphertext in slices of at most
        SEAL_SLICE bytes, tag.  Each ciphertext slice lives in this thread's small buffer until the
        next is asked for, so the consumer writes it first (LocalBackend.write with an iterator):
        a backup's memory does not grow by a chunk-sized buffer per thread."""
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
        header = HEADER.pack(MAGIC, VERSION, AES_256_GCM, 0)
        nonce = os.urandom(NONCE_SIZE)
        from cryptography.hazmat.primitives.ciphers import Cipher as _Cipher
        from cryptography.hazmat.primitives.ciphers import algorithms, modes

        encryptor: Any = _Cipher(algorithms.AES(self._object_key), modes.GCM(nonce)).encryptor()  # older stubs: bytes only
        encryptor.authenticate_additional_data(header + key.encode())
        yield header + nonce
        buf = _buffer(SEAL_SLICE + 32, "slice")
        for part in parts:
            view = memoryview(part).cast("B")
            for start in range(0, len(view), SEAL_SLICE):
                done = encryptor.update_into(view[start:start + SEAL_SLICE], buf)
                yield buf[:done]
        rest = encryptor.finalize()
        if rest:
            yield rest
        yield encryptor.tag

    def open(self, key: str, blob: bytes) -> bytes:
        """The plaintext of the encrypted object blob stored as key; ObjectDamaged if it fails authentication."""
        nonce, sealed, aad = self._split(key, blob)
        n = len(sealed) - TAG_SIZE
        decryptor = self._decryptor(nonce, sealed[n:], aad)
        plain = decryptor.update(sealed[:n])
        self._finalize(key, decryptor)
        return plain

    def open_into(self, key: str, blob: bytes | memoryview) -> memoryview:
        """open(), decrypted into this thread's buffer (no new allocation per object: chunks on a
        restore): valid until this thread's next open_into, so the caller uses it at once."""
        nonce, sealed, aad = self._split(key, blob)
        n = len(sealed) - TAG_SIZE
        # The streaming interface (as AESGCM.decrypt, which older cryptography only takes bytes for):
        # update_into wants room for one more block than it writes.
        out = _buffer(n + 32, "plain")
        decryptor = self._decryptor(nonce, sealed[n:], aad)
        done = decryptor.update_into(sealed[:n], out)
        self._finalize(key, decryptor)
        return out[:done]

    def open_in_place(self, key: str, sealed_object: memoryview) -> memoryview:
        """open(), decrypting the writable buffer sealed_object where it is: a restore holds one
        buffer per chunk read, as without encryption, and decrypts it in one call (no copy, the
        GIL released throughout).  GCM is a stream cipher, so OpenSSL decrypts in place (output =
        input, as its EVP interface allows); update_into wants room for 15 bytes more than it
        writes, which the 16-byte tag behind the ciphertext gives (the tag was copied out first
        and is not overwritten: exactly the ciphertext's length is written).  The plaintext is
        returned only once the tag is checked."""
        nonce, sealed, aad = self._split(key, sealed_object)
        n = len(sealed) - TAG_SIZE
        decryptor = self._decryptor(nonce, sealed[n:], aad)
        done = decryptor.update_into(sealed[:n], sealed) if n else 0
        if done != n:  # a stream cipher writes what it is given; anything else is no AES-GCM
            raise ObjectDamaged(key, "fails authentication (changed, truncated or swapped)")
        self._finalize(key, decryptor)
        return sealed[:n]

    def _decryptor(self, nonce: bytes, tag: memoryview, aad: bytes) -> Any:
        from cryptography.hazmat.primitives.ciphers import Cipher as _Cipher
        from cryptography.hazmat.primitives.ciphers import algorithms, modes

        decryptor = _Cipher(algorithms.AES(self._object_key), modes.GCM(nonce, bytes(tag))).decryptor()
        decryptor.authenticate_additional_data(aad)
        return decryptor

    @staticmethod
    def _finalize(key: str, decryptor: Any) -> None:
        try:
            decryptor.finalize()
        except _invalid_tag():
            raise ObjectDamaged(key, "fails authentication (changed, truncated or swapped)") from None

    def _split(self, key: str, blob: bytes | memoryview) -> tuple[bytes, memoryview, bytes]:
        """(nonce, ciphertext and tag, associated data) of an encrypted object; ObjectDamaged if it is none."""
        if len(blob) < OVERHEAD:
            raise ObjectDamaged(key, "is truncated")
        magic, version, cipher, _ = HEADER.unpack_from(blob)
        if magic != MAGIC or version != VERSION or cipher != AES_256_GCM:
            raise ObjectDamaged(key, "is not an encrypted object of this repository (bad header)")
        view = memoryview(blob)
        return bytes(view[HEADER.size:HEADER.size + NONCE_SIZE]), view[HEADER.size + NONCE_SIZE:], bytes(view[:HEADER.size]) + key.encode()

    # -- names ---------------------------------------------------------------

    def encrypt_name(self, role: str, parent: str, name: str) -> str:
        raw = name.encode()
        if len(raw) > NAME_PAD:
            raise ValueError(f"name {name!r} is longer than {NAME_PAD} bytes")
        return _b32(self._siv.encrypt(raw.ljust(NAME_PAD, b"\0"), [role.encode(), parent.encode()]))

    def decrypt_name(self, role: str, parent: str, text: str) -> str | None:
        """The name, or None when text is not a name this key wrote in that place."""
        try:
            raw = self._siv.decrypt(_unb32(text), [role.encode(), parent.encode()])
        except (_invalid_tag(), ValueError):
            return None
        return raw.rstrip(b"\0").decode(errors="replace")

    def local_name(self, name: str) -> str:
        """A stable name for local files (locks, scratch) that does not show name."""
        from blake3 import blake3

        return "k" + blake3(name.encode(), key=self._local).hexdigest(length=12)


# Logical key layout (repository.py): which parts are names, and their roles.
#   vms/<vm>/checkpoints.json
#   vms/<vm>/backups/<checkpoint>/manifest.json
#   vms/<vm>/backups/<checkpoint>/<disk>.index
INDEX_SUFFIX = ".index"


class EncryptedBackend:
    """A Backend that encrypts objects and names on the way to `inner` (any Backend)."""

    def __init__(self, inner: Backend, cipher: Cipher) -> None:
        self.inner = inner
        self.cipher = cipher

    # -- names -----------------------------------------------------------

    def physical(self, key: str) -> str:
        parts = key.split("/")
        if parts[0] != "vms" or len(parts) < 2:
            return key
        c = self.cipher
        vm = parts[1]
        out = ["vms", c.encrypt_name("vm", "", vm)]
        if len(parts) > 2:
            out.append(parts[2])
        if len(parts) > 3 and parts[2] == "backups":
            out.append(c.encrypt_name("checkpoint", vm, parts[3]))
            if len(parts) > 4:
                leaf = parts[4]
                if leaf.endswith(INDEX_SUFFIX):
                    leaf = c.encrypt_name("disk", f"{vm}/{parts[3]}", leaf[:-len(INDEX_SUFFIX)]) + INDEX_SUFFIX
                out.append(leaf)
            out += parts[5:]
        else:
            out += parts[3:]
        return "/".join(out)

    def logical(self, key: str) -> str | None:
        parts = key.split("/")
        if parts[0] != "vms" or len(parts) < 2:
            return key
        c = self.cipher
        vm = c.decrypt_name("vm", "", parts[1])
        if vm is None:
            return None
        out = ["vms", vm]
        if len(parts) > 2:
            out.append(parts[2])
        if len(parts) > 3 and parts[2] == "backups":
            cp = c.decrypt_name("checkpoint", vm, parts[3])
            if cp is None:
                return None
            out.append(cp)
            if len(parts) > 4:
                leaf = parts[4]
                if leaf.endswith(INDEX_SUFFIX):
                    disk = c.decrypt_name("disk", f"{vm}/{cp}", leaf[:-len(INDEX_SUFFIX)])
                    if disk is None:
                        return None
                    leaf = disk + INDEX_SUFFIX
                out.append(leaf)
            out += parts[5:]
        else:
            out += parts[3:]
        return "/".join(out)

    # -- Backend ---------------------------------------------------------

    def read(self, key: str) -> bytes:
        return self.cipher.open(key, self.inner.read(self.physical(key)))

    def read_plain_view(self, key: str) -> memoryview:
        """read(), as a view the caller uses at once: a local directory reads the object into a
        new buffer and decrypts it there, in place (one buffer per object read, as an unencrypted
        read; kept per thread instead, the buffers would stay allocated between reads); other
        backends decrypt into this thread's buffer (valid until its next call)."""
        if isinstance(self.inner, LocalBackend):
            return self.cipher.open_in_place(key, self.inner.read_into(self.physical(key), lambda size: memoryview(bytearray(size))))
        return self.cipher.open_into(key, self.inner.read(self.physical(key)))

    def read_sealed(self, key: str) -> bytes | memoryview:
        """The object as stored, still encrypted (decrypted later).  From a local directory: read into
        this thread's reused buffer, which Cipher.open_in_place decrypts where it is, valid until this
        thread's next read_sealed (restore decodes each chunk in the thread that read it): one buffer
        per thread instead of one per chunk read, and no second one to decrypt into.  Other backends:
        a new bytes object (S3 downloads run ahead, in other threads)."""
        if isinstance(self.inner, LocalBackend):
            return self.inner.read_into(self.physical(key), lambda size: _buffer(size, "sealed"))
        return self.inner.read(self.physical(key))

    def write(self, key: str, data: Buffers, *, durable: bool = False, exclusive: bool = False) -> None:
        # A local directory writes the ciphertext while it is made (a small buffer per thread); other
        # backends take the whole object at once (S3 sends it in one request).
        if isinstance(self.inner, LocalBackend):
            self.inner.write(self.physical(key), self.cipher.seal_stream(key, data), durable=durable, exclusive=exclusive)
        else:
            self.inner.write(self.physical(key), self.cipher.seal_parts(key, data), durable=durable, exclusive=exclusive)

    def exists(self, key: str) -> bool:
        return self.inner.exists(self.physical(key))

    def list(self, prefix: str) -> Iterator[str]:
        for key in self.inner.list(self.physical(prefix)):
            name = self.logical(key)
            if name is None:
                log.warning("ignoring %s in the repository: not written with this repository's key", key)
                continue
            yield name

    def delete(self, key: str) -> None:
        self.inner.delete(self.physical(key))

    def size(self, key: str) -> int:
        return self.inner.size(self.physical(key))

    def remove_folder(self, prefix: str) -> None:
        self.inner.remove_folder(self.physical(prefix))

    def delete_partial_writes(self) -> None:
        self.inner.delete_partial_writes()

    def sync(self) -> None:
        self.inner.sync()

    def __getattr__(self, name: str):  # backend-specific extras (e.g. a local root) pass through
        return getattr(self.inner, name)
