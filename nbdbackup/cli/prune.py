"""prune: apply a retention policy, then free unreferenced chunks."""

from __future__ import annotations

import json

import click

from .common import Globals, pass_globals, qmp_option

KEEP = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def keep_options(f):
    for kind in reversed(KEEP):
        what = "newest backups" if kind == "last" else f"{kind} backups (the newest of each of the N most recent {kind[:-2] if kind != 'daily' else 'day'}s)"
        f = click.option(f"--keep-{kind}", kind, type=int, metavar="N", help=f"Keep N {what}.")(f)
    return f


@click.command()
@click.argument("vm")
@qmp_option
@keep_options
@click.option("--dry-run", is_flag=True, help="Print what would be kept and removed, and why; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the decisions as JSON.")
@pass_globals
def prune(g: Globals, vm: str, qmp: str | None, dry_run: bool, as_json: bool, **keep: int | None) -> None:
    """Remove backups outside a retention policy (restic semantics, UTC).

    Their checkpoints are deleted in QEMU the seed's way (merged into the
    previous one) when the VM is reachable; then chunks that no backup of any
    VM references are freed.  The newest backup and the backup at the newest
    checkpoint are always kept.  Without --keep-* options, the VM's
    `retention` setting in the config file applies.
    """
    from .. import engine
    from ..retention import Policy

    settings = g.settings()
    vmconf = settings.vm(vm, qmp, required=False)
    given = {k: v for k, v in keep.items() if v is not None}
    policy = Policy(**(given or vmconf.retention))
    report = engine.prune(settings, vmconf, policy, dry_run=dry_run)
    rows = [{"checkpoint": d.manifest.checkpoint, "created": d.manifest.created, "kind": d.manifest.kind,
             "keep": d.keep, "reasons": list(d.reasons)} for d in report.decisions]
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "backups": rows, "checkpoints_deleted": list(report.checkpoints_deleted),
                               "freed_chunks": report.freed_chunks, "freed_bytes": report.freed_bytes,
                               "notes": list(report.notes)}, indent=2))
    else:
        for r in rows:
            verdict = "keep  " if r["keep"] else ("would remove" if dry_run else "remove")
            click.echo(f"{verdict:<12} {r['checkpoint']:<28} {r['created']:<24} {', '.join(r['reasons'])}")
        if not dry_run:
            click.echo(f"removed {sum(not r['keep'] for r in rows)} backups, freed {report.freed_chunks} chunks ({report.freed_bytes} bytes)")
    for note in report.notes:
        click.echo(f"nbdbackup: {note}", err=True)
