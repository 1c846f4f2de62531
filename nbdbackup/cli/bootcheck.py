"""verify --boot (and auto --verify-boot): boot a backup point in a throwaway VM and report."""

from __future__ import annotations

import json

import click

from .common import Globals, interruptible, progress_bar


def boot(g: Globals, settings, vm: str, checkpoint: str | None, check: str | None, console_line: str | None,
         timeout: float | None, as_json: bool, *, to_stderr: bool = False) -> None:
    """Print `backup CP of VM booted in N s`; BackupDoesNotBoot (exit 6) when it does not."""
    from .. import engine
    from ..bootcheck import DEFAULT_TIMEOUT, BootRequest

    vmconf = settings.vm(vm, required=False)
    req = BootRequest(vm=vm, checkpoint=checkpoint or "latest", check=check, console_line=console_line,
                      timeout=timeout or vmconf.boot_timeout or DEFAULT_TIMEOUT, qemu_args=vmconf.boot)
    with interruptible() as cancel, progress_bar("restore for boot") as observer:
        result = engine.verify_boot(settings, vmconf, req, cancel=cancel, observer=observer,
                                    on_phase=lambda text: click.echo(f"nbdbackup: {text}", err=True) if g.debug else None)
    if as_json:
        click.echo(json.dumps({"vm": result.vm, "checkpoint": result.checkpoint, "booted": True, "seconds": round(result.seconds, 1),
                               "sign": result.sign, "check": result.check, "check_output": result.check_output}, indent=2))
        return
    click.echo(f"backup {result.checkpoint} of {result.vm} booted in {result.seconds:.0f} s ({result.sign})", err=to_stderr)
    if result.check is not None:
        click.echo(f"check {result.check!r} passed" + (":" if result.check_output else ""), err=to_stderr)
        for line in result.check_output.splitlines():
            click.echo(f"  {line}", err=to_stderr)
