"""One source for what users read: the exit-code table comes from nbdbackup/errors.py
(--help at run time, the man page and README through scripts/docs), and the man page's
commands and options are those of the command line, in both directions."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
import click.testing

from nbdbackup import errors
from nbdbackup.cli import cli

TOP = Path(__file__).resolve().parent.parent
MAN = (TOP / "man/nbdbackup.1").read_text()


def section(name: str) -> str:
    return MAN.split(f"\n.SH {name}\n", 1)[1].split("\n.SH ", 1)[0]


def options_in(text: str) -> set[str]:
    """The long options (without --) named in roff text."""
    plain = re.sub(r"\\f[BIRP]", "", text).replace("\\-", "-")
    return set(re.findall(r"(?<![\w-])--([a-z][a-z-]*[a-z])", plain))


def long_options(command: click.Command, *, without=("help",)) -> set[str]:
    return {o[2:] for p in command.params if isinstance(p, click.Option) for o in p.opts if o.startswith("--")} - set(without)


def test_generated_sections_are_up_to_date():
    proc = subprocess.run([sys.executable, str(TOP / "scripts/docs"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_exit_status_table_covers_every_exit_code():
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    codes = {errors.NbdBackupError.exit_code} | {c.exit_code for c in subclasses(errors.NbdBackupError) if isinstance(c.__dict__.get("exit_code"), int)}
    codes |= {0, *errors.EXIT_CODES.values()}
    table = [code for s in errors.EXIT_STATUS for code in s.codes]
    assert len(table) == len(set(table))
    assert set(table) == codes
    text = click.testing.CliRunner().invoke(cli, ["--help"]).output
    flat = " ".join(text.split())
    for s in errors.EXIT_STATUS:
        assert f"{'/'.join(map(str, s.codes))} {s.short}" in flat
    for s in errors.EXIT_STATUS:  # and the man page's table says the same (through scripts/docs)
        assert f".B {s.codes[0]}\n" in section("EXIT STATUS") or ".BR " + ' ", " '.join(map(str, s.codes)) in section("EXIT STATUS")


def synopsis() -> dict[str, set[str]]:
    """Command -> the options its SYNOPSIS line shows (backup-options expanded)."""
    text = section("SYNOPSIS")
    entries, rest = text.split("\n.PP\n", 1)
    backup = options_in(rest.split("backup-options", 1)[1])
    result = {}
    for entry in entries.split("\n.br\n"):
        words = re.findall(r"^\.B (\S+)$", entry, re.M)
        if len(words) < 2:
            continue  # nbdbackup --version | --help
        opts = options_in(entry) | (backup if "backup-options" in entry else set())
        result[words[1]] = opts
    return result


def test_synopsis_shows_every_command_with_exactly_its_options():
    shown = synopsis()
    assert set(shown) == set(cli.commands)
    for name, command in cli.commands.items():
        assert shown[name] == long_options(command), name


def test_synopsis_global_options_are_the_command_lines():
    rest = section("SYNOPSIS").split("\n.PP\n", 1)[1]
    assert options_in(rest.split("backup-options", 1)[0]) == long_options(cli, without=("help", "version"))


def commands_section() -> dict[str, set[str]]:
    """Command -> the options described in its entry of COMMANDS (items of its .RS block)."""
    described: dict[str, set[str]] = {}
    depth, current, after_tp = 0, None, False
    for line in section("COMMANDS").splitlines():
        if line == ".RS":
            depth += 1
        elif line == ".RE":
            depth -= 1
        elif line.startswith(".TP"):
            after_tp = True
            continue
        elif after_tp and depth == 0:
            current = re.match(r"\.B[IR]? (\S+)", line).group(1)
            described[current] = set()
        elif after_tp and depth == 1 and re.match(r"\.B[IR]? \\-\\-", line):
            described[current] |= options_in(line)
        after_tp = False
    return described


def items(text: str) -> set[str]:
    """The options of the .TP items of a section."""
    return set().union(*(options_in(block.split("\n", 1)[0]) for block in text.split("\n.TP\n")[1:]))


def test_commands_section_describes_every_command_and_option():
    described = commands_section()
    backup = items(section("BACKUP OPTIONS"))
    assert set(described) == set(cli.commands)
    for name, command in cli.commands.items():
        expected = long_options(command)
        if "backup-options" in section("SYNOPSIS").split(f".B {name}\n", 1)[1].split(".br", 1)[0]:
            expected -= backup
        assert described[name] == expected, name
    assert backup == long_options(cli.commands["full"]) & long_options(cli.commands["incremental"]) & long_options(cli.commands["auto"])


def test_global_options_section_is_the_command_lines():
    text = section("GLOBAL OPTIONS")
    assert items(text) == long_options(cli, without=()) | {"help"}  # click adds --help itself
    assert ".BR \\-r \", \" \\-\\-repo" in text


def test_readme_and_man_tell_the_same_exit_codes():
    readme = (TOP / "README.md").read_text()
    for s in errors.EXIT_STATUS:
        assert f"| {', '.join(map(str, s.codes))} | {s.detail} |" in readme
