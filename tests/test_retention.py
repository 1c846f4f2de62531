"""Retention rules (pure logic, restic semantics)."""

from datetime import UTC, datetime, timedelta

import pytest

from nbdbackup.errors import UsageError
from nbdbackup.records import Manifest
from nbdbackup.retention import Policy, decide


def backups(times):
    return [Manifest(vm="vm1", checkpoint=f"cp{i:03d}", kind="incremental", since=None,
                     created=t.isoformat().replace("+00:00", "Z"), chain="c", disks=()) for i, t in enumerate(times)]


START = datetime(2026, 1, 1, 0, 30, tzinfo=UTC)
HOURLY_FOR_10_DAYS = backups([START + timedelta(hours=h) for h in range(240)])


def kept(decisions):
    return [d.manifest.checkpoint for d in decisions if d.keep]


def test_keep_last():
    assert kept(decide(HOURLY_FOR_10_DAYS, Policy(last=3))) == ["cp237", "cp238", "cp239"]


def test_keep_daily_keeps_the_newest_of_each_day():
    k = kept(decide(HOURLY_FOR_10_DAYS, Policy(daily=3)))
    assert k == ["cp191", "cp215", "cp239"]  # 23:30 of the last three days


def test_policies_add_up_and_reasons_are_given():
    decisions = decide(HOURLY_FOR_10_DAYS, Policy(last=2, hourly=3, daily=2, weekly=1, monthly=1, yearly=1))
    assert kept(decisions) == ["cp215", "cp237", "cp238", "cp239"]
    newest = decisions[-1]
    assert "last #1" in newest.reasons and "daily 2026-01-10" in newest.reasons and "yearly 2026" in newest.reasons


def test_newest_and_protected_backups_are_always_kept():
    assert kept(decide(HOURLY_FOR_10_DAYS, Policy(yearly=1), protect={"cp010"})) == ["cp010", "cp239"]


def test_an_empty_policy_is_refused():
    with pytest.raises(UsageError):
        decide(HOURLY_FOR_10_DAYS, Policy())
    with pytest.raises(UsageError):
        Policy(last=-1)
