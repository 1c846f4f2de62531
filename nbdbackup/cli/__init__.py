"""The command line: parse, resolve settings once, call the engine, print, exit.

Only click is imported at module level, so `--help` is fast and works even
where libnbd or QEMU is missing; domain modules are imported by commands.
All results go to stdout, all diagnostics to stderr; exit codes come from
nbdbackup.errors and nowhere else.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

import click

from .. import __version__
from ..errors import exit_status_help
from . import backup, checkpoints, copy, keys, listing, logs, mount, prune, recover, restore, rollback, serve, verify
from .common import Globals


class Group(click.Group):
    """The command group; global options may also come after the command (as restic and borg take them)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_options(self, args))


def hoist_global_options(group: click.Group, args: list[str]) -> list[str]:
    """Move the group's own options found after the command name to before it.

    `nbdbackup list vm1 --repo X` becomes `nbdbackup --repo X list vm1`. Stops at `--`;
    leaves alone an option that the command itself also has.
    """
    flags = {name for p in group.params if isinstance(p, click.Option) and p.is_flag for name in p.opts}
    valued = {name for p in group.params if isinstance(p, click.Option) and not p.is_flag for name in p.opts}
    before: list[str] = []
    i = 0
    while i < len(args):  # the global options before the command, with their values
        if args[i] in valued:
            before += args[i:i + 2]
            i += 2
        elif args[i].startswith("-") and args[i] != "--":
            before.append(args[i])
            i += 1
        else:
            break
    if i >= len(args) or args[i] not in group.commands:
        return args
    own = {name for p in group.commands[args[i]].params for name in getattr(p, "opts", ())}
    flags, valued = flags - own, valued - own  # a command's own option of the same name stays its own
    hoisted: list[str] = []
    rest: list[str] = [args[i]]
    i += 1
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg in flags:
            hoisted.append(arg)
        elif arg in valued and i + 1 < len(args):
            hoisted += args[i:i + 2]
            i += 1
        elif arg.startswith("--") and arg.split("=", 1)[0] in valued and "=" in arg:
            hoisted.append(arg)
        else:
            rest.append(arg)
        i += 1
    return before + hoisted + rest


GLOBAL_HELP = """Incremental backups of running QEMU VMs, over QMP and NBD.

Global options may come before or after the command.

"""


@click.group(cls=Group, help=GLOBAL_HELP + exit_status_help(),
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--repo", "-r", metavar="PATH|s3://BUCKET/PREFIX", help="Repository: a directory or S3 object storage (settings in [s3]) [env NBDBACKUP_REPO; config 'repository'; default /var/lib/nbdbackup, or $XDG_DATA_HOME/nbdbackup for non-root].")
@click.option("--config", metavar="FILE", help="TOML config file [env NBDBACKUP_CONFIG; default /etc/nbdbackup/config.toml, then $XDG_CONFIG_HOME/nbdbackup/config.toml].")
@click.option("--debug", is_flag=True, help="Log every QMP exchange and S3 request; show tracebacks.")
@click.option("--log-file", metavar="FILE", help="Also log to FILE (appended). Syslog gets the log too when stderr is not a terminal.")
@click.option("--metrics-file", metavar="FILE", help="Prometheus textfile updated by every backup run (node_exporter's textfile collector).")
@click.version_option(__version__, prog_name="nbdbackup")
@click.pass_context
def cli(ctx: click.Context, repo: str | None, config: str | None, debug: bool, log_file: str | None, metrics_file: str | None) -> None:
    logs.setup(debug=debug, log_file=log_file)
    ctx.obj = Globals(repo, config, debug, log_file, metrics_file)


for command in (
    backup.full,
    backup.incremental,
    backup.auto,
    restore.restore,
    rollback.rollback,
    listing.list_,
    checkpoints.checkpoints,
    checkpoints.delete,
    prune.prune,
    verify.verify,
    copy.copy,
    serve.serve,
    mount.mount,
    mount.umount,
    recover.recover,
    keys.init,
    keys.key,
):
    cli.add_command(command)

for command in cli.commands.values():  # every command, also those registered above by others
    command.epilog = ((command.epilog + "\n\n") if command.epilog else "") + (
        "Global options (--repo/-r, --config, --log-file, --metrics-file, --debug) may come before or after the command; see 'nbdbackup --help'.")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI, map errors to exit codes.  As a process of its own (argv
    None), it ends without tearing the interpreter down once all output is out (see _exit_now)."""
    if argv is not None:  # called from Python (tests): leave the interpreter alone
        return _main(argv)
    try:
        _main(None)
    except SystemExit as exc:
        _exit_now(exc.code)


def _exit_now(code: object) -> None:
    """sys.exit(code) without the interpreter's teardown: by now every context manager has run (locks
    released, QEMU cleaned up, uploads synced), so what is left is freeing every object one by one,
    ~0.1 s after an S3 run (botocore's service model), which an incremental backup would wait for.
    stdout, stderr and the log handlers are flushed first; worker threads are idle or, after an
    error, abandoned with nothing committed (as the interpreter would have done after waiting)."""
    status = code if isinstance(code, int) else 0 if code is None else 1
    if not isinstance(code, int | None):
        print(code, file=sys.stderr)  # what sys.exit("text") prints
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: the interpreter would not have written it either
            status = status or 120
    os._exit(status)


def _main(argv: list[str] | None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    debug = "--debug" in args
    if not args:  # bare `nbdbackup`: the help, as git and restic show it, not an error
        with click.Context(cli, info_name="nbdbackup", **cli.context_settings) as ctx:
            click.echo(ctx.get_help())
        sys.exit(0)
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
            logs.final_error(exc, str(exc))
            sys.exit(exc.exit_code)
        click.echo(f"nbdbackup: unexpected error: {type(exc).__name__}: {exc} (run with --debug for details)", err=True)
        logs.final_error(exc, f"unexpected error: {type(exc).__name__}: {exc}")
        sys.exit(1)
    sys.exit(0)
