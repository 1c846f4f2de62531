"""scripts/pprof_top.py reads the CPU profile that the real test S3 server (SeaweedFS, started
with NBDBACKUP_WEED_CPUPROFILE) writes, and names where its CPU went."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from s3server import SeaweedFS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import pprof_top  # noqa: E402

MiB = 1024 * 1024


@pytest.mark.s3
def test_the_servers_cpu_profile_names_its_functions(tmp_path, monkeypatch, capsys):
    profile = tmp_path / "weed.prof"
    monkeypatch.setenv("NBDBACKUP_WEED_CPUPROFILE", str(profile))
    with SeaweedFS(tmp_path / "weed") as server:
        assert f"-cpuprofile={profile}" in server.args
        s3 = server.client()
        s3.create_bucket(Bucket="prof")
        blob = os.urandom(4 * MiB)
        for i in range(24):  # ~1 s of the server's CPU: enough 10 ms samples
            s3.put_object(Bucket="prof", Key=f"o/{i}", Body=blob)
    prof = pprof_top.load(profile)
    assert prof.total > 0 and all(stack for stack, _ in prof.samples)
    assert pprof_top.main([str(profile), "--focus", "PutObjectHandler", "-n", "400"]) == 0
    out = capsys.readouterr().out
    assert "100.0%" in out and "github.com/seaweedfs/seaweedfs/weed/s3api.(*S3ApiServer).PutObjectHandler" in out
    assert "crypto/md5" in out  # the server hashes every payload (docs/PERFORMANCE.md)
    assert pprof_top.main([str(profile), "--callers", "crypto/md5.block"]) == 0
    assert "md5.(*digest).Write" in capsys.readouterr().out
