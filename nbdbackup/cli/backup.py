"""full, incremental, auto: make a backup (auto --all: of every configured VM)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from . import logs
from .common import Globals, human_size, interruptible, pass_globals, plural, progress_bar, qmp_option

if TYPE_CHECKING:  # imported by the commands that run: --help does without them
    from ..backup import BackupResult, Mode
    from ..errors import NbdBackupError
    from ..records import Manifest


@dataclass(frozen=True)
class BackupOptions:
    mode: Mode
    checkpoint: str | None = None
    since: str | None = None
    qmp: str | None = None
    qga: str | None = None
    fsfreeze: bool = False
    require_fsfreeze: bool = False
    force_new_chain: bool = False


@dataclass(frozen=True)
class Outcome:
    vm: str
    result: BackupResult | None = None  # on success
    failure: NbdBackupError | None = None  # on failure

    @property
    def exit_code(self) -> int:
        return self.failure.exit_code if self.failure else 0

    @property
    def manifest(self) -> Manifest:
        """The new backup's (of a successful outcome)."""
        if self.result is None:
            raise ValueError(f"the backup of {self.vm} failed: it has no manifest")
        return self.result.manifest


def backup_options(f):
    """Options shared by full, incremental and auto."""
    for option in reversed([
        qmp_option,
        click.option("--checkpoint", metavar="NAME", help="Name of the new checkpoint (default: generated, sortable by time)."),
        click.option("--fsfreeze", is_flag=True, help="Freeze the guest's filesystems (qemu-guest-agent) around the point in time."),
        click.option("--require-fsfreeze", is_flag=True, help="Fail, instead of going on crash-consistent, if the guest cannot be frozen."),
        click.option("--qga", metavar="SOCKET", help="The VM's guest agent socket (default: [vm.NAME] qga in the config file)."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as a JSON object."),
    ]):
        f = option(f)
    return f


def run_one(g: Globals, settings, vm: str, opts: BackupOptions, *, one_of_many: bool = False, cancel=None) -> Outcome:
    """One VM's backup, its summary line and metrics; errors become an Outcome (and are logged).

    A failure's one-line reason goes to the log file and syslog (priority err); with
    one_of_many (auto --all) to stderr as well, since the final error line only names the VMs.
    cancel: the token of `auto --all --jobs N`, whose signal handlers the main thread holds
    (no progress bar then: several would interleave).
    """

    from pathlib import Path

    from .. import engine
    from ..backup import BackupRequest
    from ..errors import Interrupted, NbdBackupError
    from ..names import check_name

    started = time.monotonic()
    try:
        vmconf = settings.vm(vm, opts.qmp)
        if opts.qga:
            vmconf = dataclasses.replace(vmconf, qga=Path(opts.qga))
        for value in (opts.checkpoint, opts.since):
            if value is not None and value != "latest":
                check_name("checkpoint", value)  # before touching the VM
        req = BackupRequest(vm=vm, mode=opts.mode, checkpoint=opts.checkpoint, since=opts.since, disks=vmconf.disks,
                            exclude=vmconf.exclude, tuning=engine.tuning_for(vmconf), force_new_chain=opts.force_new_chain)
        with contextlib.nullcontext(cancel) if cancel else interruptible() as cancel, \
                contextlib.nullcontext(engine.Observer()) if cancel else progress_bar(f"{vm}") as observer:
            result = engine.backup(settings, vmconf, req, cancel=cancel, observer=observer,
                                   fsfreeze=opts.fsfreeze or opts.require_fsfreeze, require_fsfreeze=opts.require_fsfreeze)
    except Interrupted as exc:
        _record(g, vm, exc.exit_code, time.monotonic() - started)
        raise
    except NbdBackupError as exc:
        _record(g, vm, exc.exit_code, time.monotonic() - started)
        logs.summary(f"{vm} {opts.mode} FAILED (exit {exc.exit_code}): {exc}", level=logging.ERROR, stderr=one_of_many)
        logs.mark_logged(exc)
        return Outcome(vm, failure=exc)
    m = result.manifest
    for note in result.notes:
        logs.warning(f"{vm}: {note}")
    ratio = f"{m.read_bytes / m.stored_bytes:.1f}x" if m.stored_bytes else ("all deduplicated" if m.read_bytes else "nothing changed")
    logs.summary(f"{vm} {m.kind} {m.checkpoint}: read {human_size(m.read_bytes)}, stored {human_size(m.stored_bytes)} "
                 f"(reduction {ratio}) in {m.duration:.1f}s")
    _record(g, vm, 0, m.duration, m.read_bytes, m.stored_bytes)
    return Outcome(vm, result=result)


def _record(g: Globals, vm: str, code: int, duration: float, read: int = 0, stored: int = 0) -> None:
    """Update the metrics file; a metrics problem is a warning, never a failed backup."""
    if g.metrics_file:
        from pathlib import Path

        from ..errors import NbdBackupError
        from ..metrics import RunMetrics, update

        try:
            update(Path(g.metrics_file), RunMetrics(vm, code, duration, read, stored))
        except (OSError, NbdBackupError) as exc:
            logging.getLogger("nbdbackup").warning("cannot update metrics file %s: %s", g.metrics_file, exc)


def _as_dict(outcome: Outcome) -> dict:
    if outcome.result is None:
        return {"vm": outcome.vm, "exit_code": outcome.exit_code, "error": str(outcome.failure)}
    m = outcome.result.manifest
    return {"vm": m.vm, "exit_code": 0, "checkpoint": m.checkpoint, "kind": m.kind, "since": m.since, "created": m.created,
            "disks": [{"id": d.id, "size": d.size, "read_bytes": d.read_bytes} for d in m.disks],
            "read_bytes": m.read_bytes, "stored_bytes": m.stored_bytes, "duration": round(m.duration, 3), "notes": list(outcome.result.notes)}


def _single(g: Globals, vm: str, opts: BackupOptions, as_json: bool) -> Outcome:
    outcome = run_one(g, g.settings(), vm, opts)
    if outcome.failure:
        raise outcome.failure
    click.echo(json.dumps(_as_dict(outcome), indent=2) if as_json else outcome.manifest.checkpoint)
    return outcome


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
    _single(g, vm, BackupOptions(mode="full", **opts), as_json)


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
    _single(g, vm, BackupOptions(mode="incremental", **opts), as_json)


@click.command()
@click.argument("vm", required=False)
@click.option("--all", "all_vms", is_flag=True, help="Every VM of the config file in turn; the exit code is the worst one.")
@click.option("--jobs", type=click.IntRange(1, 64), default=1, show_default=True, help="With --all: back up this many VMs at once.")
@click.option("--verify-boot", is_flag=True, help="Then boot the new backup in a throwaway VM, as `verify --boot` does (also: [vm.NAME] verify_boot = true).")
@backup_options
@pass_globals
def auto(g: Globals, vm: str | None, all_vms: bool, jobs: int, as_json: bool, verify_boot: bool, **opts) -> None:
    """Incremental since the newest checkpoint if the chain is sound, else full (for cron).

    With --all, back up every VM of the config file in turn (--jobs N: N at
    once): one VM's failure does not stop the others; a summary follows; the
    exit code is the worst one.
    """
    from ..errors import SomeRunsFailed, UsageError

    if all_vms == (vm is not None):
        raise UsageError("give either a VM or --all")
    if vm is not None:  # not --all
        outcome = _single(g, vm, BackupOptions(mode="auto", **opts), as_json)
        settings = g.settings()
        if verify_boot or settings.vm(vm, required=False).verify_boot:
            _boot_new_backup(g, settings, outcome, as_json)
        return
    if opts.get("qmp") or opts.get("qga") or opts.get("checkpoint"):
        raise UsageError("--qmp, --qga and --checkpoint name one VM; with --all they come from the config file")
    settings = g.settings()
    if settings.config_file is None:
        raise UsageError(f"--all: there is no config file (looked for {' and '.join(map(str, settings.config_searched))})",
                         hint="create one with a [vm.NAME] table per VM, or pass --config FILE")
    if not settings.vms:
        raise UsageError(f"--all: the config file {settings.config_file} names no VM", hint="add a [vm.NAME] table per VM")
    if jobs == 1:
        outcomes = [run_one(g, settings, name, BackupOptions(mode="auto", **opts), one_of_many=True) for name in sorted(settings.vms)]
    else:
        import concurrent.futures as cf

        with interruptible() as cancel, cf.ThreadPoolExecutor(jobs, "auto") as pool:
            outcomes = list(pool.map(lambda name: run_one(g, settings, name, BackupOptions(mode="auto", **opts), one_of_many=True,
                                                          cancel=cancel), sorted(settings.vms)))
    outcomes = [_boot_new_backup(g, settings, o, as_json, keep_going=True) if not o.exit_code and (verify_boot or settings.vms[o.vm].verify_boot)
                else o for o in outcomes]
    if as_json:
        click.echo(json.dumps([_as_dict(o) for o in outcomes], indent=2))
    else:
        for o in outcomes:
            click.echo(f"{o.vm:<20} ok      {o.manifest.kind:<12} {o.manifest.checkpoint}" if not o.exit_code
                       else f"{o.vm:<20} FAILED  exit {o.exit_code}: {o.failure}")
    worst = max(o.exit_code for o in outcomes)
    failed = [o.vm for o in outcomes if o.exit_code]
    if worst:
        # The final error line (stderr) says the same as the summary: log it once.
        error = SomeRunsFailed(f"{len(failed)} of {plural(len(outcomes), 'VM')} failed: {', '.join(failed)}", worst)
        logs.summary(f"auto --all: {len(outcomes) - len(failed)} of {plural(len(outcomes), 'VM')} backed up; failed: {', '.join(failed)}",
                     level=logging.ERROR, stderr=False)
        logs.mark_logged(error)
        raise error
    logs.summary(f"auto --all: {len(outcomes)} of {plural(len(outcomes), 'VM')} backed up")


def _boot_new_backup(g: Globals, settings, outcome: Outcome, as_json: bool, *, keep_going: bool = False) -> Outcome:
    """auto --verify-boot: boot the backup just made; with keep_going a failure becomes the VM's outcome."""
    from ..errors import NbdBackupError
    from .bootcheck import boot

    try:
        boot(g, settings, outcome.vm, outcome.manifest.checkpoint, None, None, None, False, to_stderr=as_json or keep_going)
    except NbdBackupError as exc:
        if not keep_going:
            raise
        logs.summary(f"{outcome.vm} verify --boot FAILED (exit {exc.exit_code}): {exc}", level=logging.ERROR, stderr=False)
        return Outcome(outcome.vm, failure=exc)
    return outcome
