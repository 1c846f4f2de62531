"""README's examples work as written.

Fast: every nbdbackup command line in README's code blocks (sh, console, cron, systemd)
parses with the real command line (commands, options, their values and arguments); every
TOML block is a valid configuration; the scripts and their options exist; the systemd
lines quoted are the unit's; the Quick start's QEMU command has the disks its config names.
With QEMU: the Quick start itself, run as written (paths moved under a temporary directory,
QEMU's `...` filled in), then the images restored and compared with the VM's disks.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import cli as cli_runner
import click
import pytest
from harness import QEMU_SYSTEM

from nbdbackup.cli import cli, hoist_global_options
from nbdbackup.config import TOP_KEYS, _parse_vms

TOP = Path(__file__).resolve().parent.parent
README = (TOP / "README.md").read_text()
NBDBACKUP = ("nbdbackup", "/usr/local/bin/nbdbackup")


def blocks(text: str = README) -> list[tuple[str, str]]:
    """(language, body) of every fenced block starting in column 0."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M)


def section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def shell_lines(lang: str, body: str) -> list[str]:
    """The command lines of a block: backslash continuations joined, `$ ` prompts only in console blocks."""
    body = body.replace("\\\n", " ")
    if lang == "console":
        return [line[2:] for line in body.splitlines() if line.startswith("$ ")]
    lines = []
    for line in body.splitlines():
        line = line.strip()
        if line.startswith(("ExecStart=", "ExecStopPost=")):
            line = line.split("=", 1)[1]
        elif re.match(r"^[\d*]+ [\d*]+ [\d*]+ [\d*]+ [\d*]+ \w+ ", line):  # a crontab line
            line = line.split(None, 6)[6]
        lines.append(line)
    return lines


def commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, without redirections and comments."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";|&")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    result, current = [], []
    for token in lexer:
        if token in (";", "|", "&&", "||", "&"):
            result.append(current)
            current = []
        elif not re.match(r"^\d?>", token) and token not in (">", "<"):
            current.append(token)
    result.append(current)
    return [c for c in result if c]


def nbdbackup_commands() -> list[list[str]]:
    found = []
    for lang, body in blocks():
        if lang not in ("", "sh", "console"):
            continue
        for line in shell_lines(lang, body):
            for argv in commands(line):
                if argv[0] in NBDBACKUP:
                    found.append(argv[1:])
    return found


def parse(args: list[str]) -> tuple[str, click.Context]:
    """Parse as nbdbackup would, without running anything; UsageError if it would refuse."""
    ctx = cli.make_context("nbdbackup", hoist_global_options(cli, list(args)))
    rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
    name, command, sub = cli.resolve_command(ctx, rest)
    return name, command.make_context(name, sub, parent=ctx)


def test_every_nbdbackup_command_in_readme_parses():
    found = nbdbackup_commands()
    assert len(found) >= 20, found
    used = set()
    for args in found:
        try:
            name, _ = parse(args)
        except click.UsageError as exc:
            pytest.fail(f"README: nbdbackup {' '.join(args)}: {exc.format_message()}")
        used.add(name)
    assert used == set(cli.commands), "README shows no example of " + ", ".join(set(cli.commands) - used)


@functools.cache
def bench_help() -> str:
    """scripts/bench's --help (once: a Python start and the benchmark's imports)."""
    return subprocess.run([sys.executable, str(TOP / "scripts/bench_run.py"), "--help"], capture_output=True, text=True, check=True).stdout


def test_every_option_readme_names_in_backquotes_exists():
    known = {o for c in [cli, *cli.commands.values()] for p in c.params for o in getattr(p, "opts", [])} | {"--help", "-h"}
    named = set(re.findall(r"`[^`]*?(--[a-z][a-z-]+)", README))
    bench = bench_help()
    unknown = {o for o in named if o not in known and o not in bench}
    # Options of other programs that README names with the program.
    unknown -= {"--system-site-packages", "--now", "--request-size", "--rev", "--variant", "--fast"}
    unknown -= {"--map", "--offset", "--no-sr"}  # nbdinfo, losetup, nbdkit (Getting things back)
    unknown -= {"--reps", "--phases", "--tools", "--perf-extra"}  # the side-by-side comparison's run_all.sh (Performance)
    assert unknown == set()


def test_scripts_readme_runs_exist_with_their_options():
    bench = bench_help()
    for lang, body in blocks():
        for line in shell_lines(lang, body) if lang in ("sh", "") else []:
            for argv in commands(line):
                if argv[0].startswith("scripts/"):
                    assert (TOP / argv[0]).is_file() and os.access(TOP / argv[0], os.X_OK), argv[0]
                    if argv[0] == "scripts/bench":
                        for opt in (a for a in argv[1:] if a.startswith("--")):
                            assert opt in bench, f"scripts/bench has no {opt}"


def test_every_toml_block_is_a_valid_configuration():
    tomls = [body for lang, body in blocks() if lang == "toml"]
    assert tomls
    for body in tomls:
        data = tomllib.loads(body)
        assert set(data) <= TOP_KEYS
        _parse_vms(data.get("vm", {}), Path("README.md"))


def test_quick_start_qemu_command_has_the_disks_of_its_config():
    quick = section("Quick start")
    [qemu] = [b for lang, b in blocks(quick) if lang == "sh" and "qemu-system-x86_64" in b]
    ids = set(re.findall(r"-device [\w-]+,drive=[\w-]+,id=(\w+)", qemu))
    [toml] = [b for lang, b in blocks(quick) if lang == "toml"]
    vm1 = tomllib.loads(toml)["vm"]["vm1"]
    assert set(vm1["disks"]) <= ids, (vm1["disks"], ids)
    assert not set(vm1.get("exclude", ())) & set(vm1["disks"])
    assert re.search(r"-qmp unix:([^,\s]+)", qemu).group(1) == vm1["qmp"]
    assert re.search(r"-chardev socket,path=([^,\s]+)", qemu).group(1) == vm1["qga"]


def test_systemd_lines_quoted_in_readme_are_the_units():
    unit = (TOP / "scripts/systemd/nbdbackup.service").read_text().splitlines()
    quoted = [b for lang, b in blocks(section("Scheduled backups")) if lang == "" and "ExecStart=" in b]
    assert quoted
    for line in quoted[0].strip().splitlines():
        assert line in unit, line


def moved(text: str, root: Path) -> str:
    """README's absolute paths, moved under root."""
    return re.sub(r"(?<![\w./])/(run|srv|var/tmp)/", lambda m: f"{root}/{m.group(1)}/", text)


@pytest.mark.qemu
def test_quick_start_runs_as_written(tmp_path):
    """Start QEMU with the Quick start's command, write its config, run its commands in order."""
    quick = section("Quick start")
    sh = [b for lang, b in blocks(quick) if lang == "sh"]
    [toml] = [b for lang, b in blocks(quick) if lang == "toml"]
    root = tmp_path / "root"
    for d in ("run", "srv/vm1", "srv/restore", "var/tmp"):
        (root / d).mkdir(parents=True)

    [qemu_argv] = commands(shell_lines("sh", moved(sh[0], root))[0])
    assert qemu_argv[0] == "qemu-system-x86_64" and "..." in qemu_argv
    images = [Path(re.search(r"filename=([^,]+)", a).group(1)) for a in qemu_argv if "filename=" in a]
    assert len(images) == 2
    for n, image in enumerate(images):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {0x41 + n} 0 1M", str(image)], check=True, capture_output=True)
    i = qemu_argv.index("...")
    qemu_argv[i:i + 1] = ["-machine", "q35,accel=tcg", "-nodefaults", "-S", "-display", "none"]
    qemu_argv[0] = QEMU_SYSTEM
    qemu = subprocess.Popen(qemu_argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        qmp = root / "run/vm1-backup.qmp"
        for _ in range(200):
            if qmp.exists() or qemu.poll() is not None:
                break
            subprocess.run(["sleep", "0.05"])
        assert qmp.exists(), qemu.stderr.read() if qemu.poll() is not None else "no QMP socket"

        config = tmp_path / "config.toml"
        config.write_text(moved(toml, root))
        env = cli_runner.environment() | {"NBDBACKUP_CONFIG": str(config)}
        env.pop("NBDBACKUP_REPO", None)
        checkpoint = None
        ran = []
        for block in sh[1:]:
            for line in shell_lines("sh", moved(block, root)):
                for argv in commands(line):
                    if argv[0] == "export":
                        name, value = argv[1].split("=", 1)
                        env[name] = value
                        continue
                    assert argv[0] == "nbdbackup", argv
                    argv = [checkpoint if a == "CHECKPOINT" else a for a in argv[1:]]
                    proc = subprocess.run([sys.executable, "-m", "nbdbackup", *argv], capture_output=True, text=True, env=env, timeout=300)
                    assert proc.returncode == 0, (argv, proc.stderr)
                    if argv[0] == "full":
                        checkpoint = proc.stdout.strip()
                    ran.append(argv[0])
        assert ran[:3] == ["full", "incremental", "auto"] and "restore" in ran and "delete" in ran
        for n, image in enumerate(images):
            restored = root / "srv/restore" / f"vd{'ab'[n]}.qcow2"
            same = subprocess.run(["qemu-img", "compare", "-U", str(image), str(restored)], capture_output=True, text=True)
            assert same.returncode == 0, same.stdout + same.stderr
    finally:
        qemu.kill()
        qemu.wait()
