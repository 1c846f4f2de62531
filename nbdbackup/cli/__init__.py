"""The command line: parse, resolve settings once, call the engine, print, exit.

Only click is imported at module level, so `--help` is fast and works even
where libnbd or QEMU is missing; domain modules are imported by commands.
All results go to stdout, all diagnostics to stderr; exit codes come from
nbdbackup.errors and nowhere else.
"""

from __future__ import annotations

import sys
import traceback

import click

from .. import __version__
from . import backup, checkpoints, listing, logs, mount, prune, recover, restore, serve, verify
from .common import Globals


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--repo", metavar="PATH", help="Repository [env NBDBACKUP_REPO; config 'repository'; default /var/lib/nbdbackup, or $XDG_DATA_HOME/nbdbackup for non-root].")
@click.option("--config", metavar="FILE", help="TOML config file [env NBDBACKUP_CONFIG; default /etc/nbdbackup/config.toml, then $XDG_CONFIG_HOME/nbdbackup/config.toml].")
@click.option("--debug", is_flag=True, help="Log every QMP exchange; show tracebacks.")
@click.option("--log-file", metavar="FILE", help="Also log to FILE (appended). Syslog gets the log too when stderr is not a terminal.")
@click.option("--metrics-file", metavar="FILE", help="Prometheus textfile updated by every backup run (node_exporter's textfile collector).")
@click.version_option(__version__, prog_name="nbdbackup")
@click.pass_context
def cli(ctx: click.Context, repo: str | None, config: str | None, debug: bool, log_file: str | None, metrics_file: str | None) -> None:
    """Incremental backups of running QEMU VMs, over QMP and NBD.

    Exit codes: 0 success, 1 unexpected error, 2 usage error, 3 VM unreachable
    or unsuitable, 4 checkpoint unknown or chain broken, 5 VM locked by another
    run, 6 repository damaged, 7 repository unusable (newer format, read-only,
    full), 8 restore target cannot be written, 13 socket or address in use,
    14 mount directory unusable, 15 nbdkit/FUSE/loop devices missing,
    130/143 interrupted.
    """
    logs.setup(debug=debug, log_file=log_file)
    ctx.obj = Globals(repo, config, debug, log_file, metrics_file)


for command in (
    backup.full,
    backup.incremental,
    backup.auto,
    restore.restore,
    listing.list_,
    checkpoints.checkpoints,
    checkpoints.delete,
    prune.prune,
    verify.verify,
    serve.serve,
    mount.mount,
    mount.umount,
    recover.recover,
):
    cli.add_command(command)


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
        from ..errors import NbdBackupError

        if debug:
            traceback.print_exc()
        if isinstance(exc, NbdBackupError):
            click.echo(f"nbdbackup: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        click.echo(f"nbdbackup: unexpected error: {type(exc).__name__}: {exc} (run with --debug for details)", err=True)
        sys.exit(1)
    sys.exit(0)
