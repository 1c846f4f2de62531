"""Running from cron: auto --all, metrics, logs, guest filesystem freeze."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import cli
from harness import assert_image_equals

KiB, MiB = 1024, 1024 * 1024


def write_config(path: Path, repo: Path, vms: dict[str, Path], extra: str = "") -> Path:
    text = f'repository = "{repo}"\n' + "".join(f'[vm.{name}]\nqmp = "{sock}"\n{extra}' for name, sock in vms.items())
    path.write_text(text)
    return path


def test_auto_all_goes_on_after_a_broken_vm_and_exits_with_the_worst_code(vm_factory, repo, tmp_path, monkeypatch):
    good1 = vm_factory({"vda": 1 * MiB}, name="vm1")
    good2 = vm_factory({"vda": 1 * MiB}, name="vm3")
    for vm in (good1, good2):
        vm.start()
        vm.write("vda", 0, 64 * KiB, 0x61)
    conf = write_config(tmp_path / "c.toml", repo, {"vm1": good1.qmp_socket, "vm2": tmp_path / "gone.sock", "vm3": good2.qmp_socket})
    monkeypatch.setenv("NBDBACKUP_TEST_CONFIG", str(conf))
    metrics = tmp_path / "nbdbackup.prom"

    proc = cli.run(repo, "--metrics-file", metrics, "auto", "--all", expect=3)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("vm1") and "ok" in lines[0] and "full" in lines[0]
    assert lines[1].startswith("vm2") and "FAILED" in lines[1] and "exit 3" in lines[1]
    assert lines[2].startswith("vm3") and "ok" in lines[2]
    assert "vm2" in proc.stderr

    good1.write("vda", 64 * KiB, 64 * KiB, 0x62)
    runs = json.loads(cli.run(repo, "--metrics-file", metrics, "auto", "--all", "--json", expect=3).stdout)
    assert [(r["vm"], r["exit_code"], r.get("kind")) for r in runs] == [("vm1", 0, "incremental"), ("vm2", 3, None), ("vm3", 0, "incremental")]
    images = cli.restore(repo, good1, "latest", tmp_path / "out")
    assert_image_equals(images["vda"], good1.expected("vda"), "qcow2")

    text = metrics.read_text()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values['nbdbackup_last_exit_code{vm="vm1"}'] == 0
    assert values['nbdbackup_last_exit_code{vm="vm2"}'] == 3
    assert 'nbdbackup_last_success_timestamp_seconds{vm="vm2"}' not in values
    assert values['nbdbackup_last_success_timestamp_seconds{vm="vm1"}'] > 1.7e9
    assert values['nbdbackup_last_read_bytes{vm="vm1"}'] == 64 * KiB
    assert "# TYPE nbdbackup_last_exit_code gauge" in text


def test_summary_line_goes_to_the_log_file(vm_factory, repo, tmp_path):
    vm = vm_factory({"vda": 1 * MiB})
    vm.start()
    vm.write("vda", 0, 64 * KiB, 0x61)
    log = tmp_path / "nbdbackup.log"
    name = cli.run(repo, "--log-file", log, "full", "vm1", "--qmp", vm.qmp_socket).stdout.strip()
    [summary] = [line for line in log.read_text().splitlines() if name in line]
    assert "vm1 full" in summary and "read 64.0KiB" in summary and "reduction" in summary
    cli.run(repo, "--log-file", log, "incremental", "vm1", "--qmp", tmp_path / "nope", expect=3)
    assert "vm1 incremental FAILED (exit 3)" in log.read_text()


class FakeGuestAgent:
    """A qemu-guest-agent stand-in on a unix socket (never the host's own filesystems).

    On freeze and thaw it looks at the VM through the harness monitor, to prove
    that the freeze comes right before the checkpoint is created and the thaw after.
    """

    def __init__(self, path: Path, vm, *, answer: bool | frozenset[str] = True) -> None:
        """answer: every request (True), none (False), or only the commands named."""
        self.path, self.vm, self.answer = path, vm, answer
        self.log: list[tuple[str, int]] = []
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def checkpoint_bitmaps(self) -> int:
        return sum(1 for b in self.vm.bitmaps("vda") if b.get("name", "").startswith("nbdbackup.") and "@" not in b["name"])

    @staticmethod
    def _messages(conn):
        """JSON objects as they arrive (QMP clients need not end them with newlines)."""
        decoder, buf = json.JSONDecoder(), ""
        while data := conn.recv(4096):
            buf += data.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                yield msg

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        for msg in self._messages(conn):
            command = msg["execute"]
            self.log.append((command, self.checkpoint_bitmaps() if command.startswith("guest-fsfreeze") else -1))
            if not (self.answer is True or (self.answer and command in self.answer)):
                continue
            result = msg.get("arguments", {}).get("id") if command == "guest-sync" else 1
            conn.sendall(json.dumps({"return": result, "id": msg.get("id")}).encode() + b"\n")


def test_fsfreeze_brackets_the_point_in_time(vm_factory, repo, tmp_path):
    vm = vm_factory({"vda": 1 * MiB})
    vm.start()
    agent = FakeGuestAgent(tmp_path / "qga.sock", vm)
    cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket, "--qga", agent.path, "--require-fsfreeze")
    assert [c for c, _ in agent.log] == ["guest-sync", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    assert agent.log[1][1] == 0 and agent.log[2][1] == 1  # frozen before the checkpoint existed, thawed after


def test_a_silent_agent_means_crash_consistent_or_failure_when_required(vm_factory, repo, tmp_path, monkeypatch):
    vm = vm_factory({"vda": 1 * MiB})
    vm.start()
    monkeypatch.setenv("NBDBACKUP_AGENT_TIMEOUT", "1")
    FakeGuestAgent(tmp_path / "qga1.sock", vm, answer=False)
    proc = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket, "--qga", tmp_path / "qga1.sock", "--fsfreeze")
    assert "crash-consistent" in proc.stderr
    before = vm.bitmaps("vda")
    FakeGuestAgent(tmp_path / "qga2.sock", vm, answer=False)
    proc = cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--qga", tmp_path / "qga2.sock", "--require-fsfreeze", expect=3)
    assert "freeze" in proc.stderr
    assert vm.bitmaps("vda") == before and vm.block_state()["jobs"] == [] and len(cli.backups(repo)) == 1


def agent_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "guest" in line]


def test_an_agent_that_does_not_answer_guest_sync_gets_no_thaw_and_one_line(vm_factory, repo, tmp_path, monkeypatch):
    """No freeze was sent, so no thaw either: no false THAW FAILED alarm, one warning that says
    the guest agent (not QEMU) did not answer, and the fallback within one agent timeout."""
    vm = vm_factory({"vda": 1 * MiB})
    vm.start()
    monkeypatch.setenv("NBDBACKUP_AGENT_TIMEOUT", "3")
    agent = FakeGuestAgent(tmp_path / "qga1.sock", vm, answer=False)
    t0 = time.monotonic()
    proc = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket, "--qga", agent.path, "--fsfreeze")
    elapsed = time.monotonic() - t0
    assert [c for c, _ in agent.log] == ["guest-sync"], agent.log
    [line] = agent_lines(proc.stderr)
    assert "the guest agent did not answer guest-sync within 3s" in line and "crash-consistent" in line, proc.stderr
    assert "THAW" not in proc.stderr and "QEMU did not answer" not in proc.stderr and "error" not in proc.stderr.lower()
    assert 3 <= elapsed < 6, f"fallback took {elapsed:.1f}s with a 3s agent timeout"

    before = vm.bitmaps("vda")
    agent = FakeGuestAgent(tmp_path / "qga2.sock", vm, answer=False)
    proc = cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--qga", agent.path, "--require-fsfreeze", expect=3)
    assert [c for c, _ in agent.log] == ["guest-sync"], agent.log
    [line] = agent_lines(proc.stderr)
    assert "error:" in line and "the guest agent did not answer guest-sync" in line and "THAW" not in line, proc.stderr
    assert vm.bitmaps("vda") == before and len(cli.backups(repo)) == 1


def test_a_freeze_that_timed_out_is_thawed_and_a_failed_thaw_is_one_error_line(vm_factory, repo, tmp_path, monkeypatch):
    vm = vm_factory({"vda": 1 * MiB})
    vm.start()
    monkeypatch.setenv("NBDBACKUP_AGENT_TIMEOUT", "1")
    # The freeze times out but may have happened: thawed, and the thaw worked -> one warning.
    agent = FakeGuestAgent(tmp_path / "qga1.sock", vm, answer=frozenset({"guest-sync", "guest-fsfreeze-thaw"}))
    proc = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket, "--qga", agent.path, "--fsfreeze")
    assert [c for c, _ in agent.log] == ["guest-sync", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"], agent.log
    [line] = agent_lines(proc.stderr)
    assert "the guest agent did not answer guest-fsfreeze-freeze within 1s" in line and "THAW" not in line, proc.stderr
    # Neither freeze nor thaw answered: the guest may be frozen -> one error line (the backup goes on).
    agent = FakeGuestAgent(tmp_path / "qga2.sock", vm, answer=frozenset({"guest-sync"}))
    proc = cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--qga", agent.path, "--fsfreeze")
    [line] = agent_lines(proc.stderr)
    assert "THAW FAILED" in line and "the guest agent did not answer guest-fsfreeze-thaw" in line, proc.stderr
    assert "QEMU" not in line and len(cli.backups(repo)) == 2
    # Required: the same, as one error line, exit 3.
    agent = FakeGuestAgent(tmp_path / "qga3.sock", vm, answer=frozenset({"guest-sync"}))
    proc = cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--qga", agent.path, "--require-fsfreeze", expect=3)
    [line] = agent_lines(proc.stderr)
    assert "error:" in line and "THAW FAILED" in line, proc.stderr


def test_prune_all_applies_each_vms_retention_setting(vm_factory, repo, tmp_path, monkeypatch):
    vm = vm_factory({"vda": 1 * MiB}, name="vm1")
    vm.start()
    conf = write_config(tmp_path / "c.toml", repo, {"vm1": vm.qmp_socket}, extra="retention = { last = 1 }\n")
    monkeypatch.setenv("NBDBACKUP_TEST_CONFIG", str(conf))
    for pattern in (0x71, 0x72, 0x73):
        vm.write("vda", 0, 64 * KiB, pattern)
        cli.run(repo, "auto", "vm1")
    [report] = json.loads(cli.run(repo, "prune", "--all", "--json").stdout)["vms"]
    assert report["vm"] == "vm1" and [b["keep"] for b in report["backups"]] == [False, False, True]
    assert len(cli.backups(repo)) == 1 and len(vm.bitmaps("vda")) == 2  # the newest checkpoint's bitmap and its twin
    images = cli.restore(repo, vm, "latest", tmp_path / "out")
    assert_image_equals(images["vda"], vm.expected("vda"), "qcow2")
