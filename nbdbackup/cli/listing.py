"""list: the backups of a VM, or (without a VM) the VMs in the repository."""

from __future__ import annotations

import json
from typing import Any

import click

from .common import Globals, human_size, pass_globals, plural


@click.command("list")
@click.argument("vm", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@pass_globals
def list_(g: Globals, vm: str | None, as_json: bool) -> None:
    """List the backups of VM, oldest first; without VM, the VMs in the repository."""
    from .. import engine

    settings = g.settings(needs_config=False)
    if vm is None:
        _list_vms(settings, as_json)
        return
    manifests = engine.list_backups(settings, vm)
    rows: list[dict[str, Any]] = [
        {
            "checkpoint": m.checkpoint,
            "kind": m.kind,
            "since": m.since,
            "created": m.created,
            "disks": [{"id": d.id, "size": d.size} for d in m.disks],
            "stored_bytes": m.stored_bytes,
            "read_bytes": m.read_bytes,
        }
        for m in manifests
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no backups of {vm}", err=True)
        return
    click.echo(f"{'CHECKPOINT':<28} {'KIND':<12} {'CREATED':<24} {'DISKS':<24} {'STORED':>10}")
    for r in rows:
        disks = ",".join(f"{d['id']}:{human_size(d['size'])}" for d in r["disks"])
        click.echo(f"{r['checkpoint']:<28} {r['kind']:<12} {r['created']:<24} {disks:<24} {human_size(r['stored_bytes']):>10}")


def _list_vms(settings, as_json: bool) -> None:
    from .. import engine

    rows: list[dict[str, Any]] = [{"vm": r.vm, "backups": r.backups, "newest": r.newest.checkpoint if r.newest else None,
             "newest_created": r.newest.created if r.newest else None, "stored_bytes": r.stored_bytes} for r in engine.list_vms(settings)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no backups in {settings.repo}", err=True)
        return
    click.echo(f"{'VM':<20} {'BACKUPS':>7}  {'NEWEST':<28} {'CREATED':<24} {'STORED':>10}")
    for r in rows:
        click.echo(f"{r['vm']:<20} {r['backups']:>7}  {r['newest'] or '-':<28} {r['newest_created'] or '-':<24} {human_size(r['stored_bytes']):>10}")
    total = sum(r["backups"] for r in rows)
    click.echo(f"{plural(len(rows), 'VM')}, {plural(total, 'backup')}", err=True)
