"""The bounded parallel pipeline shared by backup (capture) and restore.

    with Pipeline(workers, depth, connect) as pipe:
        for item in items:
            pipe.submit(work, item, tag)      # blocks while `depth` items are in flight
        pipe.drain()
    # on_done(result, tag) was called for each, in the caller's thread

Each worker thread opens its own NBD connection on first use (the exports
advertise multi-conn; libnbd releases the GIL while it waits); all of them
are closed on exit.  Memory stays bounded by `depth` items.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable
from typing import Any

from .nbdio import NbdEndpoint


class Pipeline:
    def __init__(self, workers: int, depth: int, connect: Callable[[], NbdEndpoint], on_done: Callable[[Any, Any], None],
                 name: str = "nbdbackup") -> None:
        self.depth = depth
        self.on_done = on_done
        self._connect = connect
        self._local = threading.local()
        self._endpoints: list[NbdEndpoint] = []
        self._lock = threading.Lock()
        self._pool = cf.ThreadPoolExecutor(workers, name)
        self._inflight: dict[cf.Future, Any] = {}

    def endpoint(self) -> NbdEndpoint:
        """This thread's connection (opened on first use)."""
        if not hasattr(self._local, "endpoint"):
            self._local.endpoint = self._connect()
            with self._lock:
                self._endpoints.append(self._local.endpoint)
        return self._local.endpoint

    def local(self) -> threading.local:
        """Per-thread storage for the work functions (e.g. a cache)."""
        return self._local

    def submit(self, work: Callable[..., Any], item: Any, tag: Any) -> None:
        while len(self._inflight) >= self.depth:
            done, _ = cf.wait(self._inflight, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                self.on_done(fut.result(), self._inflight.pop(fut))
        self._inflight[self._pool.submit(work, item)] = tag

    def drain(self) -> None:
        for fut in cf.as_completed(list(self._inflight)):
            self.on_done(fut.result(), self._inflight.pop(fut))

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._pool.shutdown(wait=True)  # lets work in flight end (it checks for cancellation first)
        finally:
            for endpoint in self._endpoints:
                endpoint.close()
