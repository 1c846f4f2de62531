"""serve: the disks of a backup point as NBD exports, until interrupted."""

from __future__ import annotations

import click

from .common import Globals, interruptible, pass_globals


@click.command()
@click.argument("vm")
@click.option("--to", "checkpoint", required=True, metavar="CHECKPOINT", help="Backup point to serve ('latest' for the newest).")
@click.option("--disk", "disks", multiple=True, metavar="ID", help="Serve only this disk (repeatable).")
@click.option("--socket", "socket_path", metavar="PATH", type=click.Path(dir_okay=False), help="Listen on this unix socket (default: one in a new private directory).")
@click.option("--tcp", metavar="ADDR:PORT", help="Listen on TCP at ADDR:PORT instead (no encryption, no authentication).")
@click.option("--writable", is_flag=True, help="Accept writes, kept in a throwaway overlay deleted on exit (never in the repository).")
@pass_globals
def serve(g: Globals, vm: str, checkpoint: str, disks: tuple[str, ...], socket_path: str | None, tcp: str | None, writable: bool) -> None:
    """Serve each disk of the backup at CHECKPOINT as an NBD export until Ctrl-C.

    Prints one NBD URI per disk (for nbdcopy, nbdinfo, qemu-img, qemu -drive
    file=URI). Reads are identical to what `restore` writes; holes are
    reported as such. Read-only unless --writable.
    """
    import sys
    from pathlib import Path

    from .. import engine
    from ..serving import ServeRequest

    req = ServeRequest(vm=vm, checkpoint=checkpoint, disks=disks, socket=Path(socket_path) if socket_path else None,
                       tcp=tcp, writable=writable)

    def ready(m, exports) -> None:
        for e in exports:
            click.echo(e.uri)
        sys.stdout.flush()
        mode = "read-write (writes are thrown away on exit)" if writable else "read-only"
        click.echo(f"nbdbackup: serving backup {m.checkpoint} of {vm}, {len(exports)} disk(s), {mode}; Ctrl-C stops", err=True)

    with interruptible() as cancel:
        engine.serve(g.settings(), req, cancel=cancel, on_ready=ready)
    click.echo("nbdbackup: stopped serving", err=True)
