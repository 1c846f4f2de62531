"""mount / umount: the guest filesystems of a backup point, read-only, under a directory."""

from __future__ import annotations

import click

from .common import Globals, interruptible, pass_globals


@click.command()
@click.argument("vm")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=True))
@click.option("--to", "checkpoint", required=True, metavar="CHECKPOINT", help="Backup point to mount ('latest' for the newest).")
@click.option("--disk", "disks", multiple=True, metavar="ID", help="Only this disk (repeatable).")
@pass_globals
def mount(g: Globals, vm: str, directory: str, checkpoint: str, disks: tuple[str, ...]) -> None:
    """Make the guest filesystems of CHECKPOINT readable under the empty directory DIR.

    Each filesystem appears at DIR/<disk>/p<N> (partition N) or DIR/<disk>
    (a filesystem on the whole disk), read-only. Stays mounted until
    `nbdbackup umount DIR`. Needs root, FUSE, nbdkit and loop devices.
    """
    from pathlib import Path

    from .. import engine
    from ..mounting import MountRequest

    req = MountRequest(vm=vm, checkpoint=checkpoint, directory=Path(directory), disks=disks)
    with interruptible() as cancel:
        result = engine.mount(g.settings(), req, cancel=cancel)
    for m in result.mounted:
        click.echo(f"{m.path}\t{m.fstype}")
    for s in result.skipped:
        click.echo(f"nbdbackup: not mounted: disk {s.disk}{' ' + s.partition if s.partition else ''}: {s.reason}", err=True)
    if not result.mounted:
        click.echo(f"nbdbackup: backup {result.checkpoint} of {vm} has no filesystem to mount; `nbdbackup umount {directory}` cleans up", err=True)


@click.command()
@click.argument("directory", metavar="DIR", type=click.Path())
def umount(directory: str) -> None:
    """Unmount what `nbdbackup mount` set up at DIR and stop its servers."""
    from pathlib import Path

    from .. import engine

    engine.umount(Path(directory))
