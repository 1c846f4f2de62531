"""Run the real nbdbackup command line in a subprocess, as cron would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def run(repo: Path, *args: str, expect: int = 0, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run nbdbackup; assert its exit status; errors must be one line, without traceback."""
    proc = subprocess.run(command(repo, *args), capture_output=True, text=True, timeout=timeout, env=environment())
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
