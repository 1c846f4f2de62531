"""recover: start a lost VM from a backup point now, copy its disks home meanwhile."""

from __future__ import annotations

import click

from .common import Globals, interruptible, pass_globals, progress_bar, qmp_option


@click.command()
@click.argument("vm")
@click.option("--to", "checkpoint", required=True, metavar="CHECKPOINT", help="Backup point to recover ('latest' for the newest).")
@click.option("--output", required=True, metavar="DIR", type=click.Path(file_okay=False), help="Directory for the VM's new images, DIR/<disk>.qcow2.")
@qmp_option
@click.option("--disk", "disks", multiple=True, metavar="ID", help="Recover only this disk (repeatable).")
@click.option("--speed", type=click.IntRange(min=1), metavar="MIB", help="Copy at most MIB MiB/s per disk (default: as fast as possible).")
@pass_globals
def recover(g: Globals, vm: str, checkpoint: str, output: str, qmp: str | None, disks: tuple[str, ...], speed: int | None) -> None:
    """Run VM from the backup at CHECKPOINT at once; copy its disks into DIR meanwhile.

    Creates DIR/<disk>.qcow2 (empty images whose backing file is the backup,
    served by nbdkit on DIR/.nbdbackup-recover.sock), prints them, then waits
    for the VM's QMP socket: start the VM on these images, with rerror=stop and
    werror=stop on each disk device. nbdbackup then copies every block into
    the images (block-stream) while the VM runs, shows progress, and exits when
    the VM no longer needs the backup. Run the same command again to resume an
    interrupted recovery.
    """
    import sys
    from pathlib import Path

    from .. import engine
    from ..recovering import RecoverRequest

    req = RecoverRequest(vm=vm, checkpoint=checkpoint, output=Path(output), qmp=Path(qmp) if qmp else None, disks=disks,
                         speed=(speed or 0) * 1024 * 1024)

    def images(result) -> None:
        for img in result.images:
            click.echo(str(img.path))
        sys.stdout.flush()
        what = "resuming the recovery" if result.resumed else "images ready"
        click.echo(f"nbdbackup: {what} of {vm} from backup {result.checkpoint}", err=True)

    def waiting(socket: Path) -> None:
        click.echo(f"nbdbackup: waiting for the VM's QMP socket {socket}: start the VM on these images now", err=True)

    with interruptible() as cancel, progress_bar("recover") as observer:
        result = engine.recover(g.settings(), req, cancel=cancel, observer=observer, on_images=images, on_wait=waiting)
    click.echo(f"nbdbackup: recovery of {vm} complete: it runs on {', '.join(str(i.path) for i in result.images)} alone; "
               "the backup is no longer needed", err=True)
