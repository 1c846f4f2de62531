"""Run the nbdbackup command line.

`run` calls the command line's entry point in this process, through click's test
runner, with the environment, stdin, stdout and stderr a subprocess would have:
that saves a Python start and the imports (a quarter of a second) per command.
`run(..., process=True)` and `start` run it in a real subprocess, as cron would:
for what only a process shows (signals, the entry point, output of children);
tests/test_cli_usage.py keeps a few such runs so that path stays tested. A test's other
threads always get a real process (an in-process run swaps process-wide state).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

TOP = Path(__file__).resolve().parent.parent


def command(repo: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "nbdbackup", "--repo", str(repo), *map(str, args)]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(TOP)
    env.pop("NBDBACKUP_REPO", None)
    env["NBDBACKUP_CONFIG"] = env.get("NBDBACKUP_TEST_CONFIG", "/dev/null")
    return env


def in_process(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """nbdbackup.cli.main(argv) with env as the whole environment and empty stdin; its exit status
    and output. Logging's handlers (the command line sets up its own) are put back afterwards."""
    from click.testing import CliRunner

    from nbdbackup.cli import main

    changes: dict[str, str | None] = {k: None for k in os.environ if k not in env}
    changes.update({k: v for k, v in env.items() if os.environ.get(k) != v})
    loggers = [logging.getLogger(), logging.getLogger("qemu")]
    saved = [(lg.handlers[:], lg.level) for lg in loggers]
    status: int = 0
    with CliRunner().isolation(env=changes) as (stdout, stderr, _):
        try:
            main(argv)
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for lg, (handlers, level) in zip(loggers, saved, strict=True):
                for h in lg.handlers:
                    if h not in handlers:
                        h.close()
                lg.handlers[:] = handlers
                lg.setLevel(level)
        out, err = stdout.getvalue().decode(), stderr.getvalue().decode()
    return subprocess.CompletedProcess(argv, status, out, err)


def run(repo: Path, *args: str, expect: int = 0, timeout: float = 300, process: bool = False) -> subprocess.CompletedProcess[str]:
    """Run nbdbackup (in this process unless process=True); assert its exit status; errors must
    be one line, without traceback."""
    if not process and threading.current_thread() is not threading.main_thread():
        process = True  # in this process it would swap the environment, stdio and signal handlers under other threads
    if process:
        proc = subprocess.run(command(repo, *args), capture_output=True, text=True, timeout=timeout, env=environment())
    else:
        proc = in_process(command(repo, *args)[3:], environment())
    assert proc.returncode == expect, (
        f"nbdbackup {' '.join(map(str, args))}: exit {proc.returncode}, expected {expect}\n"
        f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
    )
    if expect != 0:
        assert "Traceback" not in proc.stderr, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if "error" in line]
        assert len(errors) == 1, proc.stderr
    return proc


def start(repo: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(command(repo, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())


def backups(repo: Path, vm: str = "vm1") -> list[dict[str, Any]]:
    return json.loads(run(repo, "list", vm, "--json").stdout)


def restore(repo: Path, vm, checkpoint: str, out: Path, *extra: str) -> dict[str, Path]:
    """Restore every disk of the harness VM `vm` at checkpoint into out; disk id -> image path."""
    run(repo, "restore", vm.name, "--to", checkpoint, "--output", out, *extra)
    fmt = extra[extra.index("--format") + 1] if "--format" in extra else "qcow2"
    return {d: out / f"{d}.{fmt}" for d in vm.disks}


CHEAP_KDF = {"algorithm": "argon2id", "iterations": 1, "lanes": 1, "memory_cost": 8}


def use_passphrase(monkeypatch: Any, directory: Path, passphrase: str, *, cheap_keys: bool = False) -> Path:
    """Commands of this test get ``passphrase`` from a file in ``directory`` ($NBDBACKUP_PASSWORD_FILE),
    a keyring of their own ($XDG_CONFIG_HOME) and no key file.  ``cheap_keys``: keys made meanwhile
    cost Argon2id's minimum (8 KiB, one pass) instead of ~80 ms each; a key names its own
    parameters, and test_encryption's test_vectors checks the real derivation.  Returns the file."""
    from nbdbackup.repository import keys

    pw = directory / "pw"
    pw.write_text(passphrase + "\n")
    monkeypatch.setenv("NBDBACKUP_PASSWORD_FILE", str(pw))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(directory / "xdg"))
    monkeypatch.delenv("NBDBACKUP_KEY_FILE", raising=False)
    if cheap_keys:
        monkeypatch.setattr(keys, "DEFAULT_KDF", CHEAP_KDF)
    return pw

