"""Leaving promptly: the program skips Python's teardown once its output is flushed, and a
child's exit is seen the moment it happens (issue 15's fixed costs).  No QEMU needed."""

from __future__ import annotations

import subprocess
import sys

import cli
import pytest

from nbdbackup.repository import Repository
from nbdbackup.storage_daemon import wait_exit


def run(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m nbdbackup ARGS` in a real process (the path that leaves with os._exit)."""
    return subprocess.run([sys.executable, "-m", "nbdbackup", *map(str, args)], capture_output=True, text=True,
                          env=env or cli.environment(), timeout=60)


def test_a_real_process_flushes_its_output_and_log_before_it_leaves(tmp_path):
    repo = tmp_path / "repo"
    Repository.open(repo, create=True)
    log = tmp_path / "log"
    proc = run("--repo", repo, "--log-file", log, "list", "--json")
    assert proc.returncode == 0 and proc.stdout.strip() == "[]" and proc.stderr == ""
    proc = run("--repo", tmp_path / "nothing", "--log-file", log, "list", "vm1")
    assert proc.returncode == 7 and "there is no repository at" in proc.stderr
    lines = log.read_text().splitlines()  # the log file's handler was flushed and closed before the exit
    assert lines and "ERROR" in lines[-1] and "there is no repository at" in lines[-1]


def test_the_program_really_skips_the_teardown(tmp_path):
    """The quick exit really happens: an atexit handler, which the teardown would run, stays silent
    (the tests above pass either way; this one fails if cli.leave falls back to the teardown)."""
    repo = tmp_path / "repo"
    Repository.open(repo, create=True)
    code = ("import atexit, sys; atexit.register(lambda: print('teardown ran'));"
            "from nbdbackup.cli import main; sys.argv[0] = 'nbdbackup'; main()")
    proc = subprocess.run([sys.executable, "-c", code, "--repo", str(repo), "list", "--json"], capture_output=True, text=True,
                          env=cli.environment(), timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
    control = subprocess.run([sys.executable, "-c", code.replace("main()", "sys.exit(0)")], capture_output=True, text=True, timeout=60)
    assert control.stdout.strip() == "teardown ran"  # the handler does print when the teardown runs


def test_a_closed_pipe_ends_quietly_as_before(tmp_path):
    """stdout closed before nbdbackup writes (`nbdbackup list | true`): click ends the run with status 1 and
    nothing on stderr, as it did before the quick exit (whose flush must not turn that into an error)."""
    repo = tmp_path / "repo"
    Repository.open(repo, create=True)
    proc = subprocess.Popen([sys.executable, "-m", "nbdbackup", "--repo", str(repo), "list", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli.environment())
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1 and err == ""


def test_wait_exit_returns_the_status_and_times_out_otherwise():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read(); sys.exit(3)"], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.close()  # now it exits
    assert wait_exit(proc, 30) == 3
    assert wait_exit(proc, 30) == 3  # reaped already: the status again, no wait on a pid that may be reused
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            wait_exit(slow, 0.2)
    finally:
        slow.kill()
        slow.wait()
