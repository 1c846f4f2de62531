"""The repository: content-addressed chunks, per-backup indexes and manifests.

The format is specified in docs/FORMAT.md; this package is its reference
implementation.  Storage goes through a small Backend interface
(backend.py) so that an object store can be added beside the local
directory without touching the format code.
"""

from .backend import Backend, LocalBackend
from .repository import FORMAT_VERSION, Repository

__all__ = ["Backend", "LocalBackend", "Repository", "FORMAT_VERSION"]
