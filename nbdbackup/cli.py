"""The command line: parse, resolve settings once, call the engine, print, exit.

Only click is imported at module level, so `--help` is fast and works even
where libnbd or QEMU is missing; domain modules are imported by commands.
All results go to stdout, all diagnostics to stderr; exit codes come from
nbdbackup.errors and nowhere else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Iterator

import click

from . import __version__


@dataclass(frozen=True)
class Globals:
    repo: str | None
    config: str | None
    debug: bool

    def settings(self):
        from .config import load

        return load(self.config, self.repo)


pass_globals = click.make_pass_decorator(Globals)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--repo", metavar="PATH", help="Repository [env NBDBACKUP_REPO; config 'repository'; default /var/lib/nbdbackup, or $XDG_DATA_HOME/nbdbackup for non-root].")
@click.option("--config", metavar="FILE", help="TOML config file [env NBDBACKUP_CONFIG; default /etc/nbdbackup/config.toml, then $XDG_CONFIG_HOME/nbdbackup/config.toml].")
@click.option("--debug", is_flag=True, help="Log every QMP exchange; show tracebacks.")
@click.version_option(__version__, prog_name="nbdbackup")
@click.pass_context
def cli(ctx: click.Context, repo: str | None, config: str | None, debug: bool) -> None:
    """Incremental backups of running QEMU VMs, over QMP and NBD.

    Exit codes: 0 success, 1 unexpected error, 2 usage error, 3 VM unreachable
    or unsuitable, 4 checkpoint unknown or chain broken, 5 VM locked by another
    run, 6 repository damaged, 7 repository unusable (newer format, read-only,
    full), 8 restore target cannot be written, 130/143 interrupted.
    """
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="nbdbackup: %(levelname)s: %(message)s",
                        stream=sys.stderr)
    # qemu.qmp's own protocol chatter stays out of the way even with --debug.
    logging.getLogger("qemu").setLevel(logging.CRITICAL)
    ctx.obj = Globals(repo, config, debug)


qmp_option = click.option("--qmp", metavar="SOCKET", help="The VM's QMP socket (default: [vm.NAME] qmp in the config file).")


def _backup(g: Globals, vm: str, qmp: str | None, mode: str, checkpoint: str | None, since: str | None) -> None:
    from . import engine
    from .backup import BackupRequest
    from .names import check_name

    settings = g.settings()
    vmconf = settings.vm(vm, qmp)
    for kind, value in (("checkpoint", checkpoint), ("checkpoint", since)):
        if value is not None and value != "latest":
            check_name(kind, value)  # before touching the VM
    req = BackupRequest(vm=vm, mode=mode, checkpoint=checkpoint, since=since, disks=vmconf.disks,
                        tuning=engine.tuning_for(vmconf))
    with _interruptible() as cancel, _progress_bar("backup") as observer:
        result = engine.backup(settings, vmconf, req, cancel=cancel, observer=observer)
    for note in result.notes:
        click.echo(f"nbdbackup: {note}", err=True)
    click.echo(result.manifest.checkpoint)


@cli.command()
@click.argument("vm")
@qmp_option
@click.option("--checkpoint", metavar="NAME", help="Name of the new checkpoint (default: generated, sortable by time).")
@pass_globals
def full(g: Globals, vm: str, qmp: str | None, checkpoint: str | None) -> None:
    """Back up every qcow2 disk of VM at one instant; start a new checkpoint chain.

    Prints the new checkpoint's name.
    """
    _backup(g, vm, qmp, "full", checkpoint, None)


@cli.command()
@click.argument("vm")
@qmp_option
@click.option("--since", metavar="CHECKPOINT", help="Back up changes since this checkpoint (default: latest, the newest).")
@click.option("--checkpoint", metavar="NAME", help="Name of the new checkpoint.")
@pass_globals
def incremental(g: Globals, vm: str, qmp: str | None, since: str | None, checkpoint: str | None) -> None:
    """Back up what changed since a checkpoint, and create a new one.

    Exit 4 (nothing written) when the chain from CHECKPOINT to now cannot be
    trusted; `nbdbackup auto` then makes a full backup.
    """
    _backup(g, vm, qmp, "incremental", checkpoint, since)


@cli.command()
@click.argument("vm")
@qmp_option
@click.option("--checkpoint", metavar="NAME", help="Name of the new checkpoint.")
@pass_globals
def auto(g: Globals, vm: str, qmp: str | None, checkpoint: str | None) -> None:
    """Incremental since the newest checkpoint if the chain is sound, else full (for cron)."""
    _backup(g, vm, qmp, "auto", checkpoint, None)


@cli.command()
@click.argument("vm")
@click.option("--to", "checkpoint", required=True, metavar="CHECKPOINT", help="Backup point to restore ('latest' for the newest).")
@click.option("--output", required=True, metavar="DIR", type=click.Path(file_okay=False), help="Directory for the restored images.")
@click.option("--format", "fmt", type=click.Choice(["qcow2", "raw"]), default="qcow2", show_default=True, help="Image format.")
@click.option("--disk", "disks", multiple=True, metavar="ID", help="Restore only this disk (repeatable).")
@click.option("--force", is_flag=True, help="Overwrite existing images in DIR.")
@pass_globals
def restore(g: Globals, vm: str, checkpoint: str, output: str, fmt: str, disks: tuple[str, ...], force: bool) -> None:
    """Write DIR/<disk>.<format> for each disk, identical to the disk at CHECKPOINT."""
    from pathlib import Path

    from . import engine
    from .capture import Tuning
    from .names import check_name
    from .restore import RestoreRequest

    settings = g.settings()
    check_name("VM", vm)
    for d in disks:
        check_name("disk", d)
    req = RestoreRequest(vm=vm, checkpoint=checkpoint, output=Path(output), format=fmt, disks=disks, force=force)
    with _interruptible() as cancel, _progress_bar("restore") as observer:
        paths = engine.restore(settings, req, tuning=Tuning(), cancel=cancel, observer=observer)
    for p in paths:
        click.echo(str(p))


@cli.command("list")
@click.argument("vm")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@pass_globals
def list_(g: Globals, vm: str, as_json: bool) -> None:
    """List the backups of VM, oldest first."""
    from . import engine

    manifests = engine.list_backups(g.settings(), vm)
    rows = [
        {
            "checkpoint": m.checkpoint,
            "kind": m.kind,
            "since": m.since,
            "created": m.created,
            "disks": [{"id": d.id, "size": d.size} for d in m.disks],
            "stored_bytes": m.stored_bytes,
            "read_bytes": m.read_bytes,
        }
        for m in manifests
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no backups of {vm}", err=True)
        return
    click.echo(f"{'CHECKPOINT':<28} {'KIND':<12} {'CREATED':<24} {'DISKS':<24} {'STORED':>10}")
    for r in rows:
        disks = ",".join(f"{d['id']}:{_size(d['size'])}" for d in r["disks"])
        click.echo(f"{r['checkpoint']:<28} {r['kind']:<12} {r['created']:<24} {disks:<24} {_size(r['stored_bytes']):>10}")


@cli.command()
@click.argument("vm")
@qmp_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@pass_globals
def checkpoints(g: Globals, vm: str, qmp: str | None, as_json: bool) -> None:
    """Show the checkpoint chain as QEMU and the repository see it (changes nothing).

    STATE is ok, missing, inconsistent, altered, busy, pending or orphan; USABLE
    says whether `incremental --since` that checkpoint would be accepted; DIRTY
    is what its bitmaps hold (changes until the next checkpoint, per disk).
    """
    from . import engine

    settings = g.settings()
    rows = engine.checkpoint_status(settings, settings.vm(vm, qmp))
    if as_json:
        click.echo(json.dumps([
            {"name": r.name, "created": r.created or None, "state": r.state, "active": r.active, "usable": r.usable,
             "dirty_bytes": r.dirty_bytes, "problems": list(r.problems)} for r in rows], indent=2))
        return
    if not rows:
        click.echo(f"no checkpoints for {vm}", err=True)
        return
    click.echo(f"{'CHECKPOINT':<28} {'CREATED':<24} {'STATE':<13} {'ACTIVE':<6} {'USABLE':<6} DIRTY")
    for r in rows:
        dirty = ",".join(f"{d}:{_size(n)}" for d, n in sorted(r.dirty_bytes.items()))
        click.echo(f"{r.name:<28} {r.created or '-':<24} {r.state:<13} {'yes' if r.active else '':<6} {'yes' if r.usable else '':<6} {dirty}")
    for r in rows:
        for p in r.problems:
            click.echo(f"nbdbackup: {r.name}: {p}", err=True)


@cli.command()
@click.argument("vm")
@click.argument("checkpoint")
@qmp_option
@click.option("--keep-backup", is_flag=True, help="Keep the backup made at CHECKPOINT (it stays restorable).")
@pass_globals
def delete(g: Globals, vm: str, checkpoint: str, qmp: str | None, keep_backup: bool) -> None:
    """Delete CHECKPOINT anywhere in the chain, on all disks in one transaction.

    Its bitmap is merged into the previous checkpoint's (which becomes active if
    CHECKPOINT was the newest), so every other checkpoint stays usable. Its backup
    is deleted too unless --keep-backup; other backups stay restorable.
    """
    from . import engine

    settings = g.settings()
    engine.delete_checkpoint(settings, settings.vm(vm, qmp), checkpoint, keep_backup=keep_backup)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


@contextlib.contextmanager
def _interruptible() -> Iterator[Any]:
    """SIGINT/SIGTERM set a token the engine checks at safe points, so cleanup always runs."""
    from .capture import CancelToken

    cancel = CancelToken()

    def handler(signum: int, frame: Any) -> None:
        if cancel.signum is None:
            click.echo(f"nbdbackup: {signal.Signals(signum).name} received, stopping and cleaning up...", err=True)
        cancel.set(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield cancel
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _progress_bar(what: str) -> Iterator[Any]:
    from .engine import Observer

    if not sys.stderr.isatty():
        yield Observer()
        return
    from tqdm import tqdm

    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=what, file=sys.stderr, leave=False)

    def start(total: int) -> None:
        bar.total = total
        bar.refresh()

    try:
        yield Observer(on_start=start, progress=bar.update)
    finally:
        bar.close()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI, map errors to exit codes."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="nbdbackup", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("nbdbackup: aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "nbdbackup"
        click.echo(f"nbdbackup: error: {exc.format_message()} (see '{where} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"nbdbackup: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("nbdbackup: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        from .errors import NbdBackupError

        if debug:
            traceback.print_exc()
        if isinstance(exc, NbdBackupError):
            click.echo(f"nbdbackup: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        click.echo(f"nbdbackup: unexpected error: {type(exc).__name__}: {exc} (run with --debug for details)", err=True)
        sys.exit(1)
    sys.exit(0)
