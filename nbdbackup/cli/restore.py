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
    from ..restore import RestoreRequest

    req = RestoreRequest(vm=vm, checkpoint=checkpoint, output=Path(output), format=fmt, disks=disks, force=force)
    with interruptible() as cancel, progress_bar("restore") as observer:
        images = engine.restore(g.settings(needs_config=False), req, cancel=cancel, observer=observer)
    if as_json:
        import json

        click.echo(json.dumps([{"disk": i.disk, "path": str(i.path), "format": i.format} for i in images], indent=2))
        return
    for i in images:
        click.echo(str(i.path))
