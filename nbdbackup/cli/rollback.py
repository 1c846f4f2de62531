"""rollback: put a VM's own disks back to a checkpoint, writing only what changed."""

from __future__ import annotations

import signal
import sys
from typing import Any

import click

from .common import Globals, human_size, interruptible, pass_globals, progress_bar, qmp_option


@click.command()
@click.argument("vm")
@click.option("--to", "checkpoint", required=True, metavar="CHECKPOINT", help="Checkpoint to go back to ('latest' for the newest backup).")
@click.option("--disk", "disks", multiple=True, metavar="ID", help="Roll back only this disk (repeatable).")
@click.option("--image", "images", multiple=True, metavar="ID=PATH", help="The image of disk ID (repeatable; default: [vm.NAME] images in the config file).")
@click.option("--full", is_flag=True, help="Rewrite whole disks from the backup (when the checkpoint chain cannot tell what changed; "
              "on a terminal, rollback asks instead of refusing).")
@click.option("--dry-run", is_flag=True, help="Only say what would be written.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--pause", is_flag=True, help="Pause a running guest first; it is reset and resumed afterwards.")
@click.option("--no-reset", is_flag=True, help="Do not reset the guest after rolling back a paused VM (its cache keeps the old content).")
@qmp_option
@pass_globals
def rollback(g: Globals, vm: str, checkpoint: str, disks: tuple[str, ...], images: tuple[str, ...], full: bool, dry_run: bool,
             as_json: bool, pause: bool, no_reset: bool, qmp: str | None) -> None:
    """Put the VM's disks back to their content at CHECKPOINT, in place.

    Only the blocks changed since CHECKPOINT are written (the checkpoint chain
    knows them), read from the backup at CHECKPOINT. With the VM shut down, its
    images come from [vm.NAME] images in the config file or --image; a VM whose
    QEMU answers on its QMP socket must be paused (or --pause).
    """
    from pathlib import Path

    from .. import engine
    from ..errors import UsageError
    from ..names import check_name
    from ..rollback import RollbackRequest

    paths = {}
    for item in images:
        disk, sep, path = item.partition("=")
        if not sep or not path:
            raise UsageError(f"--image {item!r} is not ID=PATH")
        paths[check_name("disk", disk)] = Path(path)
    # on a terminal, a chain that cannot tell what changed leads to a question instead of a refusal
    confirm = ask if sys.stdin.isatty() and sys.stderr.isatty() else None
    req = RollbackRequest(vm=vm, checkpoint=checkpoint, images=paths, disks=disks, full=full, dry_run=dry_run,
                          qmp=Path(qmp) if qmp else None, pause=pause, reset=not no_reset, confirm_full=confirm)
    with interruptible() as cancel, progress_bar("rollback") as observer:
        result = engine.rollback(g.settings(), req, cancel=cancel, observer=observer)
    if as_json:
        import json

        click.echo(json.dumps(result.as_json(), indent=2))
        return
    plan = result.plan
    if plan.resumed:
        click.echo(f"completing an interrupted rollback (to {plan.resumed})")
    for d in plan.disks:
        what = "changed blocks" if d.mode == "changed-blocks" else "full rewrite"
        click.echo(f"{d.disk}  {d.image}  {what}: {human_size(d.bytes)}" + (f" ({d.reason})" if d.mode == "full" else ""))
    total = sum(d.bytes for d in plan.disks)
    if result.dry_run:
        click.echo(f"would write {human_size(total)} to roll {vm} back to {plan.checkpoint} (dry run: nothing written)")
    else:
        zeroed = sum(result.zeroed.values())
        click.echo(f"rolled {vm} back to {plan.checkpoint}: wrote {human_size(total)} ({human_size(zeroed)} of it as zeroes) "
                   f"in {result.seconds:.1f}s")


def ask(question: str) -> bool:
    """y/N on the terminal; Ctrl-C (or SIGTERM) at the question interrupts the run, end of input is no."""
    from ..errors import Interrupted

    def stop(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        click.echo(f"\r\033[K{question} [y/N] ", nl=False, err=True)  # on a line of its own (a progress bar may be there)
        answer = sys.stdin.readline()
    except Interrupted:
        click.echo("", err=True)
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return answer.strip().lower() in ("y", "yes")
