"""The real-guest tier: a booting Debian 12 guest, a database working inside it.

One guest boots per module (TCG boots are slow; see tests/guest.py) and runs a
workload started through its agent: a loop that commits numbered sqlite rows
(each with a checksum of its payload; one transaction, fsync'd, per row) on
the root disk, then appends the same number to a log on a second disk with
fsync. (synchronous=EXTRA: in sqlite's default journal mode, FULL leaves the
commit, the journal's deletion, unsynced, and a crash-consistent copy may
roll the row back after the log line for it was written.) Counters in the guest's /run (tmpfs, never frozen) say how far it got.

Backups of it: full with --fsfreeze, incremental with --require-fsfreeze,
incremental crash-consistent, then incrementals with the agent unable to
answer. Each point, restored: ext4 clean (frozen: nothing in the journal to
replay; crash-consistent: clean after the replay), sqlite's integrity check
ok, rows 1..N without a gap and with good checksums, N between the rows
committed before the backup started and after it returned, and the log on
the other disk at N-1 or N (both disks from the same instant). One point is
booted with `verify --boot`, which runs sqlite inside the restored guest.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cli
import pytest
from guest import Agent, Guest, GuestImage

pytestmark = [pytest.mark.guest, pytest.mark.qemu, pytest.mark.timeout(1800)]

DATA_DISK = 256 << 20
WORKLOAD = r"""
i=0
while :; do
    i=$((i+1))
    sqlite3 /root/work.db "PRAGMA synchronous=EXTRA; INSERT INTO t(id, payload, sum) SELECT $i, p, hex(sha3(p)) FROM (SELECT printf('row %d %s', $i, hex(randomblob(48))) AS p);" || exit 1
    echo $i > /run/rows
    echo $i | dd of=/data/log oflag=append conv=notrunc,fsync status=none || exit 1
    echo $i > /run/lines
done
"""
CHECK = "sqlite3 /root/work.db 'PRAGMA integrity_check' && mount /dev/vdb /mnt && tail -n1 /mnt/log"


@dataclass(frozen=True)
class Point:
    label: str
    checkpoint: str
    frozen: bool
    rows_before: int  # committed before the backup started
    rows_after: int  # committed when it had returned
    stderr: str


@dataclass
class Scenario:
    guest: Guest
    repo: Path
    config: Path
    points: dict[str, Point]

    def backup(self, label: str, *args: str, frozen: bool) -> Point:
        before = rows(self.guest)
        proc = cli.run(self.repo, "--config", self.config, *args, "guest")
        after = rows(self.guest)
        point = Point(label, proc.stdout.strip(), frozen, before, after, proc.stderr)
        self.points[label] = point
        return point


def rows(guest: Guest) -> int:
    return int(guest.run("/bin/cat", "/run/rows")[1])


@pytest.fixture(scope="module")
def scenario(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    work = tmp_path_factory.mktemp("guest")
    guest = Guest(work / "vm", guest_image, {"vdb": DATA_DISK})
    guest.start()
    try:
        print(f"guest booted in {guest.boot_seconds:.0f} s ({guest.accel})")
        guest.sh("mkfs.ext4 -q -F /dev/vdb && mount /dev/vdb /data && "
                 "sqlite3 /root/work.db 'CREATE TABLE t(id INTEGER PRIMARY KEY, payload TEXT NOT NULL, sum TEXT NOT NULL)' && sync")
        guest.run("/usr/bin/systemd-run", "--quiet", "--unit=workload", "/bin/sh", "-c", WORKLOAD)
        deadline = time.monotonic() + 120
        while _rows_or_zero(guest) < 10:
            assert time.monotonic() < deadline, f"the workload does not commit: {guest.sh('systemctl status workload || true')}"
            time.sleep(1)
        config = work / "config.toml"
        boot = [*guest_image.boot_args(), "-accel", guest.accel, "-m", "512"]
        config.write_text(f'[vm.guest]\nqmp = "{guest.qmp_socket}"\nqga = "{guest.qga_socket}"\n'
                          f"boot = [{', '.join(_toml(a) for a in boot)}]\n")
        repo = work / "repo"
        s = Scenario(guest, repo, config, {})
        s.backup("full-fsfreeze", "full", "--fsfreeze", frozen=True)
        s.backup("incremental-require-fsfreeze", "incremental", "--require-fsfreeze", frozen=True)
        s.backup("incremental-crash-consistent", "incremental", frozen=False)
        yield s
    finally:
        guest.stop()


def _rows_or_zero(guest: Guest) -> int:
    code, out, _ = guest.run("/bin/sh", "-c", "cat /run/rows 2>/dev/null || echo 0", check=False)
    return int(out or 0)


def _toml(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- checks of a restored point -------------------------------------------------

def check_point(s: Scenario, point: Point, out: Path) -> int:
    """Restore the point and check it; the number of rows it holds."""
    cli.run(s.repo, "--config", s.config, "restore", "guest", "--to", point.checkpoint, "--output", out, "--format", "raw")
    root, data = out / "vda.raw", out / "vdb.raw"
    for image in (root, data):
        check_filesystem(image, frozen=point.frozen)

    db = out / "db"
    db.mkdir()
    debugfs_dump(root, "/root/work.db", db / "work.db")
    debugfs_dump(root, "/root/work.db-journal", db / "work.db-journal")  # a hot journal: sqlite rolls it back
    assert (db / "work.db").exists(), "the database is missing from the restored root filesystem"
    con = sqlite3.connect(db / "work.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        found = con.execute("SELECT id, payload, sum FROM t ORDER BY id").fetchall()
    finally:
        con.close()
    n = len(found)
    assert [r[0] for r in found] == list(range(1, n + 1)), "rows are missing in the middle"
    for rid, payload, digest in found:
        assert payload.startswith(f"row {rid} ") and digest == hashlib.sha3_256(payload.encode()).hexdigest().upper(), f"row {rid} is damaged"
    assert point.rows_before <= n <= point.rows_after, (
        f"{point.label}: {n} rows restored; {point.rows_before} were committed before the backup, {point.rows_after} after it")

    debugfs_dump(data, "/log", out / "log")
    lines = (out / "log").read_text().splitlines()
    assert lines == [str(i) for i in range(1, len(lines) + 1)], "the log on the second disk has a gap or damage"
    assert len(lines) in (n - 1, n), f"{point.label}: {n} rows but {len(lines)} log lines: the disks are not from one instant"
    return n


def check_filesystem(image: Path, *, frozen: bool) -> None:
    features = next(line for line in _run("dumpe2fs", "-h", str(image)).stdout.splitlines() if line.startswith("Filesystem features:"))
    if frozen:
        assert "needs_recovery" not in features, f"{image.name}: a frozen backup has a journal to replay"
    else:
        replay = _run("e2fsck", "-fy", str(image), check=False)  # the journal replay a boot would do
        assert replay.returncode in (0, 1), f"{image.name}: e2fsck -fy: {replay.stdout}"
    fsck = _run("e2fsck", "-fn", str(image), check=False)
    assert fsck.returncode == 0, f"{image.name}: e2fsck -fn found problems:\n{fsck.stdout}"


def debugfs_dump(image: Path, path: str, dest: Path) -> None:
    _run("debugfs", "-R", f"dump {path} {dest}", str(image))
    if dest.exists() and dest.stat().st_size == 0 and not _exists(image, path):
        dest.unlink()


def _exists(image: Path, path: str) -> bool:
    return "File not found" not in _run("debugfs", "-R", f"stat {path}", str(image)).stderr


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(argv[0]) or shutil.which(argv[0], path="/usr/sbin:/sbin")
    if exe is None:
        pytest.fail(f"the guest tests need {argv[0]} (e2fsprogs)", pytrace=False)
    proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr}"
    return proc


# -- the tests ----------------------------------------------------------------

@pytest.mark.parametrize("label", ["full-fsfreeze", "incremental-require-fsfreeze", "incremental-crash-consistent"])
def test_restored_point_is_consistent(scenario: Scenario, label: str, tmp_path: Path) -> None:
    point = scenario.points[label]
    if point.frozen:
        assert "crash-consistent" not in point.stderr and "freeze" not in point.stderr, point.stderr
    n = check_point(scenario, point, tmp_path)
    assert n > 0


def test_restored_guest_boots_and_its_database_is_sound(scenario: Scenario) -> None:
    point = scenario.points["incremental-crash-consistent"]  # the guest replays its journals while it boots
    proc = cli.run(scenario.repo, "--config", scenario.config, "verify", "guest", "--boot", "--checkpoint", point.checkpoint,
                   "--check", CHECK, "--timeout", "600", timeout=900)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"backup {point.checkpoint} of guest booted in ") and lines[0].endswith(" s (the guest agent answered)"), proc.stdout
    assert lines[1] == f"check {CHECK!r} passed:"
    assert lines[2].strip() == "ok"
    assert int(lines[3].strip()) >= point.rows_before - 1


def test_a_guest_that_crashes_while_booting_is_reported(scenario: Scenario, guest_image: GuestImage, tmp_path: Path) -> None:
    """verify --boot of a point whose kernel cannot find its root: the VM stops (panic, -no-reboot); exit 6 naming the console's last line."""
    config = tmp_path / "config.toml"
    boot = ["-kernel", str(guest_image.kernel), "-append", "console=ttyS0 panic=-1 root=/dev/nowhere", "-accel", scenario.guest.accel, "-m", "256"]
    config.write_text(f"[vm.guest]\nboot = [{', '.join(_toml(a) for a in boot)}]\n")
    proc = cli.run(scenario.repo, "--config", config, "verify", "guest", "--boot", "--timeout", "600", expect=6, timeout=900)
    assert "did not boot: the VM stopped after" in proc.stderr and "Kernel panic" in proc.stderr, proc.stderr


def test_point_in_an_encrypted_repository_boots(scenario: Scenario, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify --boot from an encrypted repository (the points copied there, re-encrypted with its own key):
    the point is decrypted while restored, boots, and its database is sound; the repository is not
    changed; the scratch directory's name does not show the VM's name (keyed, as every local name of an
    encrypted repository) and is gone afterwards; without the passphrase nothing is restored or started."""
    point = scenario.points["incremental-crash-consistent"]
    pw = cli.use_passphrase(monkeypatch, tmp_path, "guest boot passphrase", cheap_keys=True)
    monkeypatch.setenv("NBDBACKUP_TARGET_PASSWORD_FILE", str(pw))
    encrypted = tmp_path / "encrypted"
    cli.run(encrypted, "init", "--encryption", "repokey")
    cli.run(scenario.repo, "copy", "guest", "--to", str(encrypted), "--all")
    assert not [p for p in encrypted.rglob("*") if "guest" in p.name]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(scenario.config.read_text() + f"scratch = {_toml(str(scratch))}\n")
    stored = {p: p.read_bytes() for p in encrypted.rglob("*") if p.is_file() and p.parent.name != "locks"}

    verify = cli.start(encrypted, "--config", str(config), "verify", "guest", "--boot", "--checkpoint", point.checkpoint,
                       "--check", CHECK, "--timeout", "600")
    seen: set[str] = set()
    while verify.poll() is None:
        seen.update(p.name for p in scratch.iterdir())
        time.sleep(0.5)
    out, err = verify.communicate(timeout=900)
    assert verify.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"backup {point.checkpoint} of guest booted in ") and lines[0].endswith(" s (the guest agent answered)"), out
    assert lines[1] == f"check {CHECK!r} passed:" and lines[2].strip() == "ok", out
    assert int(lines[3].strip()) >= point.rows_before - 1
    assert seen and not [name for name in seen if "guest" in name], seen
    assert not list(scratch.iterdir())
    assert {p: p.read_bytes() for p in encrypted.rglob("*") if p.is_file() and p.parent.name != "locks"} == stored

    monkeypatch.delenv("NBDBACKUP_PASSWORD_FILE")
    proc = cli.run(encrypted, "--config", config, "verify", "guest", "--boot", "--checkpoint", point.checkpoint, expect=18)
    assert "passphrase" in proc.stderr, proc.stderr
    assert not list(scratch.iterdir())


def test_agent_socket_held_by_another_client(scenario: Scenario, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--fsfreeze while someone else holds the agent's socket: one warning, a crash-consistent backup, no thaw alarm."""
    monkeypatch.setenv("NBDBACKUP_AGENT_TIMEOUT", "3")
    before = rows(scenario.guest)
    with Agent(scenario.guest.qga_socket):
        proc = cli.run(scenario.repo, "--config", scenario.config, "incremental", "--fsfreeze", "guest")
    point = Point("socket-held", proc.stdout.strip(), False, before, rows(scenario.guest), proc.stderr)
    assert_one_fallback_line(point.stderr)
    assert_guest_writes(scenario.guest)
    check_point(scenario, point, tmp_path)


def test_agent_stopped_inside_the_guest(scenario: Scenario, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--fsfreeze with qemu-guest-agent stopped in the guest: the same single warning, never 'THAW FAILED'.
    (Last: the agent comes back only after a while.)"""
    guest = scenario.guest
    guest.run("/usr/bin/systemd-run", "--quiet", "--unit=agent-pause", "/bin/sh", "-c",
              "sleep 1; systemctl stop qemu-guest-agent; sleep 120; systemctl start qemu-guest-agent")
    deadline = time.monotonic() + 60
    while _agent_answers(guest):
        assert time.monotonic() < deadline, "the guest agent did not stop"
        time.sleep(1)
    monkeypatch.setenv("NBDBACKUP_AGENT_TIMEOUT", "3")
    rows_before = max(p.rows_after for p in scenario.points.values())  # committed before this backup began
    proc = cli.run(scenario.repo, "--config", scenario.config, "incremental", "--fsfreeze", "guest")
    assert_one_fallback_line(proc.stderr)
    assert_guest_writes(guest)
    # With the agent down, the rows committed by the end are unknown: only the lower bound is checked.
    point = Point("agent-stopped", proc.stdout.strip(), False, rows_before, sys.maxsize, proc.stderr)
    check_point(scenario, point, tmp_path)
    cli.run(scenario.repo, "--config", scenario.config, "incremental", "--require-fsfreeze", "guest", expect=3)


def assert_one_fallback_line(stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one warning line, got:\n{stderr}"
    assert "could not freeze" in lines[0] and "crash-consistent" in lines[0], lines[0]
    assert "THAW FAILED" not in stderr


def assert_guest_writes(guest: Guest) -> None:
    """The guest is not left frozen: its workload keeps writing to the second disk."""
    def writes() -> int:
        stats = guest.qmp("query-blockstats")
        return next(s["stats"]["wr_operations"] for s in stats if s.get("qdev", "").startswith("/machine/peripheral/vdb/"))
    first = writes()
    deadline = time.monotonic() + 30
    while writes() == first:
        assert time.monotonic() < deadline, "the guest wrote nothing for 30 s after the backup: left frozen?"
        time.sleep(0.5)


def _agent_answers(guest: Guest) -> bool:
    try:
        with Agent(guest.qga_socket, timeout=3) as agent:
            agent.sync()
            return True
    except Exception:
        return False
