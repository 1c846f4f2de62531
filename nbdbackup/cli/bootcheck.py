"""How a boot check's result is printed (verify --boot, auto --verify-boot)."""

from __future__ import annotations

import json

import click


def print_boot(result, *, as_json: bool, to_stderr: bool = False) -> None:
    """`backup CP of VM booted in N s`, and the check's output."""
    if as_json:
        click.echo(json.dumps({"vm": result.vm, "checkpoint": result.checkpoint, "booted": True, "seconds": round(result.seconds, 1),
                               "sign": result.sign, "check": result.check, "check_output": result.check_output}, indent=2))
        return
    click.echo(f"backup {result.checkpoint} of {result.vm} booted in {result.seconds:.0f} s ({result.sign})", err=to_stderr)
    if result.check is not None:
        click.echo(f"check {result.check!r} passed" + (":" if result.check_output else ""), err=to_stderr)
        for line in result.check_output.splitlines():
            click.echo(f"  {line}", err=to_stderr)
