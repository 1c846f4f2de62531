"""Shared fixtures for nbdbackup's tests: real QEMU VMs and repository paths."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import TestVM, missing_programs  # noqa: E402
from s3server import SeaweedFS  # noqa: E402

VMFactory = Callable[..., TestVM]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that starts a VM with the "qemu" marker, every test of the S3 server "s3"."""
    for item in items:
        if "vm_factory" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.qemu)
        if "s3_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.s3)
        callspec = getattr(item, "callspec", None)  # any_repo of an S3 kind: known before the fixture runs
        if callspec is not None and str(callspec.params.get("any_repo", "")).startswith("s3"):
            item.add_marker(pytest.mark.s3)


@pytest.fixture
def vm_factory(tmp_path: Path) -> Iterator[VMFactory]:
    """Make TestVMs under tmp_path: ``vm_factory({"vda": 4 << 20}, name="vm1", ...)``.

    The VMs are not started. Each is killed and its sockets removed at
    teardown, whatever the test did. A missing QEMU fails the test (it is
    never skipped: a skip must not pass for a success).
    """
    missing = missing_programs()
    if missing:
        pytest.fail(f"QEMU tests need {', '.join(missing)} on PATH", pytrace=False)
    vms: list[TestVM] = []

    def make(disks: dict[str, int], *, name: str | None = None, **kwargs: Any) -> TestVM:
        name = name or f"vm{len(vms) + 1}"
        vm = TestVM(tmp_path / name, disks, name=name, **kwargs)
        vms.append(vm)
        return vm

    yield make
    for vm in vms:
        vm.cleanup()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fresh, empty directory for a backup repository."""
    path = tmp_path / "repo"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One real S3 server (SeaweedFS on 127.0.0.1, authentication checked) for the session.
    A missing `weed` binary fails the tests that need it."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


_buckets = iter(range(1, 1 << 30))


@dataclass
class S3Repo:
    """A fresh bucket on the session's server, and the settings nbdbackup needs to use it."""

    server: SeaweedFS
    bucket: str
    url: str
    config: Path

    def client(self):
        return self.server.client()

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for p in pages for o in p.get("Contents", ()))


@pytest.fixture
def s3_repo(s3_server: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> S3Repo:
    """An S3 repository location s3://<new bucket>/repo; the environment (credentials,
    NBDBACKUP_TEST_CONFIG for tests/cli.py, NBDBACKUP_CONFIG) points nbdbackup at it."""
    bucket = f"nbd-{os.getpid()}-{next(_buckets)}"
    s3_server.client().create_bucket(Bucket=bucket)
    config = tmp_path / "s3-config.toml"
    config.write_text(s3_server.config_text())
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("NBDBACKUP_TEST_CONFIG", str(config))
    monkeypatch.setenv("NBDBACKUP_CONFIG", str(config))
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    return S3Repo(s3_server, bucket, f"s3://{bucket}/repo", config)


REPO_KINDS = ("directory", "encrypted", "s3", "s3-encrypted")
PASSPHRASE = "correct horse battery staple"


@pytest.fixture(params=REPO_KINDS)
def any_repo(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path | str:
    """A new repository of each kind, as `--repo` takes it: a directory, an encrypted directory (repokey,
    passphrase in $NBDBACKUP_PASSWORD_FILE), an S3 bucket (the real SeaweedFS) and an encrypted S3 bucket.
    A test takes a subset with @pytest.mark.parametrize("any_repo", [...], indirect=True)."""
    import cli

    kind = request.param
    location: Path | str = tmp_path / "repo"
    if kind.startswith("s3"):
        location = request.getfixturevalue("s3_repo").url
    if kind.endswith("encrypted"):
        cli.use_passphrase(monkeypatch, tmp_path, PASSPHRASE)
        cli.run(location, "init", "--encryption", "repokey")
    return location


@pytest.fixture(scope="session")
def guest_image():
    """The real-guest tier's Debian image (scripts/guest-image), built once and cached."""
    from guest import guest_image as build

    image = build()
    if image.build_seconds:
        print(f"\nguest image built in {image.build_seconds:.0f} s: {image.directory}")
    return image


@pytest.fixture(autouse=True)
def _own_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test keeps its own record of the backups seen in encrypted repositories (XDG_STATE_HOME):
    a repository copied again from tests/golden must not look rolled back to a later test."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
