"""A backend in memory: for fast tests of everything above the Backend interface.

It keeps the contract of backend.Backend exactly (atomic replace, exclusive
create, listing below a folder, FileNotFoundError for missing keys), so tests
written against it hold for the directory and S3 backends too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from .backend import Buffers


class MemoryBackend:
    atomic_exclusive = True

    def __init__(self, name: str = "memory") -> None:
        self.location = f"memory:{name}"
        self._objects: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _check(key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/") or key.endswith("/"):
            raise ValueError(f"bad repository key {key!r}")
        return key

    def read(self, key: str) -> bytes:
        with self._lock:
            try:
                return self._objects[self._check(key)][0]
            except KeyError:
                raise FileNotFoundError(key) from None

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        with self._lock:
            try:
                return self._objects[self._check(key)][0][offset:offset + length]
            except KeyError:
                raise FileNotFoundError(key) from None

    def write(self, key: str, data: Buffers, *, durable: bool = False, exclusive: bool = False) -> None:
        blob = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else b"".join(bytes(p) for p in data)
        with self._lock:
            if exclusive and self._check(key) in self._objects:
                raise FileExistsError(key)
            self._objects[self._check(key)] = (blob, time.monotonic())

    def exists(self, key: str) -> bool:
        with self._lock:
            return self._check(key) in self._objects

    def list(self, prefix: str) -> Iterator[str]:
        folder = prefix.rstrip("/") + "/" if prefix else ""
        with self._lock:
            keys = [k for k in self._objects if k.startswith(folder)]
        yield from keys

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(self._check(key), None)

    def size(self, key: str) -> int:
        return len(self.read(key))

    def age(self, key: str) -> float:
        with self._lock:
            try:
                return time.monotonic() - self._objects[self._check(key)][1]
            except KeyError:
                raise FileNotFoundError(key) from None

    def remove_folder(self, prefix: str) -> None:
        pass

    def delete_partial_writes(self) -> None:
        pass

    def sync(self) -> None:
        pass
