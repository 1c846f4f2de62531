"""Shared fixtures for nbdbackup's tests: real QEMU VMs and repository paths."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import TestVM, missing_programs  # noqa: E402

VMFactory = Callable[..., TestVM]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that starts a VM with the "qemu" marker."""
    for item in items:
        if "vm_factory" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.qemu)


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
def guest_image():
    """The real-guest tier's Debian image (scripts/guest-image), built once and cached."""
    from guest import guest_image as build

    image = build()
    if image.build_seconds:
        print(f"\nguest image built in {image.build_seconds:.0f} s: {image.directory}")
    return image
