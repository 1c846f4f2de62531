"""The command line as restic and borg users type it: global options anywhere, bare
`nbdbackup` is help, a missing config file is named as missing, the VMs of a repository
are listed, and counts read as English."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cli
import click
import pytest

from nbdbackup.cli import cli as group
from nbdbackup.cli import hoist_global_options
from nbdbackup.repository import Repository


def nbdbackup(*args: str, env: dict[str, str] | None = None, process: bool = False) -> subprocess.CompletedProcess[str]:
    """nbdbackup with exactly these arguments: in this process, or in a real one (process=True)."""
    if not process:
        return cli.in_process(list(map(str, args)), env or cli.environment())
    return subprocess.run([sys.executable, "-m", "nbdbackup", *map(str, args)], capture_output=True, text=True,
                          env=env or cli.environment(), timeout=60)


def test_bare_nbdbackup_prints_help_without_an_error():
    proc = nbdbackup(process=True)  # a real process: `python -m nbdbackup`, its entry point and exit status
    assert proc.returncode == 0
    assert proc.stdout.startswith("Usage: nbdbackup [OPTIONS] COMMAND") and "Commands:" in proc.stdout
    assert "error" not in proc.stderr.lower() and proc.stderr == ""


@pytest.mark.parametrize("args, expected", [
    (["list", "vm1", "--repo", "R"], ["--repo", "R", "list", "vm1"]),
    (["list", "vm1", "-r", "R", "--json"], ["-r", "R", "list", "vm1", "--json"]),
    (["--debug", "full", "vm1", "--qmp", "S", "--log-file", "L", "--metrics-file", "M"],
     ["--debug", "--log-file", "L", "--metrics-file", "M", "full", "vm1", "--qmp", "S"]),
    (["auto", "--all", "--config=C", "--debug"], ["--config=C", "--debug", "auto", "--all"]),
    (["--repo", "list", "list", "vm1"], ["--repo", "list", "list", "vm1"]),  # a value that looks like a command
    (["restore", "vm1", "--", "--repo"], ["restore", "vm1", "--", "--repo"]),  # after --, nothing moves
])
def test_global_options_move_before_the_command(args, expected):
    assert hoist_global_options(group, args) == expected


def test_a_commands_own_option_of_the_same_name_stays_its_own():
    @click.group(cls=type(group))
    @click.option("--repo")
    def g(repo):
        pass

    @g.command()
    @click.option("--repo")
    def copy(repo):
        pass

    assert hoist_global_options(g, ["copy", "--repo", "X"]) == ["copy", "--repo", "X"]
    assert hoist_global_options(g, ["--repo", "A", "copy", "--repo", "B"]) == ["--repo", "A", "copy", "--repo", "B"]


def test_global_options_after_the_command_work(tmp_path):
    repo = tmp_path / "repo"
    Repository.open(repo, create=True)
    env = cli.environment()
    for args in (["list", "--repo", repo, "--json"], ["list", "-r", repo, "--json"], ["-r", repo, "list", "--json"],
                 ["list", "--json", f"--repo={repo}", "--debug"]):
        proc = nbdbackup(*args, env=env)
        assert proc.returncode == 0, (args, proc.stderr)
        assert json.loads(proc.stdout) == []
    proc = nbdbackup("list", "vm1", "--repo", tmp_path / "nothing", env=env, process=True)  # an error's status from a real process
    assert proc.returncode == 7 and "there is no repository at" in proc.stderr and str(tmp_path / "nothing") in proc.stderr


def test_auto_all_without_a_config_file_says_none_was_found_and_where_it_looked(tmp_path):
    assert not Path("/etc/nbdbackup/config.toml").exists(), "the test needs a machine without /etc/nbdbackup/config.toml"
    env = cli.environment() | {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    env.pop("NBDBACKUP_CONFIG")
    proc = nbdbackup("--repo", tmp_path / "repo", "auto", "--all", env=env)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert "there is no config file" in line and "/etc/nbdbackup/config.toml" in line and str(tmp_path / "xdg/nbdbackup/config.toml") in line
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    proc = nbdbackup("--repo", tmp_path / "repo", "--config", empty, "auto", "--all", env=env)
    assert proc.returncode == 2 and f"the config file {empty} names no VM" in proc.stderr


def test_list_without_a_vm_in_an_empty_repository(tmp_path):
    Repository.open(tmp_path / "repo", create=True)
    proc = cli.run(tmp_path / "repo", "list")
    assert proc.stdout == "" and f"no backups in {tmp_path / 'repo'}" in proc.stderr
    assert json.loads(cli.run(tmp_path / "repo", "list", "--json").stdout) == []


def test_counts_read_as_english():
    from nbdbackup.cli.common import plural

    assert [plural(n, "backup") for n in (0, 1, 2)] == ["0 backups", "1 backup", "2 backups"]
    assert plural(1, "chunk") + " checked" == "1 chunk checked"
    assert plural(3, "VM") == "3 VMs"


def test_no_internal_jargon_in_help_man_page_or_readme():
    top = Path(__file__).resolve().parent.parent
    texts = {"man page": (top / "man/nbdbackup.1").read_text(), "README": (top / "README.md").read_text()}
    for name, command in [("", group), *group.commands.items()]:
        with group.make_context("nbdbackup", [name] if name else [], resilient_parsing=True) as ctx:
            texts[f"{name or 'nbdbackup'} --help"] = command.get_help(ctx)
    for where, text in texts.items():
        for word in ("the seed", "seed's", "fleecing overlay", " 1 backups", " 1 chunks", " 1 VMs"):
            assert word not in text, f"{where}: {word!r}"
