"""The command line: parse, resolve settings once, call the engine, print, exit.

Only click is imported at module level, so `--help` is fast and works even
where libnbd or QEMU is missing; domain modules are imported by commands.
Each command's module is imported only when that command is looked up
(COMMANDS below), so `nbdbackup list` loads click, cli/common and cli/listing.
All results go to stdout, all diagnostics to stderr; exit codes come from
nbdbackup.errors and nowhere else.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from .. import __version__
from ..errors import exit_status_help
from . import logs
from .common import Globals

# The commands: name -> "module:attribute" under nbdbackup.cli, imported when the command is
# looked up (click's "lazily loading subcommands").  A new command is one line here.
COMMANDS = {
    "full": "backup:full",
    "incremental": "backup:incremental",
    "auto": "backup:auto",
    "restore": "restore:restore",
    "rollback": "rollback:rollback",
    "list": "listing:list_",
    "checkpoints": "checkpoints:checkpoints",
    "delete": "checkpoints:delete",
    "prune": "prune:prune",
    "verify": "verify:verify",
    "copy": "copy:copy",
    "serve": "serve:serve",
    "mount": "mount:mount",
    "umount": "mount:umount",
    "recover": "recover:recover",
    "init": "keys:init",
    "key": "keys:key",
}

GLOBAL_EPILOG = ("Global options (--repo/-r, --config, --log-file, --metrics-file, --debug) may come before "
                 "or after the command; see 'nbdbackup --help'.")


class Group(click.Group):
    """The command group; global options may also come after the command (as restic and borg take them).

    Commands named in `lazy` are imported at their first lookup (get_command); `commands` (the
    mapping click and the tests read) loads them all, so it lists every command as before."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs) -> None:
        self._loaded: dict[str, click.Command] = {}
        self.lazy = dict(lazy or {})
        super().__init__(*args, **kwargs)

    @property  # type: ignore[override]
    def commands(self) -> dict[str, click.Command]:
        for name in list(self.lazy):
            self._load(name)
        return self._loaded

    @commands.setter
    def commands(self, value) -> None:
        self._loaded = dict(value)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._load(cmd_name) if cmd_name in self.lazy else self._loaded.get(cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self._loaded, *self.lazy})

    def _load(self, name: str) -> click.Command:
        module, attribute = self.lazy[name].split(":")
        command = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
        self._loaded[name] = with_global_epilog(command)
        del self.lazy[name]
        return command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_options(self, args, ctx))


def with_global_epilog(command: click.Command) -> click.Command:
    """The note on global options, once, at the end of the command's help."""
    if not (command.epilog or "").endswith(GLOBAL_EPILOG):
        command.epilog = ((command.epilog + "\n\n") if command.epilog else "") + GLOBAL_EPILOG
    return command


def hoist_global_options(group: click.Group, args: list[str], ctx: click.Context | None = None) -> list[str]:
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
    command = None if i >= len(args) else group.get_command(ctx or click.Context(group), args[i])
    if command is None:
        return args
    own = {name for p in command.params for name in getattr(p, "opts", ())}
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


@click.group(cls=Group, lazy=COMMANDS, help=GLOBAL_HELP + exit_status_help(),
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


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI, map errors to exit codes.  As the program (no argv), it
    leaves without the interpreter's teardown once its output is flushed (see leave())."""
    try:
        run(argv)
    except SystemExit as exc:
        if argv is None:
            leave(exc.code)
        raise


def leave(code: object) -> None:
    """Exit now with code (as sys.exit reads it): the command is done, everything it opened is
    closed (its with-blocks have ended: daemons quit, images flushed, locks released), so what
    Python's teardown would still do (collect and free every object and module: 30-50 ms for a
    rollback) is waste.  Logging and the standard streams are flushed first.  The ordinary exit
    follows instead when the code is not a number, a thread of ours still runs (the teardown
    would wait for it), or flushing fails (a closed pipe: the teardown reports it)."""
    import logging
    import threading

    if code is not None and not isinstance(code, int):
        return
    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        return
    try:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        return
    os._exit(code or 0)


def run(argv: list[str] | None) -> None:
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
            import traceback

            traceback.print_exc()
        if isinstance(exc, NbdBackupError):
            click.echo(f"nbdbackup: error: {exc}", err=True)
            logs.final_error(exc, str(exc))
            sys.exit(exc.exit_code)
        click.echo(f"nbdbackup: unexpected error: {type(exc).__name__}: {exc} (run with --debug for details)", err=True)
        logs.final_error(exc, f"unexpected error: {type(exc).__name__}: {exc}")
        sys.exit(1)
    sys.exit(0)
