"""How a repository names its chunks: the one place that computes chunk ids.

A repository's config.json says how (docs/FORMAT.md, "Chunk ids"):

    version 1                                        SHA-256 of the content
    version 2, "chunk_id": {"algorithm": "blake3"}   BLAKE3 (32 bytes) of the content
    version 2, "chunk_id": {"algorithm": "blake3-keyed"}
                                                     BLAKE3 keyed with a key derived from the
                                                     repository's master key (encrypted
                                                     repositories: the store cannot test a guess)
    version 3, "chunk_id": {"algorithm": "blake3-tree", "piece": 262144}
                        (or "blake3-tree-keyed")     the content hashed in pieces, the id a hash
                                                     of the pieces' hashes: a part of a chunk can
                                                     be checked without the rest (chunks.py)

Everything else (capture, verify, restore) asks the repository's ChunkIds
for ids and never hashes content itself.  An encrypted repository builds
ChunkIds.keyed(master_key) (version 2) or ChunkIds.tree(master_key) (version 3)
once it has unwrapped the master key.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import RepositoryDamaged, RepositoryUnusable

Buffer = bytes | bytearray | memoryview

SHA256, BLAKE3, BLAKE3_KEYED = "sha256", "blake3", "blake3-keyed"
TREE, TREE_KEYED = "blake3-tree", "blake3-tree-keyed"
# The BLAKE3 derive_key context for the chunk-id key of an encrypted repository (never change it).
KEYED_CONTEXT = "nbdbackup 2026-11 chunk id key v2"
# Tree ids (version 3): the derive_key contexts of the piece key and the root key (never change them).
PIECE_CONTEXT = "nbdbackup 2026-11 chunk piece key v3"
ROOT_CONTEXT = "nbdbackup 2026-11 chunk root key v3"
UNKEYED_MATERIAL = b"nbdbackup unkeyed"  # their key material in an unencrypted repository
PIECE = 256 * 1024  # the piece size of tree ids: what a reader decodes and checks at least to read a byte
_ROOT_PREFIX = struct.Struct("<IQ")  # piece size, content length


@dataclass(frozen=True)
class ChunkIds:
    """Computes the 32-byte id of a chunk's content.  Thread-safe; releases the GIL on large inputs."""

    algorithm: str
    _digest: Callable[[Buffer], bytes]
    _new: Callable[[], Any] | None  # an incremental hasher (update(data) as often as needed, then digest()); None: tree ids
    piece: int = 0  # tree ids: the size of the pieces hashed one by one; 0: the content is hashed whole
    _piece_key: bytes = b""
    _root_key: bytes = b""

    def __call__(self, data: Buffer) -> bytes:
        return self._digest(data)

    def hasher(self) -> Any:
        """A new incremental hasher (update(data)..., digest()): the same id as self(whole content).
        Ids that hash the content whole only: tree ids are checked piece by piece (piece_hash, root)."""
        if self._new is None:
            raise TypeError(f"{self.algorithm} ids are checked piece by piece, not with an incremental hasher")
        return self._new()

    # -- tree ids (self.piece > 0) --------------------------------------------------------

    def with_pieces(self, data: Buffer) -> tuple[bytes, tuple[bytes, ...]]:
        """(the id of data, its pieces' hashes); the hashes are () for ids that are not tree ids.
        A writer stores the hashes in the chunk file (chunks.encode) so that readers can check
        any piece alone."""
        if not self.piece:
            return self._digest(data), ()
        hashes = self.piece_hashes(data)
        return self.root(len(data), b"".join(hashes)), hashes

    def piece_hashes(self, data: Buffer) -> tuple[bytes, ...]:
        from blake3 import blake3

        view = memoryview(data)
        key, step = self._piece_key, self.piece
        return tuple(blake3(view[at:at + step], key=key).digest() for at in range(0, len(view), step))

    def piece_hash(self, piece: Buffer) -> bytes:
        from blake3 import blake3

        return blake3(piece, key=self._piece_key).digest()

    def root(self, length: int, table: Buffer) -> bytes:
        """The id of content of length bytes whose pieces' hashes, one after another, are table."""
        from blake3 import blake3

        h = blake3(_ROOT_PREFIX.pack(self.piece, length), key=self._root_key)
        h.update(table)
        return h.digest()

    @classmethod
    def sha256(cls) -> ChunkIds:
        return cls(SHA256, lambda data: hashlib.sha256(data).digest(), hashlib.sha256)

    @classmethod
    def blake3(cls) -> ChunkIds:
        from blake3 import blake3  # imported only where chunks are hashed

        return cls(BLAKE3, lambda data: blake3(data).digest(), blake3)

    @classmethod
    def keyed(cls, master_key: bytes) -> ChunkIds:
        """Encrypted repositories: BLAKE3 keyed with derive_chunk_id_key(master_key)."""
        from blake3 import blake3

        key = derive_chunk_id_key(master_key)
        return cls(BLAKE3_KEYED, lambda data: blake3(data, key=key).digest(), lambda: blake3(key=key))

    @classmethod
    def tree(cls, master_key: bytes | None = None, piece: int = PIECE) -> ChunkIds:
        """Version 3: tree ids, keyed with keys derived from master_key (encrypted repositories) or
        from a fixed constant (unencrypted ones: the contexts still keep pieces and roots apart)."""
        from blake3 import blake3

        material = UNKEYED_MATERIAL if master_key is None else master_key
        if master_key is not None and len(master_key) < 32:
            raise ValueError("the master key must be at least 32 bytes")
        piece_key = blake3(material, derive_key_context=PIECE_CONTEXT).digest()
        root_key = blake3(material, derive_key_context=ROOT_CONTEXT).digest()
        ids: ChunkIds = cls(TREE if master_key is None else TREE_KEYED, lambda data: ids.with_pieces(data)[0], None,
                            piece, piece_key, root_key)
        return ids

    @classmethod
    def for_config(cls, version: int, config: Mapping[str, Any], where: str, *, master_key: bytes | None = None) -> ChunkIds:
        """The ids a repository with this config.json uses (version already checked as known)."""
        if version == 1:
            return cls.sha256()
        spec = config.get("chunk_id")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("algorithm"), str):
            raise RepositoryDamaged(f"{where} is damaged: it does not say how chunks are named")
        algorithm = spec["algorithm"]
        known = {BLAKE3: 2, BLAKE3_KEYED: 2, TREE: 3, TREE_KEYED: 3}  # the version each belongs to
        if algorithm not in known:
            raise RepositoryUnusable(f"{where}: chunks are named with {algorithm!r}, which this nbdbackup does not know",
                                     hint="upgrade nbdbackup")
        if known[algorithm] != version:
            raise RepositoryDamaged(f"{where} is damaged: chunk ids {algorithm!r} in a version {version} repository")
        keyed = algorithm in (BLAKE3_KEYED, TREE_KEYED)
        if keyed and master_key is None:
            raise RepositoryDamaged(f"{where} is damaged: keyed chunk ids without an 'encryption' member")
        if master_key is not None and not keyed:
            raise RepositoryDamaged(f"{where} is damaged: an encrypted repository with unkeyed chunk ids")
        if algorithm in (BLAKE3, BLAKE3_KEYED):
            return cls.blake3() if master_key is None else cls.keyed(master_key)
        piece = spec.get("piece")
        if isinstance(piece, bool) or not isinstance(piece, int) or not 4096 <= piece <= 1 << 24 or piece & (piece - 1):
            raise RepositoryDamaged(f"{where} is damaged: bad chunk piece size {piece!r}")
        return cls.tree(master_key, piece)

    def config(self) -> dict[str, Any]:
        """The "chunk_id" member of a version 2 or 3 config.json."""
        return {"algorithm": self.algorithm, "piece": self.piece} if self.piece else {"algorithm": self.algorithm}


def derive_chunk_id_key(master_key: bytes) -> bytes:
    """The 32-byte BLAKE3 key for chunk ids, from an encrypted repository's master key."""
    from blake3 import blake3

    if len(master_key) < 32:
        raise ValueError("the master key must be at least 32 bytes")
    return blake3(master_key, derive_key_context=KEYED_CONTEXT).digest()
