"""init and key: create a repository (encrypted or not), manage an encrypted repository's keys."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import Globals, pass_globals

PASSPHRASE_HELP = ("The passphrase comes from the file $NBDBACKUP_PASSWORD_FILE, the output of "
                   "$NBDBACKUP_PASSWORD_COMMAND, or a prompt on the terminal; never from the command line.")


@click.command()
@click.option("--encryption", type=click.Choice(["repokey", "keyfile", "none"]),
              help="repokey: the key, protected by a passphrase, is stored in the repository; keyfile: only in a local key "
                   "file ($NBDBACKUP_KEY_FILE, default $XDG_CONFIG_HOME/nbdbackup/keys/<id>.json); none: not encrypted "
                   "[default: config 'encryption', else none].")
@pass_globals
def init(g: Globals, encryption: str | None) -> None:
    """Create an empty repository at --repo, encrypted or not (chosen once, for good).

    Without init, the first backup creates the repository as the config file's
    'encryption' says. A lost key or passphrase means lost backups: export the
    key ('nbdbackup key export') and keep it and the passphrase safe.
    """
    from .. import engine

    result = engine.init_repository(g.settings(needs_config=False), encryption)
    click.echo(f"created repository {result.path} (id {result.repo_id}, encryption {result.encryption})")
    if result.key_file is not None:
        click.echo(f"the key is in {result.key_file} only: back it up (without it the backups cannot be read)")
    elif result.encryption != "none":
        click.echo("keep the passphrase safe and export the key ('nbdbackup key export FILE'): without them the backups cannot be read")


init.help = (init.help or "") + "\n\n" + PASSPHRASE_HELP


@click.group()
def key() -> None:
    """Manage the keys of an encrypted repository (the data is never re-encrypted).

    Each key opens the repository's master key with its own passphrase.
    'key add' and 'key passwd' read the new passphrase from
    $NBDBACKUP_NEW_PASSWORD_FILE, $NBDBACKUP_NEW_PASSWORD_COMMAND or the terminal.
    """


key.help = (key.help or "") + "\n\n" + PASSPHRASE_HELP


@key.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@pass_globals
def key_list(g: Globals, as_json: bool) -> None:
    """List the keys; '*' marks the one the passphrase opened."""
    from .. import engine

    rows = engine.list_keys(g.settings(needs_config=False))
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in rows], indent=2))
        return
    for r in rows:
        click.echo(f"{'*' if r.current else ' '} {r.id}  {r.created:<24}  {r.kdf}")


@key.command("add")
@pass_globals
def key_add(g: Globals) -> None:
    """Add a key with a new passphrase (the current one keeps working)."""
    from .. import engine

    click.echo(f"added key {engine.add_key(g.settings(needs_config=False))}")


@key.command("remove")
@click.argument("key_id", metavar="KEY_ID")
@pass_globals
def key_remove(g: Globals, key_id: str) -> None:
    """Remove the key KEY_ID (see 'key list'); the last key is never removed."""
    from .. import engine

    engine.remove_key(g.settings(needs_config=False), key_id)
    click.echo(f"removed key {key_id}")


@key.command("passwd")
@pass_globals
def key_passwd(g: Globals) -> None:
    """Change the passphrase of the key the current passphrase opens."""
    from .. import engine

    click.echo(f"passphrase changed (key {engine.change_passphrase(g.settings(needs_config=False))})")


@key.command("export")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@pass_globals
def key_export(g: Globals, file: Path | None) -> None:
    """Write the repository's keys to FILE (or stdout) as a key file.

    The key file is still protected by the passphrases. With it (as
    $NBDBACKUP_KEY_FILE) the repository can be opened even if the keys stored
    in it are lost. Keep it apart from the repository.
    """
    from .. import engine

    data = engine.export_key(g.settings(needs_config=False), file)
    if file is None:
        click.echo(data.decode(), nl=False)
    else:
        click.echo(f"exported the keys to {file}", err=True)
