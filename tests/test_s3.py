"""S3 repositories against a real SeaweedFS: every command, bad input, the server dying
mid-backup, and several hosts sharing one bucket while another prunes."""

from __future__ import annotations

import http.server
import json
import os
import struct
import subprocess
import sys
import threading
import time

import cli
import pytest
from faults import NOTHING_LEFT, Run, assert_one_line_error, qemu_leftovers
from harness import assert_image_equals
from s3server import OTHER_KEY, OTHER_SECRET, SECRET, SeaweedFS

from nbdbackup import config
from nbdbackup.errors import UsageError
from nbdbackup.repository.location import S3Location

KiB, MiB = 1024, 1024 * 1024


def restore_equal(url, vm, checkpoint, out, expected):
    images = cli.restore(url, vm, checkpoint, out)
    for disk, path in images.items():
        assert_image_equals(path, expected[disk], "qcow2")


def verified(url, vm):
    """verify reads every chunk of every backup of vm and finds nothing wrong (exit 0)."""
    report = json.loads(cli.run(url, "verify", vm, "--json").stdout)
    assert report["backups"] and all(b["ok"] for b in report["backups"]) and report["damaged"] == 0
    assert report["chunks_checked"] == report["chunks_referenced"] > 0


def test_every_command_on_an_s3_repository(vm_factory, s3_repo, tmp_path):
    url = s3_repo.url
    vm = vm_factory({"vda": 4 * MiB, "vdb": 2 * MiB + 512})
    vm.start()
    expected = {}
    for i, command in enumerate(("full", "incremental", "auto", "incremental")):
        vm.write("vda", i * 512 * KiB, 256 * KiB, 0x10 + i)
        vm.write("vdb", (i % 2) * MiB, 64 * KiB, 0x20 + i)
        cli.run(url, command, "vm1", "--qmp", vm.qmp_socket, "--checkpoint", f"cp{i}")
        expected[f"cp{i}"] = {d: vm.expected(d) for d in vm.disks}
    keys = s3_repo.keys()
    assert "repo/config.json" in keys and "repo/vms/vm1/backups/cp3/manifest.json" in keys
    assert any(k.startswith("repo/chunks/") for k in keys)
    assert not any(k.startswith("repo/locks/") for k in keys)  # every lock released
    assert [b["checkpoint"] for b in cli.backups(url)] == ["cp0", "cp1", "cp2", "cp3"]
    assert [b["kind"] for b in cli.backups(url)] == ["full", "incremental", "incremental", "incremental"]
    for name in expected:
        restore_equal(url, vm, name, tmp_path / name, expected[name])
    rows = json.loads(cli.run(url, "checkpoints", "vm1", "--qmp", vm.qmp_socket, "--json").stdout)
    assert [(r["name"], r["active"]) for r in rows] == [("cp0", False), ("cp1", False), ("cp2", False), ("cp3", True)]
    verified(url, "vm1")

    cli.run(url, "delete", "vm1", "cp1", "--qmp", vm.qmp_socket)
    assert [b["checkpoint"] for b in cli.backups(url)] == ["cp0", "cp2", "cp3"]
    chunks_before = len([k for k in s3_repo.keys("repo/chunks/")])
    report = json.loads(cli.run(url, "prune", "vm1", "--qmp", vm.qmp_socket, "--json", "--keep-last", "1").stdout)
    assert [b["checkpoint"] for b in cli.backups(url)] == ["cp3"]
    assert report["garbage"]["done"] and report["freed_chunks"] > 0
    assert len(s3_repo.keys("repo/chunks/")) == chunks_before - report["freed_chunks"]
    restore_equal(url, vm, "cp3", tmp_path / "after-prune", expected["cp3"])
    vm.write("vda", 0, 64 * KiB, 0x77)
    cli.run(url, "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "cp4")
    restore_equal(url, vm, "cp4", tmp_path / "cp4", {d: vm.expected(d) for d in vm.disks})
    verified(url, "vm1")
    assert qemu_leftovers(vm) == NOTHING_LEFT


class NotS3(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = b"<html><body>hello, I am a web server</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_bad_s3_input_one_line_each_distinct_codes_nothing_created(s3_repo, tmp_path, monkeypatch):
    url = s3_repo.url
    qmp = tmp_path / "no-vm.sock"

    def run(repo, expect, debug=False, **env):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        proc = cli.run(repo, "full", "vm1", "--qmp", qmp, expect=expect)
        out = proc.stderr + proc.stdout
        if debug:
            more = subprocess.run(cli.command(repo, "--debug", "full", "vm1", "--qmp", qmp), capture_output=True, text=True,
                                  env=cli.environment(), timeout=120)
            assert more.returncode == expect
            out += more.stderr + more.stdout
        for secret in (SECRET, OTHER_SECRET, "wrong-secret"):  # not even in --debug output and tracebacks
            assert secret not in out
        return proc.stderr

    assert "refused the S3 credentials" in run(url, 9, debug=True, AWS_SECRET_ACCESS_KEY="wrong-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert "does not exist" in run("s3://nbd-no-such-bucket/repo", 10)
    with pytest.raises(Exception, match="404|NoSuchBucket|Not Found"):
        s3_repo.client().head_bucket(Bucket="nbd-no-such-bucket")  # not created
    assert "access denied" in run(url, 11, debug=True, AWS_ACCESS_KEY_ID=OTHER_KEY, AWS_SECRET_ACCESS_KEY=OTHER_SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_repo.server.env()["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert s3_repo.keys() == []  # nothing was created by the refused runs

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotS3)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        conf = tmp_path / "web.toml"
        conf.write_text(f'[s3]\nendpoint = "http://127.0.0.1:{web.server_address[1]}"\naddressing = "path"\nretries = 1\n')
        monkeypatch.setenv("NBDBACKUP_TEST_CONFIG", str(conf))
        assert "does not answer like an S3 server" in run(url, 12)
    finally:
        web.shutdown()
        web.server_close()
    conf.write_text(f'[s3]\nendpoint = "http://127.0.0.1:{web.server_address[1]}"\naddressing = "path"\nretries = 1\n')
    assert "cannot reach the S3 endpoint" in run(url, 12)  # nothing listens there any more

    monkeypatch.setenv("NBDBACKUP_TEST_CONFIG", str(s3_repo.config))
    assert "names no bucket" in run("s3://", 2)
    assert "names no bucket" in run("s3:///prefix", 2)
    assert "not a valid bucket name" in run("s3://Bad_Bucket/x", 2)
    assert s3_repo.keys() == []


def test_credentials_file_and_config_repository(s3_repo, tmp_path, monkeypatch):
    """repository = "s3://..." and [s3] credentials_file (0600; refused when others may read it)."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    creds = tmp_path / "s3.credentials"
    creds.write_text(f"[default]\naws_access_key_id = {s3_repo.server.env()['AWS_ACCESS_KEY_ID']}\naws_secret_access_key = {SECRET}\n")
    creds.chmod(0o644)
    conf = tmp_path / "c.toml"
    conf.write_text(f'repository = "{s3_repo.url}"\n' + s3_repo.server.config_text() + f'credentials_file = "{creds}"\n')
    env = {**cli.environment(), "NBDBACKUP_CONFIG": str(conf)}
    import sys

    def nbdbackup(*args):
        return subprocess.run([sys.executable, "-m", "nbdbackup", *args], capture_output=True, text=True, env=env, timeout=60)

    proc = nbdbackup("list", "vm1")
    assert proc.returncode == 2 and "readable by others" in proc.stderr and SECRET not in proc.stderr
    creds.chmod(0o600)
    proc = nbdbackup("list", "vm1")
    assert proc.returncode == 7 and f"there is no repository at {s3_repo.url}" in proc.stderr, proc.stderr  # authenticated
    env["NBDBACKUP_REPO"] = f"s3://{s3_repo.bucket}/elsewhere"
    proc = nbdbackup("list", "vm1")
    assert f"there is no repository at s3://{s3_repo.bucket}/elsewhere" in proc.stderr, proc.stderr


def test_s3_settings_are_parsed_and_checked(tmp_path, monkeypatch):
    conf = tmp_path / "c.toml"
    conf.write_text('repository = "s3://my-bucket/a/b"\n[s3]\nendpoint = "http://127.0.0.1:1"\naddressing = "path"\nverify_tls = false\n')
    monkeypatch.delenv("NBDBACKUP_REPO", raising=False)
    s = config.load(str(conf), None)
    assert s.repo == S3Location("my-bucket", "a/b") and str(s.repo) == "s3://my-bucket/a/b"
    assert s.s3.endpoint == "http://127.0.0.1:1" and s.s3.addressing == "path" and s.s3.verify_tls is False
    monkeypatch.setenv("NBDBACKUP_REPO", "s3://env-bucket")
    assert config.load(str(conf), None).repo == S3Location("env-bucket", "")
    for text, words in (("[s3]\naddressing = 'sideways'\n", "addressing"), ("[s3]\nendpont = 'x'\n", "unknown setting"),
                        ("[s3]\nretries = 0\n", "retries"), ("[s3]\nverify_tls = 'no'\n", "wrong type")):
        conf.write_text(text)
        with pytest.raises(UsageError, match=words):
            config.load(str(conf), None)


def test_unknown_s3_profile_is_a_usage_error(monkeypatch):
    from nbdbackup.repository.location import S3Settings
    from nbdbackup.repository.s3 import S3Backend

    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    with pytest.raises(UsageError, match="profile 'nope' is not in the AWS config"):
        S3Backend(S3Location("some-bucket", "x"), S3Settings(endpoint="http://127.0.0.1:1", profile="nope"))


def test_per_repository_s3_tables_override_s3(tmp_path, monkeypatch):
    """[s3."s3://BUCKET[/PREFIX]"]: [s3], then every table at or above a repository (bucket first) overrides what it sets."""
    conf = tmp_path / "c.toml"
    conf.write_text('[s3]\nendpoint = "http://default:1"\nregion = "r0"\nretries = 3\n'
                    '[s3."s3://offsite"]\nendpoint = "http://bucket:2"\ncredentials_file = "/etc/offsite.credentials"\n'
                    '[s3."s3://offsite/a/b/"]\nregion = "r2"\naddressing = "virtual"\n')
    monkeypatch.delenv("NBDBACKUP_REPO", raising=False)
    s = config.load(str(conf), "/var/lib/repo")
    pick = {url: s.s3_for(S3Location(*url[5:].partition("/")[::2])) for url in
            ("s3://offsite/a/b", "s3://offsite/a/b/c", "s3://offsite/a/bc", "s3://offsite", "s3://elsewhere/a/b")}
    assert (pick["s3://offsite/a/b"].endpoint, pick["s3://offsite/a/b"].region, pick["s3://offsite/a/b"].addressing) == \
        ("http://bucket:2", "r2", "virtual")
    assert pick["s3://offsite/a/b/c"] == pick["s3://offsite/a/b"]
    for url in ("s3://offsite/a/bc", "s3://offsite"):  # a/bc is not below a/b
        assert (pick[url].endpoint, pick[url].region, str(pick[url].credentials_file)) == ("http://bucket:2", "r0", "/etc/offsite.credentials")
    assert pick["s3://elsewhere/a/b"] == s.s3 and s.s3.endpoint == "http://default:1" and s.s3.retries == 3
    assert s.s3_for(S3Location("offsite", "a/b")).retries == 3  # inherited from [s3]
    assert s.s3_for(tmp_path) == s.s3  # a directory
    for text, words in (('[s3."s3://Bad_Bucket"]\nregion = "x"\n', "not a valid bucket name"),
                        ('[s3."s3://ok-bucket"]\nendpont = "x"\n', "unknown setting"),
                        ('[s3."s3://ok-bucket"]\nretries = 99\n', "retries"),
                        ('[s3]\n"s3://ok-bucket" = "x"\n', "must be a table"),
                        ('[s3."s3://ok-bucket/a"]\n[s3."s3://ok-bucket/a/"]\n', "more than one")):
        conf.write_text(text)
        with pytest.raises(UsageError, match=words):
            config.load(str(conf), None)


def test_s3_server_killed_mid_backup(vm_factory, tmp_path, monkeypatch):
    """One clear line, exit 12, QEMU clean, nothing that looks like a backup; after the
    server is back, auto works and the older backup restores identical."""
    with SeaweedFS(tmp_path / "own-server") as server:
        server.client().create_bucket(Bucket="crash")
        conf = tmp_path / "c.toml"
        conf.write_text(server.config_text())
        monkeypatch.setenv("NBDBACKUP_TEST_CONFIG", str(conf))
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        url = "s3://crash/repo"
        vm = vm_factory({"vda": 32 * MiB})
        vm.start()
        vm.write("vda", 0, 1 * MiB, 0x31)
        cli.run(url, "full", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "first")
        first = vm.expected("vda")
        vm.write("vda", 1 * MiB, 28 * MiB, 0x32)
        with Run(url, "full", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "doomed", pause="read", after=3) as run:
            run.wait_paused()
            server.kill()
            started = time.monotonic()
            result = run.finish(timeout=180)
        line = assert_one_line_error(result, expect=12)
        assert "S3" in line and SECRET not in result.stderr
        assert time.monotonic() - started < 120  # retries are bounded
        assert qemu_leftovers(vm) == NOTHING_LEFT
        server.restart()
        assert [b["checkpoint"] for b in cli.backups(url)] == ["first"]  # nothing that looks like a backup
        cli.run(url, "auto", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "after")
        assert [b["checkpoint"] for b in cli.backups(url)] == ["first", "after"]
        restore_equal(url, vm, "first", tmp_path / "first", {"vda": first})
        restore_equal(url, vm, "after", tmp_path / "after", {"vda": vm.expected("vda")})
        verified(url, "vm1")


def test_two_hosts_back_up_into_one_bucket_while_a_third_prunes(vm_factory, s3_repo, tmp_path, monkeypatch):
    url = s3_repo.url
    vm1 = vm_factory({"vda": 2 * MiB}, name="vm1")
    vm2 = vm_factory({"vda": 48 * MiB}, name="vm2")
    vm3 = vm_factory({"vda": 24 * MiB}, name="vm3")
    for vm in (vm1, vm2, vm3):
        vm.start()
    vm1.write("vda", 0, 1 * MiB, 0x51)
    cli.run(url, "full", "vm1", "--qmp", vm1.qmp_socket, "--checkpoint", "a")
    vm1.write("vda", 0, 1 * MiB, 0x53)
    cli.run(url, "incremental", "vm1", "--qmp", vm1.qmp_socket, "--checkpoint", "b")
    vm2.write("vda", 0, 1 * MiB, 0x51)  # the chunk of vm1's backup "a", which prune drops
    vm2.write("vda", 4 * MiB, 40 * MiB, 0x52)
    vm3.write("vda", 0, 1 * MiB, 0x51)
    vm3.write("vda", 2 * MiB, 20 * MiB, 0x54)

    runs = []  # two hosts: the runs inherit NBDBACKUP_HOST_ID from the environment
    for host, vm in (("host-a", vm2), ("host-b", vm3)):
        monkeypatch.setenv("NBDBACKUP_HOST_ID", host)
        runs.append(Run(url, "full", vm.name, "--qmp", vm.qmp_socket, pause="read", after=2))
    try:
        for run in runs:
            run.wait_paused()  # both backups hold the shared repository lock and have stored chunks
        monkeypatch.setenv("NBDBACKUP_HOST_ID", "host-c")
        pruner = cli.start(url, "prune", "vm1", "--qmp", vm1.qmp_socket, "--json", "--keep-last", "1")
        time.sleep(3)
        assert pruner.poll() is None  # garbage collection waits for the backups of the other hosts
        assert [b["checkpoint"] for b in cli.backups(url, "vm1")] == ["b"]  # but "a" is already gone
        results = [run.finish(timeout=240) for run in runs]
        out, err = pruner.communicate(timeout=240)
        assert pruner.returncode == 0, err
        report = json.loads(out)
    finally:
        for run in runs:
            run.__exit__(None, None, None)
    for vm, result in zip((vm2, vm3), results, strict=True):
        assert result.returncode == 0, result.describe()
        restore_equal(url, vm, result.stdout.strip(), tmp_path / vm.name, {"vda": vm.expected("vda")})
    assert report["garbage"]["done"]  # GC waited for both backups' shared locks
    assert [b["checkpoint"] for b in cli.backups(url, "vm1")] == ["b"]
    for name in ("vm1", "vm2", "vm3"):
        verified(url, name)
    assert not [k for k in s3_repo.keys() if "/locks/" in k]


def test_vm_lock_holds_across_hosts(vm_factory, s3_repo, monkeypatch):
    """A backup of a VM started on another host makes a second one fail with exit 5 at once."""
    vm = vm_factory({"vda": 64 * MiB})
    vm.start()
    vm.write("vda", 0, 60 * MiB, 0x61)
    monkeypatch.setenv("NBDBACKUP_HOST_ID", "host-a")
    with Run(s3_repo.url, "full", "vm1", "--qmp", vm.qmp_socket, pause="read", after=2) as first:
        first.wait_paused()
        monkeypatch.setenv("NBDBACKUP_HOST_ID", "host-b")
        proc = cli.run(s3_repo.url, "full", "vm1", "--qmp", vm.qmp_socket, expect=5)
        assert "on host-a" in proc.stderr
        assert first.finish().returncode == 0
    os.environ.pop("NBDBACKUP_HOST_ID", None)


class FlakyProxy:
    """A TCP proxy in front of the S3 server whose first `failures` connections get
    HTTP 503 SlowDown (as a busy S3 answers) and are closed, or (reset=True) are reset
    (TCP RST) once the request is in; later ones are passed through."""

    def __init__(self, target_port: int, failures: int, reset: bool = False) -> None:
        import socket

        self.target_port, self.failures, self.refused, self.reset = target_port, failures, 0, reset
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            if self.refused < self.failures:
                self.refused += 1
                conn.recv(65536)
                if self.reset:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()  # with linger 0: a reset, not a clean close
                    continue
                body = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                conn.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                conn.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize("failures, retries, ok, reset", [(2, 4, True, False), (5, 3, False, False), (2, 4, True, True), (5, 3, False, True)])
def test_transient_errors_are_retried_a_bounded_number_of_times(s3_repo, failures, retries, ok, reset):
    """503 SlowDown and connection resets: retried with backoff, `retries` attempts, then one error."""
    from nbdbackup.errors import S3Unreachable
    from nbdbackup.repository.location import S3Settings
    from nbdbackup.repository.s3 import S3Backend

    proxy = FlakyProxy(s3_repo.server.port, failures, reset)
    try:
        settings = S3Settings(endpoint=f"http://127.0.0.1:{proxy.port}", region="us-east-1", addressing="path", retries=retries)
        backend = S3Backend(S3Location(s3_repo.bucket, "retry"), settings)
        started = time.monotonic()
        if ok:
            backend.write("obj", b"data")
            assert backend.read("obj") == b"data" and proxy.refused == failures
        else:
            with pytest.raises(S3Unreachable, match=f"{'cannot reach' if reset else 'SlowDown'}.*after {retries} attempts"):
                backend.write("obj", b"data")  # uploaded in the background: sync() reports its failure
                backend.sync()
            # as many attempts as configured; the HTTP layer resends once a request whose connection was closed
            assert retries <= proxy.refused <= retries + 1
        assert time.monotonic() - started < 60  # backoff is bounded
    finally:
        proxy.close()


def test_auto_all_jobs_backs_up_vms_at_once_into_s3(vm_factory, s3_repo, tmp_path, monkeypatch):
    vms = [vm_factory({"vda": 24 * MiB}, name=f"vm{i}") for i in (1, 2, 3)]
    for i, vm in enumerate(vms):
        vm.start()
        vm.write("vda", 0, 20 * MiB, 0x70 + i)
    conf = tmp_path / "all.toml"
    conf.write_text(s3_repo.server.config_text() + "".join(f'[vm.{vm.name}]\nqmp = "{vm.qmp_socket}"\n' for vm in vms)
                    + f'[vm.gone]\nqmp = "{tmp_path / "gone.sock"}"\n')
    monkeypatch.setenv("NBDBACKUP_TEST_CONFIG", str(conf))
    with Run(s3_repo.url, "auto", "--all", "--jobs", "3", "--json", pause="read") as run:
        run.wait_paused()  # every VM's reads wait at the pause point: all three are exported at once
        deadline = time.monotonic() + 60
        while not all(vm.block_state()["exports"] for vm in vms):
            assert time.monotonic() < deadline, [vm.block_state()["exports"] for vm in vms]
            time.sleep(0.05)
        result = run.finish(timeout=240)
    assert result.returncode == 3, result.describe()
    runs = json.loads(result.stdout)
    assert [(r["vm"], r["exit_code"], r.get("kind")) for r in runs] == [
        ("gone", 3, None), ("vm1", 0, "full"), ("vm2", 0, "full"), ("vm3", 0, "full")]
    for vm in vms:
        restore_equal(s3_repo.url, vm, "latest", tmp_path / vm.name, {"vda": vm.expected("vda")})
    cli.run(s3_repo.url, "auto", "--all", "--jobs", "0", expect=2)


@pytest.mark.s3
def test_background_uploads_fail_the_commit_with_the_put_error(s3_repo, monkeypatch):
    """Chunks and indexes are uploaded in the background; a refused upload fails sync() and so
    the commit with the error a synchronous PUT gives (same class: same exit code), and no
    manifest is written.  Other credentials: this bucket belongs to another account for them."""
    from nbdbackup.errors import S3AccessDenied
    from nbdbackup.records import DiskBackup, Manifest
    from nbdbackup.repository import Repository
    from nbdbackup.repository.location import S3Settings
    from nbdbackup.repository.s3 import S3Backend

    settings = S3Settings(endpoint=s3_repo.server.endpoint, region="us-east-1", addressing="path", retries=2)
    where = S3Location(s3_repo.bucket, "repo")
    good = Repository.open(S3Backend(where, settings), create=True)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", OTHER_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", OTHER_SECRET)
    denied = S3Backend(where, settings)
    with pytest.raises(S3AccessDenied) as sync_put:  # what a synchronous PUT says
        denied.write("vms/vm1/checkpoints.json", b"[]", durable=True)
    repo = Repository(denied, good.id)
    denied.write("chunks/00/" + "00" * 32, b"x" * 1000)  # queued: returns before the PUT is refused
    digest = repo.write_index("vm1", "cp1", "vda", 1 << 20, [])
    m = Manifest(vm="vm1", checkpoint="cp1", kind="full", since=None, created="2026-01-01T00:00:00Z", chain="c",
                 disks=(DiskBackup("vda", 1 << 20, digest, 0, 0, True),))
    with pytest.raises(S3AccessDenied) as failed:
        repo.commit(m)
    assert str(failed.value).startswith("access denied to s3://")
    assert str(failed.value) == str(sync_put.value)
    assert failed.value.exit_code == sync_put.value.exit_code
    assert list(good.backend.list("vms")) == []  # no manifest, no index
    assert good.manifests("vm1") == []
    denied.sync()  # the failure was reported once: the backend is usable again (nothing pending)


@pytest.mark.s3
def test_background_uploads_are_bounded_and_read_after_write(s3_repo):
    """At most UPLOADS + QUEUED uploads pending (memory bounded), every one lands, and a read
    or listing right after a write sees it."""
    from nbdbackup.repository import s3 as s3mod
    from nbdbackup.repository.location import S3Settings

    settings = S3Settings(endpoint=s3_repo.server.endpoint, region="us-east-1", addressing="path", retries=2)
    backend = s3mod.S3Backend(S3Location(s3_repo.bucket, "bounded"), settings)
    most = 0
    for i in range(60):
        backend.write(f"chunks/{i:02d}", bytes([i]) * (64 * KiB))
        most = max(most, len(backend._pending))
    assert 1 <= most <= s3mod.UPLOADS + s3mod.QUEUED
    assert backend.read("chunks/59") == bytes([59]) * (64 * KiB)  # waits for its pending upload
    assert sorted(backend.list("chunks")) == [f"chunks/{i:02d}" for i in range(60)]
    backend.sync()
    assert not backend._pending


class NoConditionalWrites(http.server.BaseHTTPRequestHandler):
    """An HTTP proxy in front of the S3 server that answers 501 NotImplemented to a PUT with
    If-None-Match (as stores without conditional writes do) and passes everything else on."""

    protocol_version = "HTTP/1.1"
    upstream_port = 0
    refused = 0

    def _forward(self) -> None:
        import http.client

        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.command == "PUT" and "If-None-Match" in self.headers:
            type(self).refused += 1
            msg = b"<?xml version='1.0'?><Error><Code>NotImplemented</Code><Message>no conditional writes</Message></Error>"
            self.send_response(501)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        up = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        up.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for k, v in self.headers.items():
            if k.lower() not in ("expect", "connection"):
                up.putheader(k, v)  # Host too: the signature covers it
        up.endheaders(body)
        resp = up.getresponse()
        data = resp.read()
        up.close()
        self.send_response(resp.status, resp.reason)
        headers = {k.lower(): v for k, v in resp.getheaders() if k.lower() not in ("transfer-encoding", "connection", "date", "server")}
        headers.setdefault("content-length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward  # noqa: N815

    def log_message(self, *args):
        pass


def test_store_without_conditional_writes_gets_a_check_then_a_put(s3_repo):
    """A store that answers 501 to If-None-Match: exclusive create falls back to HEAD, then PUT
    (docs/FORMAT.md says what that risks); an existing object is still not replaced."""
    from nbdbackup.repository import Repository
    from nbdbackup.repository.location import S3Settings
    from nbdbackup.repository.s3 import S3Backend

    NoConditionalWrites.upstream_port = s3_repo.server.port
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoConditionalWrites)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        settings = S3Settings(endpoint=f"http://127.0.0.1:{proxy.server_address[1]}", region="us-east-1", addressing="path", retries=2)
        backend = S3Backend(S3Location(s3_repo.bucket, "plain-store"), settings)
        backend.check()
        assert backend.atomic_exclusive
        backend.write("one", b"first", exclusive=True)
        assert NoConditionalWrites.refused == 1 and not backend.atomic_exclusive  # asked once, then known
        with pytest.raises(FileExistsError):
            backend.write("one", b"second", exclusive=True)
        assert backend.read("one") == b"first" and NoConditionalWrites.refused == 1
        where = S3Location(s3_repo.bucket, "plain-repo")
        repo = Repository.open(S3Backend(where, settings), create=True)  # config.json: exclusive create by the fallback
        assert NoConditionalWrites.refused == 2 and Repository.open(S3Backend(where, settings), create=False).id == repo.id
    finally:
        proxy.shutdown()
        proxy.server_close()


@pytest.mark.s3
def test_a_put_is_one_send_of_headers_and_body(s3_repo):
    """botocore would wrap a bytes body in a file (sent 8 KiB per system call after an
    `Expect: 100-continue` round trip): the backend keeps it bytes, and the object lands whole."""
    import hashlib

    from nbdbackup.repository.location import S3Settings
    from nbdbackup.repository.s3 import S3Backend

    settings = S3Settings(endpoint=s3_repo.server.endpoint, region="us-east-1", addressing="path", retries=2)
    backend = S3Backend(S3Location(s3_repo.bucket, "onesend"), settings)
    sent = []
    backend.client.meta.events.register("before-send.s3.PutObject", lambda request, **_: sent.append(request))
    blob = os.urandom(5 * MiB + 7)
    backend.write("chunks/big", blob, durable=True)
    backend.write("chunks/small", b"x" * 100)
    backend.sync()
    assert len(sent) == 2 and all(isinstance(r.body, bytes) and "Expect" not in r.headers for r in sent)
    assert backend.read("chunks/big") == blob and backend.read("chunks/small") == b"x" * 100
    head = s3_repo.client().head_object(Bucket=s3_repo.bucket, Key="onesend/chunks/big")
    assert head["ContentLength"] == len(blob) and head["ETag"].strip('"') == hashlib.md5(blob).hexdigest()


@pytest.mark.s3
def test_background_upload_threads_end_at_sync(s3_repo):
    """Once sync() has waited for the background uploads, their threads end: the program can then
    leave without the interpreter's teardown (cli.leave falls back to it while one of our
    non-daemon threads lives, and an idle upload pool's workers are such threads)."""
    import threading

    from nbdbackup.repository.location import S3Settings
    from nbdbackup.repository.s3 import S3Backend

    def uploaders() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("s3-upload") and t.is_alive()]

    settings = S3Settings(endpoint=s3_repo.server.endpoint, region="us-east-1", addressing="path", retries=2)
    backend = S3Backend(S3Location(s3_repo.bucket, "threads"), settings)
    for i in range(6):
        backend.write(f"chunks/{i}", bytes([i]) * 1000)
    assert uploaders(), "the writes went out in the background"
    backend.sync()
    assert uploaders() == []
    backend.write("chunks/again", b"y" * 10)  # a later write starts a new pool
    backend.sync()
    assert backend.read("chunks/again") == b"y" * 10 and backend.read("chunks/5") == bytes([5]) * 1000


def test_the_s3_backend_takes_botocores_ssl_fallback_without_pyopenssl():
    """Importing the S3 backend does not import pyOpenSSL/cryptography's X.509 through urllib3's
    pyopenssl shim (~40 ms at every start): botocore takes its own fallback, the SSLContext that
    urllib3 uses anyway, as on any machine without pyOpenSSL."""
    code = ("import sys, ssl; import nbdbackup.repository.s3; import botocore.httpsession as h; "
            "assert 'OpenSSL' not in sys.modules, 'pyOpenSSL imported'; assert issubclass(h.SSLContext, ssl.SSLContext); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


def test_timestamps_are_parsed_fast_to_the_same_instants_as_botocores():
    """S3's two timestamp forms (ISO 8601 in listings, HTTP dates in headers) are parsed without
    dateutil, to the same timezone-aware instants botocore's parser gives; other forms go to it."""
    import datetime

    from botocore.utils import parse_timestamp

    from nbdbackup.repository.s3 import _timestamp

    for text in ("2026-11-30T10:53:48.000Z", "2026-11-30T10:53:48Z", "2026-11-30T10:53:48.123456Z",
                 "Mon, 30 Nov 2026 10:53:48 GMT", "Sun, 01 Mar 2026 00:00:01 GMT",
                 "Mon, 30 Nov 2026 10:53:48 +0100", "2026-11-30T10:53:48+02:00", "1796035628", 1796035628.5):
        ours = _timestamp(text)
        assert ours.tzinfo is not None and ours == parse_timestamp(text), text
    assert _timestamp("2026-11-30T10:53:48.000Z") == datetime.datetime(2026, 11, 30, 10, 53, 48, tzinfo=datetime.UTC)
    with pytest.raises(ValueError):
        _timestamp("not a date")


@pytest.mark.s3
def test_the_s3_client_parses_timestamps_with_the_fast_parser(s3_repo):
    """Listings and HEADs go through _timestamp (botocore's dateutil parser took ~0.1 ms per listed
    key), and the store's LastModified still gives a lock's age."""
    from unittest import mock

    from nbdbackup.repository import s3
    from nbdbackup.repository.location import S3Settings

    settings = S3Settings(endpoint=s3_repo.server.endpoint, region="us-east-1", addressing="path", retries=2)
    with mock.patch.object(s3, "_timestamp", wraps=s3._timestamp) as parsed, \
         mock.patch("botocore.utils.parse_timestamp", side_effect=AssertionError("botocore's parser was used")):
        backend = s3.S3Backend(S3Location(s3_repo.bucket, "stamps"), settings)
        for i in range(3):
            backend.write(f"chunks/{i}", b"x", durable=True)
        assert sorted(backend.list("chunks")) == ["chunks/0", "chunks/1", "chunks/2"]
        assert 0 <= backend.age("chunks/0") < 60
    assert parsed.call_count >= 4  # three listed keys, one Last-Modified header
