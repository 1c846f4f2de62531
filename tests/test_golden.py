"""Repositories written by format version 1 stay readable: restore and verify a frozen one."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cli
import pytest
from harness import image_bytes

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("version", sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()))
def test_golden_repository_restores_and_verifies(version, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    if (GOLDEN / version / "passphrase").exists():  # an encrypted repository: its passphrase is part of the test
        monkeypatch.setenv("NBDBACKUP_PASSWORD_FILE", str(GOLDEN / version / "passphrase"))
    shutil.copytree(GOLDEN / version / "repo", repo)
    expected = json.loads((GOLDEN / version / "expected.json").read_text())
    cli.run(repo, "verify", "golden")
    listed = cli.backups(repo, "golden")
    assert [b["checkpoint"] for b in listed] == sorted(expected)
    for checkpoint, disks in expected.items():
        out = tmp_path / checkpoint
        cli.run(repo, "restore", "golden", "--to", checkpoint, "--output", out, "--format", "raw")
        for disk, digest in disks.items():
            assert hashlib.sha256(image_bytes(out / f"{disk}.raw", "raw")).hexdigest() == digest, (checkpoint, disk)
