"""restore: write the images of a backup point."""

from __future__ import annotations

import click

from .common import Globals, interruptible, pass_globals, progress_bar


@click.command()
@click.argument("vm")
@click.option("--to", "checkpoint", required=True, metavar="CHECKPOINT", help="Backup point to restore ('latest' for the newest).")
@click.option("--output", required=True, metavar="DIR", type=click.Path(file_okay=False), help="Directory for the restored images.")
@click.option("--format", "fmt", type=click.Choice(["qcow2", "raw"]), default="qcow2", show_default=True, help="Image format.")
@click.option("--disk", "disks", multiple=True, metavar="ID", help="Restore only this disk (repeatable).")
@click.option("--force", is_flag=True, help="Overwrite existing images in DIR (never one a running process, such as a VM, writes).")
@click.option("--json", "as_json", is_flag=True, help="Print the restored images as a JSON array of {disk, path, format}.")
@pass_globals
def restore(g: Globals, vm: str, checkpoint: str, output: str, fmt: str, disks: tuple[str, ...], force: bool, as_json: bool) -> None:
    """Write DIR/<disk>.<format> for each disk, identical to the disk at CHECKPOINT.

    Prints the path of each image.
    """
    from pathlib import Path

    from .. import engine
    from ..capture import Tuning
    from ..names import check_name
    from ..restore import RestoreRequest

    settings = g.settings(needs_config=False)
    check_name("VM", vm)
    for d in disks:
        check_name("disk", d)
    req = RestoreRequest(vm=vm, checkpoint=checkpoint, output=Path(output), format=fmt, disks=disks, force=force)
    with interruptible() as cancel, progress_bar("restore") as observer:
        paths = engine.restore(settings, req, tuning=Tuning(), cancel=cancel, observer=observer)
    if as_json:
        import json

        click.echo(json.dumps([{"disk": p.name.rsplit(".", 1)[0], "path": str(p), "format": fmt} for p in paths], indent=2))
        return
    for p in paths:
        click.echo(str(p))


