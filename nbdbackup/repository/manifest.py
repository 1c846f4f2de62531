"""Manifests (one per backup) and checkpoint records (one file per VM), as JSON.

Each JSON document carries "sha256": the SHA-256 of its canonical form
(sorted keys, no spaces, UTF-8) computed with the "sha256" key absent.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..errors import RepositoryDamaged, RepositoryUnusable
from ..records import CheckpointRecord, DiskBackup, Manifest

MANIFEST_VERSION = 1


def seal(doc: dict[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != "sha256"}
    body["sha256"] = _digest(body)
    return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"


def unseal(blob: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        raise RepositoryDamaged(f"{where} is not valid JSON (truncated or modified)") from None
    if not isinstance(doc, dict) or doc.get("sha256") != _digest({k: v for k, v in doc.items() if k != "sha256"}):
        raise RepositoryDamaged(f"{where} fails its checksum (truncated or modified)")
    return doc


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_to_bytes(m: Manifest) -> bytes:
    return seal(
        {
            "version": MANIFEST_VERSION,
            "vm": m.vm,
            "checkpoint": m.checkpoint,
            "kind": m.kind,
            "since": m.since,
            "created": m.created,
            "chain": m.chain,
            "disks": [
                {
                    "id": d.id,
                    "size": d.size,
                    "index_sha256": d.index_sha256,
                    "data_bytes": d.data_bytes,
                    "read_bytes": d.read_bytes,
                    "full_read": d.full_read,
                }
                for d in m.disks
            ],
            "removed_disks": list(m.removed_disks),
            "stored_bytes": m.stored_bytes,
            "read_bytes": m.read_bytes,
            "duration_ms": round(m.duration * 1000),
        }
    )


def manifest_from_bytes(blob: bytes, where: str) -> Manifest:
    doc = unseal(blob, where)
    if doc.get("version") != MANIFEST_VERSION:
        raise RepositoryUnusable(f"{where} has manifest version {doc.get('version')}, this nbdbackup reads {MANIFEST_VERSION}", hint="upgrade nbdbackup")
    try:
        return Manifest(
            vm=doc["vm"],
            checkpoint=doc["checkpoint"],
            kind=doc["kind"],
            since=doc["since"],
            created=doc["created"],
            chain=doc["chain"],
            disks=tuple(DiskBackup(**d) for d in doc["disks"]),
            removed_disks=tuple(doc["removed_disks"]),
            stored_bytes=doc["stored_bytes"],
            read_bytes=doc["read_bytes"],
            duration=doc["duration_ms"] / 1000,
        )
    except (KeyError, TypeError) as exc:
        raise RepositoryDamaged(f"{where} has a missing or unexpected field: {exc}") from None


def checkpoints_to_bytes(records: list[CheckpointRecord]) -> bytes:
    return seal(
        {
            "version": MANIFEST_VERSION,
            "checkpoints": [
                {"name": r.name, "created": r.created, "chain": r.chain, "disks": list(r.disks), "bitmap": r.bitmap, "state": r.state,
                 "counts": dict(sorted(r.counts.items()))} for r in records
            ],
        }
    )


def checkpoints_from_bytes(blob: bytes, where: str) -> list[CheckpointRecord]:
    doc = unseal(blob, where)
    if doc.get("version") != MANIFEST_VERSION:
        raise RepositoryUnusable(f"{where} has version {doc.get('version')}, this nbdbackup reads {MANIFEST_VERSION}", hint="upgrade nbdbackup")
    try:
        for r in doc["checkpoints"]:
            counts = r.get("counts", {})
            if not isinstance(counts, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in counts.values()):
                raise TypeError(f"counts of {r.get('name')!r} must map disk ids to integers")
        return [
            CheckpointRecord(name=r["name"], created=r["created"], chain=r["chain"], disks=tuple(r["disks"]), bitmap=r["bitmap"], state=r["state"],
                             counts=dict(r.get("counts", {})))
            for r in doc["checkpoints"]
        ]
    except (KeyError, TypeError) as exc:
        raise RepositoryDamaged(f"{where} has a missing or unexpected field: {exc}") from None
