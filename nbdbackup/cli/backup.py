"""full, incremental, auto: make a backup."""

from __future__ import annotations

import click

from .common import Globals, interruptible, pass_globals, progress_bar, qmp_option


def _backup(g: Globals, vm: str, qmp: str | None, mode: str, checkpoint: str | None, since: str | None) -> None:
    from .. import engine
    from ..backup import BackupRequest
    from ..names import check_name

    settings = g.settings()
    vmconf = settings.vm(vm, qmp)
    for kind, value in (("checkpoint", checkpoint), ("checkpoint", since)):
        if value is not None and value != "latest":
            check_name(kind, value)  # before touching the VM
    req = BackupRequest(vm=vm, mode=mode, checkpoint=checkpoint, since=since, disks=vmconf.disks, exclude=vmconf.exclude,
                        tuning=engine.tuning_for(vmconf))
    with interruptible() as cancel, progress_bar("backup") as observer:
        result = engine.backup(settings, vmconf, req, cancel=cancel, observer=observer)
    for note in result.notes:
        click.echo(f"nbdbackup: {note}", err=True)
    click.echo(result.manifest.checkpoint)


@click.command()
@click.argument("vm")
@qmp_option
@click.option("--checkpoint", metavar="NAME", help="Name of the new checkpoint (default: generated, sortable by time).")
@pass_globals
def full(g: Globals, vm: str, qmp: str | None, checkpoint: str | None) -> None:
    """Back up every qcow2 disk of VM at one instant; start a new checkpoint chain.

    Prints the new checkpoint's name.
    """
    _backup(g, vm, qmp, "full", checkpoint, None)


@click.command()
@click.argument("vm")
@qmp_option
@click.option("--since", metavar="CHECKPOINT", help="Back up changes since this checkpoint (default: latest, the newest).")
@click.option("--checkpoint", metavar="NAME", help="Name of the new checkpoint.")
@pass_globals
def incremental(g: Globals, vm: str, qmp: str | None, since: str | None, checkpoint: str | None) -> None:
    """Back up what changed since a checkpoint, and create a new one.

    Exit 4 (nothing written) when the chain from CHECKPOINT to now cannot be
    trusted; `nbdbackup auto` then makes a full backup.
    """
    _backup(g, vm, qmp, "incremental", checkpoint, since)


@click.command()
@click.argument("vm")
@qmp_option
@click.option("--checkpoint", metavar="NAME", help="Name of the new checkpoint.")
@pass_globals
def auto(g: Globals, vm: str, qmp: str | None, checkpoint: str | None) -> None:
    """Incremental since the newest checkpoint if the chain is sound, else full (for cron)."""
    _backup(g, vm, qmp, "auto", checkpoint, None)


