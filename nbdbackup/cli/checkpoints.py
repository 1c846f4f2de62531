"""checkpoints, delete: the checkpoint chain."""

from __future__ import annotations

import json

import click

from .common import Globals, human_size, pass_globals, qmp_option


@click.command()
@click.argument("vm")
@qmp_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@pass_globals
def checkpoints(g: Globals, vm: str, qmp: str | None, as_json: bool) -> None:
    """Show the checkpoint chain as QEMU and the repository see it.

    Changes nothing (the twin check adds two temporary bitmaps per disk and removes them at once).

    STATE is ok, missing, inconsistent, altered, busy, pending, orphan (a bitmap of
    this repository that none of its checkpoints accounts for) or foreign (another repository's); USABLE
    says whether `incremental --since` that checkpoint would be accepted; DIRTY
    is what its bitmaps hold (changes until the next checkpoint, per disk).
    """
    from pathlib import Path

    from .. import engine

    rows = engine.checkpoint_status(g.settings(), engine.CheckpointsRequest(vm, Path(qmp) if qmp else None))
    if as_json:
        click.echo(json.dumps([
            {"name": r.name, "created": r.created or None, "state": r.state, "active": r.active, "usable": r.usable,
             "dirty_bytes": r.dirty_bytes, "problems": list(r.problems)} for r in rows], indent=2))
        return
    if not rows:
        click.echo(f"no checkpoints for {vm}", err=True)
        return
    click.echo(f"{'CHECKPOINT':<28} {'CREATED':<24} {'STATE':<13} {'ACTIVE':<6} {'USABLE':<6} DIRTY")
    for r in rows:
        dirty = ",".join(f"{d}:{human_size(n)}" for d, n in sorted(r.dirty_bytes.items()))
        click.echo(f"{r.name:<28} {r.created or '-':<24} {r.state:<13} {'yes' if r.active else '':<6} {'yes' if r.usable else '':<6} {dirty}")
    for r in rows:
        for p in r.problems:
            click.echo(f"nbdbackup: {r.name}: {p}", err=True)


@click.command()
@click.argument("vm")
@click.argument("checkpoint")
@qmp_option
@click.option("--keep-backup", is_flag=True, help="Keep the backup made at CHECKPOINT (it stays restorable).")
@pass_globals
def delete(g: Globals, vm: str, checkpoint: str, qmp: str | None, keep_backup: bool) -> None:
    """Delete CHECKPOINT anywhere in the chain, on all disks in one transaction.

    Its bitmap is merged into the previous checkpoint's (which becomes active if
    CHECKPOINT was the newest), so every other checkpoint stays usable. Its backup
    is deleted too unless --keep-backup; other backups stay restorable.
    """
    from pathlib import Path

    from .. import engine

    engine.delete_checkpoint(g.settings(), engine.DeleteRequest(vm, checkpoint, keep_backup, Path(qmp) if qmp else None))


