"""list: the backups of a VM."""

from __future__ import annotations

import json

import click

from .common import Globals, human_size, pass_globals


@click.command("list")
@click.argument("vm")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@pass_globals
def list_(g: Globals, vm: str, as_json: bool) -> None:
    """List the backups of VM, oldest first."""
    from .. import engine

    manifests = engine.list_backups(g.settings(), vm)
    rows = [
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


