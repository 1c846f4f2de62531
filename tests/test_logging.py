"""Where each outcome is told: stderr (cron mail), the log file, syslog at the outcome's priority.

Syslog goes to a datagram socket of the test's own (NBDBACKUP_SYSLOG_SOCKET), read back
as syslogd would: `<PRI>nbdbackup[PID]: LEVEL: text`, PRI = facility user (8) + severity.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path

import cli
import pytest
from test_operations import write_config

KiB, MiB = 1024, 1024 * 1024
ERR, WARNING, INFO = 3, 4, 6  # syslog severities
USER = 1  # syslog facility


class SyslogReader:
    """A syslog daemon's socket, in the test: collects what nbdbackup sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[tuple[int, str]] = []

    def read(self) -> list[tuple[int, str]]:
        """(severity, text) of every message received since the last read."""
        new = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            m = re.fullmatch(r"<(\d+)>nbdbackup\[\d+\]: (\w+): (.*?)\x00?", data.decode(), re.S)
            assert m, data
            pri, text = int(m.group(1)), m.group(3)
            assert pri >> 3 == USER, data
            new.append((pri & 7, text))
        self.messages += new
        return new

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def syslog(tmp_path, monkeypatch):
    reader = SyslogReader(tmp_path / "log.sock")
    monkeypatch.setenv("NBDBACKUP_SYSLOG_SOCKET", str(reader.path))
    monkeypatch.delenv("NBDBACKUP_NO_SYSLOG", raising=False)
    yield reader
    reader.close()


def run_as_cron(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The README's cron line: stdout thrown away, stderr is what the mail shows."""
    return subprocess.run(cli.command(repo, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=cli.environment(), timeout=300)


def test_auto_all_under_cron_tells_each_failure_on_stderr_log_file_and_syslog(vm_factory, repo, tmp_path, monkeypatch, syslog):
    vm1 = vm_factory({"vda": 1 * MiB}, name="vm1")
    vm1.start()
    vm1.write("vda", 0, 64 * KiB, 0x61)
    gone = tmp_path / "gone.sock"
    conf = write_config(tmp_path / "c.toml", repo, {"vm1": vm1.qmp_socket, "vm2": gone})
    monkeypatch.setenv("NBDBACKUP_TEST_CONFIG", str(conf))
    log = tmp_path / "nbdbackup.log"

    # First run: vm1's first backup (a full, nothing to warn about); vm2 fails.
    proc = run_as_cron(repo, "--log-file", log, "auto", "--all")
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.splitlines()
    [reason] = [line for line in lines if "vm2" in line and "FAILED" in line]
    assert str(gone) in reason and "exit 3" in reason, proc.stderr  # the reason, not only the VM's name
    assert "full backup instead" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr
    assert lines[-1] == "nbdbackup: error: 1 of 2 VMs failed: vm2", proc.stderr
    assert len(lines) == 2, proc.stderr  # failure, final error: each once

    messages = syslog.read()
    by_severity = {sev: [t for s, t in messages if s == sev] for sev in (ERR, WARNING, INFO)}
    assert any("vm2 auto FAILED (exit 3)" in t and str(gone) in t for t in by_severity[ERR]), messages
    assert any("auto --all: 1 of 2 VMs backed up; failed: vm2" in t for t in by_severity[ERR]), messages
    assert not by_severity[WARNING], messages
    assert any(t.startswith("vm1 full ") and "read 64.0KiB" in t for t in by_severity[INFO]), messages
    assert len(messages) == 3, messages  # nothing twice
    text = log.read_text()
    assert "ERROR: vm2 auto FAILED (exit 3)" in text and str(gone) in text
    assert "WARNING" not in text
    assert re.search(r"INFO: vm1 full \S+: read 64.0KiB", text)

    # Second run: vm1 incremental (success, info only); vm2 still failing.
    vm1.write("vda", 64 * KiB, 64 * KiB, 0x62)
    proc = run_as_cron(repo, "auto", "--all")
    assert proc.returncode == 3
    assert "full backup instead" not in proc.stderr
    assert any("vm2 auto FAILED (exit 3)" in line and str(gone) in line for line in proc.stderr.splitlines()), proc.stderr
    messages = syslog.read()
    assert [s for s, t in messages if t.startswith("vm1 incremental ")] == [INFO], messages
    assert not [t for s, t in messages if s == WARNING], messages

    # list without a VM: the VMs of the repository (vm2 never got a backup).
    [row] = json.loads(cli.run(repo, "list", "--json").stdout)
    assert row["vm"] == "vm1" and row["backups"] == 2 and row["newest"] == cli.backups(repo)[-1]["checkpoint"]
    proc = cli.run(repo, "list")
    assert proc.stdout.splitlines()[1].split()[:2] == ["vm1", "2"] and proc.stderr == "1 VM, 2 backups\n"

    # A single VM's failure: one error line on stderr, the same reason in syslog at err.
    proc = cli.run(repo, "incremental", "vm1", "--qmp", gone, expect=3)
    [error] = proc.stderr.splitlines()
    assert error.startswith("nbdbackup: error: ") and str(gone) in error
    assert [(s, t) for s, t in syslog.read()] == [(ERR, f"vm1 incremental FAILED (exit 3): {error.split('error: ', 1)[1]}")]

    # verify and prune log their summary line (info when all is well), with correct plurals.
    proc = cli.run(repo, "verify", "vm1")
    assert "2 backups of vm1 checked, 0 damaged" in proc.stdout
    [(sev, text)] = syslog.read()
    assert sev == INFO and text.startswith("verify vm1: 2 backups of vm1 checked, 0 damaged")
    proc = cli.run(repo, "prune", "vm1", "--keep-last", "1", "--qmp", vm1.qmp_socket)
    assert re.search(r"vm1\s+removed 1 backup, kept 1; freed \d+ chunks? ", proc.stdout), proc.stdout
    assert [(s, t.split(";")[0]) for s, t in syslog.read()] == [(INFO, "prune vm1: removed 1 backup, kept 1")]
    proc = cli.run(repo, "verify", "vm1")
    assert "1 backup of vm1 checked" in proc.stdout and re.search(r"\b1 chunk checked\b|\b[02-9]\d* chunks checked\b", proc.stdout)


def test_a_usage_error_before_logging_is_set_up_is_printed_once(repo, syslog):
    proc = cli.run(repo, "list", "vm1", "--no-such-option", expect=2)
    assert proc.stderr.count("no-such-option") == 1
    assert syslog.read() == []  # nothing ran: nothing to log
