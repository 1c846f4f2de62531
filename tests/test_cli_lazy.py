"""Each command's module is imported only when that command runs (issue 15's start-up cost);
`--help` still lists every command.  No QEMU needed."""

from __future__ import annotations

import json
import subprocess
import sys

import cli
import pytest

from nbdbackup.cli import COMMANDS

COMMAND_MODULES = {f"nbdbackup.cli.{target.split(':')[0]}" for target in COMMANDS.values()}

# Runs the program's main() on argv in a fresh interpreter, then prints its exit status and the
# nbdbackup.cli modules that were imported, as JSON on the last line of stdout.
PROBE = """
import json, sys
from nbdbackup.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps([code, sorted(m for m in sys.modules if m.startswith("nbdbackup.cli."))]))
"""


def probe(*args: object) -> tuple[object, set[str]]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True,
                          env=cli.environment(), timeout=60)
    code, modules = json.loads(proc.stdout.splitlines()[-1])
    return code, set(modules)


@pytest.mark.parametrize("args, module", [
    (["rollback", "vm1", "--to", "20260101T000000000Z-aaaaaa", "--image", "vda=/nonexistent/vda.qcow2", "--dry-run"],
     "nbdbackup.cli.rollback"),
    (["list", "--json"], "nbdbackup.cli.listing"),
])
def test_a_command_imports_only_its_own_command_module(tmp_path, args, module):
    code, modules = probe("--repo", tmp_path / "no-repository", *args)
    assert code == 7  # it really ran: the repository is missing
    assert module in modules
    assert modules & COMMAND_MODULES == {module}, "also imported: " + ", ".join(sorted(modules & COMMAND_MODULES - {module}))


def test_global_options_after_the_command_still_work_without_loading_the_others(tmp_path):
    code, modules = probe("list", "--json", "--repo", tmp_path / "no-repository")
    assert code == 7 and modules & COMMAND_MODULES == {"nbdbackup.cli.listing"}


def test_help_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "nbdbackup", "--help"], capture_output=True, text=True,
                          env=cli.environment(), timeout=60)
    assert proc.returncode == 0
    listed = proc.stdout.split("\nCommands:\n", 1)[1].splitlines()
    assert {line.split()[0] for line in listed if line.strip()} == set(COMMANDS)


def test_every_registered_name_is_the_commands_own_name():
    from nbdbackup.cli import cli as group

    assert set(group.commands) == set(COMMANDS)
    for name, command in group.commands.items():
        assert command.name == name
        assert command.epilog.count("Global options (--repo/-r") == 1
