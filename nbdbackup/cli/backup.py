"""full, incremental, auto: make a backup (auto --all: of every configured VM)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from typing import TYPE_CHECKING

import click

from . import logs
from .common import Globals, human_size, interruptible, pass_globals, plural, progress_bar, qmp_option

if TYPE_CHECKING:  # imported by the commands that run: --help does without them
    from ..backup import BackupPlan, BackupRequest, Mode
    from ..engine import BackupOutcome


def backup_options(f):
    """Options shared by full, incremental and auto."""
    for option in reversed([
        qmp_option,
        click.option("--checkpoint", metavar="NAME", help="Name of the new checkpoint (default: generated, sortable by time)."),
        click.option("--fsfreeze", is_flag=True, help="Freeze the guest's filesystems (qemu-guest-agent) around the point in time."),
        click.option("--require-fsfreeze", is_flag=True, help="Fail, instead of going on crash-consistent, if the guest cannot be frozen."),
        click.option("--qga", metavar="SOCKET", help="The VM's guest agent socket (default: [vm.NAME] qga in the config file)."),
        click.option("--dry-run", is_flag=True, help="Print the plan (what would be read from each disk, and why); change nothing."),
        click.option("--json", "as_json", is_flag=True, help="Print the result (with --dry-run: the plan) as a JSON object."),
    ]):
        f = option(f)
    return f


def _request(mode: Mode, vm: str | None, opts: dict) -> BackupRequest:
    from pathlib import Path

    from ..backup import BackupRequest

    return BackupRequest(vm=vm or "", mode=mode, checkpoint=opts.get("checkpoint"), since=opts.get("since"),
                         force_new_chain=opts.get("force_new_chain", False), dry_run=opts["dry_run"],
                         qmp=Path(opts["qmp"]) if opts.get("qmp") else None, qga=Path(opts["qga"]) if opts.get("qga") else None,
                         fsfreeze=opts["fsfreeze"] or opts["require_fsfreeze"], require_fsfreeze=opts["require_fsfreeze"],
                         verify_boot=opts.get("verify_boot", False))


def _log_outcome(outcome: BackupOutcome, *, one_of_many: bool) -> None:
    """A VM's summary line as soon as its backup is done (log file, syslog; a failure's also on stderr
    with one_of_many: auto --all, whose final error line only names the VMs)."""
    vm = outcome.vm
    if outcome.failure is not None:
        exc = outcome.failure
        logs.summary(f"{vm} {outcome.mode} FAILED (exit {exc.exit_code}): {exc}", level=logging.ERROR, stderr=one_of_many)
        logs.mark_logged(exc)
        return
    result = outcome.result
    for note in result.notes if result else ():
        logs.warning(f"{vm}: {note}")
    m = result.manifest if result else None
    if m is None:  # a dry run
        return
    ratio = f"{m.read_bytes / m.stored_bytes:.1f}x" if m.stored_bytes else ("all deduplicated" if m.read_bytes else "nothing changed")
    logs.summary(f"{vm} {m.kind} {m.checkpoint}: read {human_size(m.read_bytes)}, stored {human_size(m.stored_bytes)} "
                 f"(reduction {ratio}) in {m.duration:.1f}s")


def _as_dict(outcome: BackupOutcome) -> dict:
    result = outcome.result
    if result is None or outcome.failure is not None:
        return {"vm": outcome.vm, "exit_code": outcome.exit_code, "error": str(outcome.failure)}
    if result.manifest is None:
        return {"vm": outcome.vm, "exit_code": 0, "plan": _plan_dict(result.plan)}
    m = result.manifest
    return {"vm": m.vm, "exit_code": 0, "checkpoint": m.checkpoint, "kind": m.kind, "since": m.since, "created": m.created,
            "disks": [{"id": d.id, "size": d.size, "read_bytes": d.read_bytes} for d in m.disks],
            "read_bytes": m.read_bytes, "stored_bytes": m.stored_bytes, "duration": round(m.duration, 3), "notes": list(result.notes)}


def _plan_dict(plan: BackupPlan | None) -> dict:
    if plan is None:
        return {}
    return {"vm": plan.vm, "dry_run": True, "kind": plan.kind, "checkpoint": plan.checkpoint, "since": plan.since.name if plan.since else None,
            "disks": [{"id": p.disk.id, "size": p.disk.size, "read": "all" if p.merges is None else "changed",
                       "bitmaps": list(p.merges or ()), "at_most_bytes": p.estimate, "reason": p.reason} for p in plan.disks],
            "removed_disks": list(plan.removed_disks), "repairs_first": list(plan.repairs), "twin_checked": plan.twin_checked,
            "notes": list(plan.notes)}


def _print_plan(plan: BackupPlan | None) -> None:
    if plan is None:
        return
    since = f" since {plan.since.name}" if plan.since else ""
    article = "an" if plan.kind == "incremental" else "a"
    click.echo(f"{plan.vm}: would make {article} {plan.kind} backup{since}, checkpoint {plan.checkpoint} (dry run: nothing changed)")
    for step in plan.repairs:
        click.echo(f"  first: {step}")
    if plan.twin_checked:
        click.echo("  checked: the active bitmap against its twin (temporary bitmaps, removed at once)")
    for p in plan.disks:
        what = "all of it" if p.merges is None else "the changed blocks"
        click.echo(f"  disk {p.disk.id} ({human_size(p.disk.size)}): read {what}, at most {human_size(p.estimate)}: {p.reason}")
    for d in plan.removed_disks:
        click.echo(f"  disk {d}: gone since the base backup (not in the new one)")
    for note in plan.notes:
        click.echo(f"  note: {note}")


def _print_single(outcome: BackupOutcome, as_json: bool) -> None:
    result = outcome.result
    if result is None:
        return
    if as_json:
        click.echo(json.dumps(_plan_dict(result.plan) if result.manifest is None else _as_dict(dataclasses.replace(outcome, failure=None)),
                              indent=2))
    elif result.manifest is None:
        _print_plan(result.plan)
    else:
        click.echo(result.manifest.checkpoint)
    if outcome.boot is not None:
        _print_boot(outcome.boot, to_stderr=as_json)


def _print_boot(result, *, to_stderr: bool) -> None:
    from .bootcheck import print_boot

    print_boot(result, as_json=False, to_stderr=to_stderr)


def _single(g: Globals, req: BackupRequest, as_json: bool) -> None:
    from .. import engine

    with interruptible() as cancel, progress_bar(req.vm) as observer:
        outcome = engine.backup(g.settings(), req, cancel=cancel, observer=observer,
                                on_backup=lambda o: _log_outcome(o, one_of_many=False))
    if outcome.failure is not None and not outcome.failed_step:
        raise outcome.failure
    _print_single(outcome, as_json)
    if outcome.failure is not None:  # the backup was made but did not boot
        raise outcome.failure


@click.command()
@click.argument("vm")
@click.option("--force-new-chain", is_flag=True,
              help="Start the chain here even if this QEMU holds the checkpoints of another VM name of the repository "
                   "(a renamed VM, copied disks); that VM's next backup of this QEMU is then refused.")
@backup_options
@pass_globals
def full(g: Globals, vm: str, as_json: bool, **opts) -> None:
    """Back up every qcow2 disk of VM at one instant; start a new checkpoint chain.

    Prints the new checkpoint's name.
    """
    _single(g, _request("full", vm, opts), as_json)


@click.command()
@click.argument("vm")
@click.option("--since", metavar="CHECKPOINT", help="Back up changes since this checkpoint (default: latest, the newest).")
@backup_options
@pass_globals
def incremental(g: Globals, vm: str, as_json: bool, **opts) -> None:
    """Back up what changed since a checkpoint, and create a new one.

    Exit 4 (nothing written) when the chain from CHECKPOINT to now cannot be
    trusted; `nbdbackup auto` then makes a full backup.
    """
    _single(g, _request("incremental", vm, opts), as_json)


@click.command()
@click.argument("vm", required=False)
@click.option("--all", "all_vms", is_flag=True, help="Every VM of the config file in turn; the exit code is the worst one.")
@click.option("--jobs", type=click.IntRange(1, 64), default=1, show_default=True, help="With --all: back up this many VMs at once.")
@click.option("--verify-boot", is_flag=True, help="Then boot the new backup in a throwaway VM, as `verify --boot` does (also: [vm.NAME] verify_boot = true).")
@backup_options
@pass_globals
def auto(g: Globals, vm: str | None, all_vms: bool, jobs: int, as_json: bool, **opts) -> None:
    """Incremental since the newest checkpoint if the chain is sound, else full (for cron).

    With --all, back up every VM of the config file in turn (--jobs N: N at
    once): one VM's failure does not stop the others; a summary follows; the
    exit code is the worst one.
    """
    from .. import engine
    from ..errors import UsageError

    if all_vms == (vm is not None):
        raise UsageError("give either a VM or --all")
    req = _request("auto", vm, opts)
    if not all_vms:
        _single(g, req, as_json)
        return
    # several progress bars would interleave: a bar only when the VMs go one at a time
    with interruptible() as cancel, progress_bar("auto") if jobs == 1 else contextlib.nullcontext(engine.Observer()) as observer:
        batch = engine.backup_all(g.settings(), req, jobs=jobs, cancel=cancel, observer=observer,
                                  on_backup=lambda o: _log_outcome(o, one_of_many=True))
    for o in batch.outcomes:
        if o.boot is not None:
            _print_boot(o.boot, to_stderr=True)
        if o.failed_step:
            logs.summary(f"{o.vm} {o.failed_step} FAILED (exit {o.exit_code}): {o.failure}", level=logging.ERROR, stderr=False)
    outcomes = batch.outcomes
    if as_json:
        click.echo(json.dumps([_as_dict(o) for o in outcomes], indent=2))
    else:
        for o in outcomes:
            m = o.result.manifest if o.result else None
            if o.exit_code or o.result is None:
                click.echo(f"{o.vm:<20} FAILED  exit {o.exit_code}: {o.failure}")
            elif m is None:
                _print_plan(o.result.plan)
            else:
                click.echo(f"{o.vm:<20} ok      {m.kind:<12} {m.checkpoint}")
    error = batch.error
    if error:
        # The final error line (stderr) says the same as the summary: log it once.
        failed = batch.failed
        logs.summary(f"auto --all: {len(outcomes) - len(failed)} of {plural(len(outcomes), 'VM')} backed up; failed: {', '.join(failed)}",
                     level=logging.ERROR, stderr=False)
        logs.mark_logged(error)
        raise error
    logs.summary(f"auto --all: {len(outcomes)} of {plural(len(outcomes), 'VM')} backed up")
