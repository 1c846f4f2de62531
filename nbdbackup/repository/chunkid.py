"""How a repository names its chunks: the one place that computes chunk ids.

A repository's config.json says how (docs/FORMAT.md, "Chunk ids"):

    version 1                                        SHA-256 of the content
    version 2, "chunk_id": {"algorithm": "blake3"}   BLAKE3 (32 bytes) of the content
    version 2, "chunk_id": {"algorithm": "blake3-keyed"}
                                                     BLAKE3 keyed with a key derived from the
                                                     repository's master key (encrypted
                                                     repositories: the store cannot test a guess)

Everything else (capture, verify, restore) asks the repository's ChunkIds
for ids and never hashes content itself.  Encryption (a later version)
builds ChunkIds.keyed(master_key) once it has unwrapped the master key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import RepositoryDamaged, RepositoryUnusable

Buffer = bytes | bytearray | memoryview

SHA256, BLAKE3, BLAKE3_KEYED = "sha256", "blake3", "blake3-keyed"
# The BLAKE3 derive_key context for the chunk-id key of an encrypted repository (never change it).
KEYED_CONTEXT = "nbdbackup 2026-11 chunk id key v2"


@dataclass(frozen=True)
class ChunkIds:
    """Computes the 32-byte id of a chunk's content.  Thread-safe; releases the GIL on large inputs."""

    algorithm: str
    _digest: Callable[[Buffer], bytes]
    _new: Callable[[], Any]  # an incremental hasher: update(data) as often as needed, then digest()

    def __call__(self, data: Buffer) -> bytes:
        return self._digest(data)

    def hasher(self) -> Any:
        """A new incremental hasher (update(data)..., digest()): the same id as self(whole content)."""
        return self._new()

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
    def for_config(cls, version: int, config: Mapping[str, Any], where: str, *, master_key: bytes | None = None) -> ChunkIds:
        """The ids a repository with this config.json uses (version already checked as known)."""
        if version == 1:
            return cls.sha256()
        spec = config.get("chunk_id")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("algorithm"), str):
            raise RepositoryDamaged(f"{where} is damaged: it does not say how chunks are named")
        algorithm = spec["algorithm"]
        if algorithm == BLAKE3:
            return cls.blake3()
        if algorithm == BLAKE3_KEYED and master_key is not None:
            return cls.keyed(master_key)
        if algorithm == BLAKE3_KEYED:
            raise RepositoryDamaged(f"{where} is damaged: keyed chunk ids without an 'encryption' member")
        raise RepositoryUnusable(f"{where}: chunks are named with {algorithm!r}, which this nbdbackup does not know",
                                 hint="upgrade nbdbackup")

    def config(self) -> dict[str, Any]:
        """The "chunk_id" member of a version 2 config.json."""
        return {"algorithm": self.algorithm}


def derive_chunk_id_key(master_key: bytes) -> bytes:
    """The 32-byte BLAKE3 key for chunk ids, from an encrypted repository's master key."""
    from blake3 import blake3

    if len(master_key) < 32:
        raise ValueError("the master key must be at least 32 bytes")
    return blake3(master_key, derive_key_context=KEYED_CONTEXT).digest()
