"""copy: copy backups of a VM to another repository (off-site copies)."""

from __future__ import annotations

import json

import click

from .common import Globals, human_size, interruptible, pass_globals, progress_bar


@click.command("copy")
@click.argument("vm")
@click.option("--to", "target", required=True, metavar="REPO", help="The repository to copy to: a directory or s3://BUCKET/PREFIX (created if new).")
@click.option("--checkpoint", metavar="NAME", help="Copy the backup at this checkpoint (default: the newest backup).")
@click.option("--all", "every", is_flag=True, help="Copy every backup of VM that the target lacks.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@pass_globals
def copy(g: Globals, vm: str, target: str, checkpoint: str | None, every: bool, as_json: bool) -> None:
    """Copy backups of VM from --repo to REPO, sending only the chunks REPO lacks.

    Every chunk is checked against its checksum before it is sent; a backup
    appears in REPO only once all of it is there.  Restores from REPO work as
    from the original.  The [s3] settings of the config file apply to both.
    """
    from .. import engine
    from ..copy import CopyRequest
    from ..errors import UsageError

    if every and checkpoint:
        raise UsageError("give --checkpoint or --all, not both")
    req = CopyRequest(vm, checkpoint, every, target=target)
    with interruptible() as cancel, progress_bar("copy") as observer:
        report = engine.copy(g.settings(), req, cancel=cancel, observer=observer)
    rows = [{"checkpoint": b.checkpoint, "copied": b.copied, "chunks_sent": b.chunks_sent, "chunks_present": b.chunks_present,
             "bytes_sent": b.bytes_sent} for b in report.backups]
    if as_json:
        click.echo(json.dumps({"vm": vm, "target": report.target, "backups": rows}, indent=2))
        return
    for b in report.backups:
        if b.copied:
            click.echo(f"{b.checkpoint}: copied, {b.chunks_sent} chunks sent ({human_size(b.bytes_sent)}), {b.chunks_present} already there")
        else:
            click.echo(f"{b.checkpoint}: already in {report.target}")
