"""prune: apply a retention policy, then free unreferenced chunks."""

from __future__ import annotations

import json
import logging

import click

from . import logs
from .common import Globals, human_size, pass_globals, plural, qmp_option

KEEP = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def keep_options(f):
    for kind in reversed(KEEP):
        what = "newest backups" if kind == "last" else f"{kind} backups (the newest of each of the N most recent {kind[:-2] if kind != 'daily' else 'day'}s)"
        f = click.option(f"--keep-{kind}", kind, type=int, metavar="N", help=f"Keep the N {what}." if kind == "last" else f"Keep N {what}.")(f)
    return f


@click.command()
@click.argument("vm", required=False)
@click.option("--all", "all_vms", is_flag=True, help="Every VM of the config file that has a retention setting.")
@qmp_option
@keep_options
@click.option("--dry-run", is_flag=True, help="Print what would be kept and removed, and why; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the decisions as JSON.")
@pass_globals
def prune(g: Globals, vm: str | None, all_vms: bool, qmp: str | None, dry_run: bool, as_json: bool, **keep: int | None) -> None:
    """Remove backups outside a retention policy (restic semantics, UTC).

    When the VM is reachable, their checkpoints are deleted in QEMU too, each
    merged into the previous one so that the others stay usable; then chunks
    that no backup of any VM references are freed.  The newest backup and the backup at the newest
    checkpoint are always kept.  Without --keep-* options, the VM's
    `retention` setting in the config file applies.
    """
    from pathlib import Path

    from .. import engine
    from ..errors import UsageError
    from ..prune import PruneRequest

    if all_vms == (vm is not None):
        raise UsageError("give either a VM or --all")
    req = PruneRequest(vm=vm, all_vms=all_vms, keep={k: v for k, v in keep.items() if v is not None},
                       qmp=Path(qmp) if qmp else None, dry_run=dry_run)
    outcome = engine.prune(g.settings(), req)
    if vm is not None:  # not --all
        _print(vm, outcome.reports[vm], dry_run, as_json)
        _finish(outcome)
        return
    for name, exc in outcome.failures.items():
        logs.summary(f"prune {name} FAILED (exit {exc.exit_code}): {exc}", level=logging.ERROR, stderr=True)
    garbage = outcome.garbage
    if as_json:
        click.echo(json.dumps({"vms": [{"vm": n, **_as_dict(r, dry_run)} for n, r in outcome.reports.items()],
                               "garbage": _garbage_dict(garbage)}, indent=2))
        for name, report in outcome.reports.items():
            _log(name, report, dry_run)
    else:
        for name, report in outcome.reports.items():
            _print(name, report, dry_run, False)
        if garbage and garbage.done:
            click.echo(f"freed {plural(garbage.freed_chunks, 'chunk')} ({human_size(garbage.freed_bytes)})")
    if garbage and garbage.done:
        logs.summary(f"prune --all: freed {plural(garbage.freed_chunks, 'chunk')} ({human_size(garbage.freed_bytes)})", stderr=False)
    _finish(outcome)


def _garbage_dict(garbage) -> dict | None:
    if garbage is None:
        return None
    return {"done": garbage.done, "freed_chunks": garbage.freed_chunks, "freed_bytes": garbage.freed_bytes, "note": garbage.note}


def _finish(outcome) -> None:
    """Say why chunks were not freed; then the run's error, if any (damage: exit 6, after the report)."""
    if outcome.garbage is not None and not outcome.garbage.done:
        logs.warning(outcome.garbage.note)
    if outcome.error:
        raise outcome.error


def _as_dict(report, dry_run: bool) -> dict:
    return {
        "dry_run": dry_run,
        "backups": [{"checkpoint": d.manifest.checkpoint, "created": d.manifest.created, "kind": d.manifest.kind,
                     "keep": d.keep, "reasons": list(d.reasons)} for d in report.decisions],
        "checkpoints_deleted": list(report.checkpoints_deleted),
        "freed_chunks": report.garbage.freed_chunks if report.garbage else 0,
        "freed_bytes": report.garbage.freed_bytes if report.garbage else 0,
        "garbage": _garbage_dict(report.garbage),
        "notes": list(report.notes),
    }


def _print(vm: str, report, dry_run: bool, as_json: bool) -> None:
    doc = _as_dict(report, dry_run)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        for r in doc["backups"]:
            verdict = "keep" if r["keep"] else ("would remove" if dry_run else "remove")
            click.echo(f"{vm:<16} {verdict:<12} {r['checkpoint']:<28} {r['created']:<24} {', '.join(r['reasons'])}")
        if not dry_run:
            click.echo(f"{vm:<16} {_removed(report)}")
    _log(vm, report, dry_run)


def _log(vm: str, report, dry_run: bool) -> None:
    """The VM's warnings (stderr, log file, syslog) and summary line (log file, syslog)."""
    for note in report.notes:
        logs.warning(f"{vm}: {note}")
    if not dry_run:
        logs.summary(f"prune {vm}: {_removed(report)}", stderr=False)  # the same line is on stdout


def _removed(report) -> str:
    removed = sum(not d.keep for d in report.decisions)
    kept = len(report.decisions) - removed
    freed = (f"; freed {plural(report.garbage.freed_chunks, 'chunk')} ({human_size(report.garbage.freed_bytes)})"
             if report.garbage and report.garbage.done else "")
    return f"removed {plural(removed, 'backup')}, kept {kept}{freed}"
