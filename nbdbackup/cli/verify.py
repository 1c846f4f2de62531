"""verify: read back the backups of a VM and check every byte they reference."""

from __future__ import annotations

import dataclasses
import json
import logging

import click

from . import logs
from .common import Globals, human_size, interruptible, pass_globals, plural, progress_bar


@click.command()
@click.argument("vm")
@click.option("--checkpoint", metavar="NAME", help="Verify only this backup ('latest' for the newest; default: every backup of VM).")
@click.option("--sample", "sample", type=click.FloatRange(0, 100, min_open=True), metavar="PERCENT",
              help="Read only a random PERCENT of the chunks (manifests and indexes are always read in full).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.option("--boot", is_flag=True, help="Instead: restore the backup (default: latest) to a temporary place and boot it in a throwaway VM without network; exit 6 if it does not boot.")
@click.option("--check", metavar="CMD", help="With --boot: run CMD (/bin/sh -c) in the booted guest through its agent; it must exit 0.")
@click.option("--console-line", metavar="TEXT", help="With --boot: wait for TEXT on the serial console instead of the guest agent.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), metavar="SECONDS", help="With --boot: how long the guest may take to show life (default: [vm.NAME] boot_timeout, else 300).")
@pass_globals
def verify(g: Globals, vm: str, checkpoint: str | None, sample: float | None, as_json: bool,
           boot: bool, check: str | None, console_line: str | None, timeout: float | None) -> None:
    """Check that every backup of VM reads back intact: manifests, indexes and chunks.

    Each chunk is read once, however many backups use it; damage is reported
    for every backup, disk and offset that uses it. The VM need not run.
    Exit 6 when anything is damaged (after the report).

    With --boot, the backup is instead restored into a temporary directory and
    booted in a throwaway QEMU (QEMU arguments: [vm.NAME] boot): it must show a
    sign of life (guest agent or --console-line) and pass --check; prints
    `booted in N s`, exit 6 if it does not boot.
    """
    from .. import engine
    from ..errors import UsageError

    if boot:
        if sample is not None:
            raise UsageError("--sample and --boot do not go together")
        from ..bootcheck import BootRequest
        from .bootcheck import print_boot

        req = BootRequest(vm=vm, checkpoint=checkpoint or "latest", check=check, console_line=console_line, timeout=timeout)
        with interruptible() as cancel, progress_bar("restore for boot") as observer:
            if g.debug:
                observer = dataclasses.replace(observer, on_phase=lambda text: click.echo(f"nbdbackup: {text}", err=True))
            print_boot(engine.verify_boot(g.settings(), req, cancel=cancel, observer=observer), as_json=as_json)
        return
    if check is not None or console_line is not None or timeout is not None:
        raise UsageError("--check, --console-line and --timeout go with --boot")
    from ..verify import VerifyRequest

    with progress_bar("verify") as observer:
        report = engine.verify(g.settings(needs_config=False), VerifyRequest(vm=vm, checkpoint=checkpoint, sample_percent=sample),
                               observer=observer)

    if as_json:
        click.echo(json.dumps(_as_json(report), indent=2))
    else:
        width = max((len(b.checkpoint) for b in report.backups), default=0)
        for b in report.backups:
            if b.ok:
                click.echo(f"{b.checkpoint:<{width}}  ok")
            for p in b.problems:
                click.echo(f"{b.checkpoint:<{width}}  DAMAGED  {_describe(p)}")
        click.echo(_summary(report))
    logs.summary(f"verify {vm}: {_summary(report)}", level=logging.ERROR if report.damaged else logging.INFO, stderr=False)
    if report.error:
        raise report.error


def _describe(p) -> str:
    if p.disk is None:
        return p.error
    if p.offset is None:
        return f"disk {p.disk}: {p.error}"
    text = f"disk {p.disk} at offset {p.offset}: {p.error}"
    if p.uses > 1:
        more = ", ".join(str(o) for o in p.offsets[1:])
        rest = p.uses - len(p.offsets)
        text += f" (also at {more}{f' and {rest} more' if rest else ''})"
    return text


def _summary(report) -> str:
    checked = f"{plural(report.chunks_checked, 'chunk')} checked"
    if report.sample_percent is not None:
        checked += f" (a random {report.sample_percent:g}% sample of {report.chunks_referenced})"
    return (f"{plural(len(report.backups), 'backup')} of {report.vm} checked, {len(report.damaged)} damaged; "
            f"{checked}, {human_size(report.bytes_read)} of chunk content read, {plural(report.damaged_chunks, 'damaged chunk')}")


def _as_json(report) -> dict:
    return {
        "vm": report.vm,
        "backups": [
            {
                "checkpoint": b.checkpoint,
                "ok": b.ok,
                "problems": [
                    {"disk": p.disk, "offset": p.offset, "chunk": p.chunk, "error": p.error, "offsets": list(p.offsets), "uses": p.uses}
                    for p in b.problems
                ],
            }
            for b in report.backups
        ],
        "chunks_referenced": report.chunks_referenced,
        "chunks_checked": report.chunks_checked,
        "bytes_read": report.bytes_read,
        "sample_percent": report.sample_percent,
        "damaged_chunks": report.damaged_chunks,
        "damaged": len(report.damaged),
    }
