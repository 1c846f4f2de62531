"""Retention policy (restic's semantics): which backups to keep, and why.  Pure logic.

Backups are walked newest first.  keep-last N keeps the N newest.  keep-hourly N
keeps the newest backup of each of the N most recent hours that have backups;
daily, weekly (ISO week), monthly and yearly likewise.  Times are UTC.  A
backup kept for any reason is kept; the newest backup and the backup at the
newest checkpoint (the base of the next incremental) are always kept.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, field
from datetime import datetime

from .errors import UsageError
from .records import Manifest

BUCKETS = {
    "hourly": "%Y-%m-%d %H:00",
    "daily": "%Y-%m-%d",
    "weekly": "%G-W%V",
    "monthly": "%Y-%m",
    "yearly": "%Y",
}


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if value < 0:
                raise UsageError(f"--keep-{name} must not be negative")

    @property
    def empty(self) -> bool:
        return not any(self.__dict__.values())


@dataclass(frozen=True)
class Decision:
    manifest: Manifest
    keep: bool
    reasons: tuple[str, ...] = field(default=())


def parse_created(created: str) -> datetime:
    return datetime.fromisoformat(created.replace("Z", "+00:00"))


def decide(manifests: list[Manifest], policy: Policy, *, protect: Set[str] = frozenset()) -> list[Decision]:
    """One decision per backup, oldest first.  protect: checkpoints kept whatever the policy."""
    if policy.empty:
        raise UsageError("no retention policy given", hint="pass at least one --keep-* option (or set retention in the config file)")
    newest_first = sorted(manifests, key=lambda m: (m.created, m.checkpoint), reverse=True)
    reasons: dict[str, list[str]] = {m.checkpoint: [] for m in manifests}
    for i, m in enumerate(newest_first[: policy.last]):
        reasons[m.checkpoint].append(f"last #{i + 1}")
    for kind, fmt in BUCKETS.items():
        wanted = getattr(policy, kind)
        seen: list[str] = []
        for m in newest_first:
            if len(seen) >= wanted:
                break
            bucket = parse_created(m.created).strftime(fmt)
            if bucket not in seen:
                seen.append(bucket)
                reasons[m.checkpoint].append(f"{kind} {bucket}")
    if newest_first:
        reasons[newest_first[0].checkpoint].append("newest backup")
    for name in protect:
        if name in reasons:
            reasons[name].append("base of the next incremental")
    return [Decision(m, bool(reasons[m.checkpoint]), tuple(reasons[m.checkpoint]))
            for m in sorted(manifests, key=lambda m: (m.created, m.checkpoint))]
