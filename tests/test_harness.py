"""Tests of the real-QEMU harness itself (tests/harness.py)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import harness
import pytest
from harness import (
    BackgroundWriter,
    HarnessError,
    TestVM,
    assert_image_equals,
    image_bytes,
    is_prefix,
)
from qemu.qmp.legacy import QEMUMonitorProtocol

pytestmark = pytest.mark.timeout(120)

KiB = 1024
MiB = 1024 * KiB
CLUSTER = 64 * KiB


def stop_and_check_images(vm: TestVM) -> None:
    """Stop the VM and check every image byte for byte against the model."""
    vm.stop()
    for disk in vm.disks.values():
        assert_image_equals(disk.path, vm.expected(disk.id), disk.fmt)


def test_start_write_stop_matches_model(vm_factory) -> None:
    # vdb's size is neither a MiB nor a cluster multiple.
    vm = vm_factory({"vda": 2 * MiB, "vdb": MiB + 3 * 512})
    vm.start()
    assert vm.running

    blocks = {b["qdev"]: b["inserted"] for b in vm.qmp("query-block") if "inserted" in b}
    for disk in vm.disks.values():
        assert blocks[disk.qdev]["node-name"] == f"{disk.id}-fmt"
        assert blocks[disk.qdev]["image"]["virtual-size"] == disk.size

    vm.write("vda", 0, CLUSTER, 0xAA)
    vm.write("vda", 512, 2 * KiB, 0xBB)              # overwrite inside a cluster
    vm.write("vdb", MiB, 3 * 512, 0xCC)              # ends exactly at the disk end
    vm.write("vda", 2 * MiB - CLUSTER, CLUSTER, 0x01)

    vda = vm.expected("vda")
    assert vda[:512] == b"\xaa" * 512
    assert vda[512:2560] == b"\xbb" * 2048
    assert vda[2560:CLUSTER] == b"\xaa" * (CLUSTER - 2560)
    assert vda[CLUSTER:2 * MiB - CLUSTER] == bytes(2 * MiB - 2 * CLUSTER)
    assert vm.expected("vdb")[MiB:] == b"\xcc" * 1536
    vm.verify("vda")
    vm.verify("vdb")

    stop_and_check_images(vm)
    assert not vm.running
    assert image_bytes(vm.disks["vda"].path) == vda  # format probed


def test_tool_monitor_stays_free(vm_factory) -> None:
    """A client on qmp_socket works while the harness uses its own monitor."""
    vm = vm_factory({"vda": MiB})
    vm.start()
    tool = QEMUMonitorProtocol(str(vm.qmp_socket))
    tool.connect()
    try:
        status = tool.cmd("query-status")
        assert isinstance(status, dict) and status["status"] == "prelaunch"
        vm.write("vda", 0, 4096, 0x11)
        assert vm.qmp("query-status")["status"] == "prelaunch"
        tool.cmd("block-dirty-bitmap-add", node="vda-fmt", name="tool")
        vm.write("vda", CLUSTER, 4096, 0x22)
        assert [b["count"] for b in vm.bitmaps("vda")] == [CLUSTER]
    finally:
        tool.close()
    stop_and_check_images(vm)


def test_restart_keeps_data_and_persistent_bitmaps(vm_factory) -> None:
    vm = vm_factory({"vda": MiB})
    vm.start()
    vm.qmp("block-dirty-bitmap-add", node="vda-fmt", name="b1", persistent=True, granularity=CLUSTER)
    vm.write("vda", 3 * CLUSTER, CLUSTER, 0x33)
    vm.restart()
    (bitmap,) = vm.bitmaps("vda")
    assert bitmap["name"] == "b1" and bitmap["count"] == CLUSTER and bitmap["recording"]
    assert "inconsistent" not in bitmap
    vm.verify("vda")
    vm.write("vda", 0, 512, 0x44)
    assert vm.bitmaps("vda")[0]["count"] == 2 * CLUSTER
    stop_and_check_images(vm)


def test_kill_is_a_crash(vm_factory) -> None:
    vm = vm_factory({"vda": MiB})
    vm.start()
    vm.qmp("block-dirty-bitmap-add", node="vda-fmt", name="saved", persistent=True)
    vm.stop()
    vm.start()
    vm.qmp("block-dirty-bitmap-add", node="vda-fmt", name="new", persistent=True)
    vm.write("vda", 5 * CLUSTER, 2 * CLUSTER, 0x55)
    pid = vm.pid
    vm.kill()
    assert not vm.running and vm.pid is None
    assert not Path(f"/proc/{pid}").exists()  # reaped, not a zombie
    with pytest.raises(HarnessError):
        vm.qmp("query-status")

    vm.start()
    # The bitmap created in the killed run is gone; the one loaded is inconsistent.
    bitmaps = {b["name"]: b for b in vm.bitmaps("vda")}
    assert list(bitmaps) == ["saved"]
    assert bitmaps["saved"].get("inconsistent") is True
    # Confirmed writes survive: the device runs with write-cache=off.
    vm.verify("vda")
    stop_and_check_images(vm)


def test_write_zeroes_and_discard(vm_factory) -> None:
    size = 5 * CLUSTER + 8 * KiB  # the last cluster is partial
    vm = vm_factory({"vda": size})
    vm.start()
    vm.write("vda", 0, size, 0x5A)

    vm.write_zeroes("vda", 512, 1024)
    assert vm.expected("vda")[:3 * 512] == b"\x5a" * 512 + bytes(1024)

    # Inside one cluster: qcow2 ignores it, the data stays.
    assert vm.discard("vda", CLUSTER + 512, 4 * KiB) is False
    # 1.5 clusters .. 3.5 clusters: only cluster 2 is whole, only it is zeroed.
    assert vm.discard("vda", CLUSTER + CLUSTER // 2, 2 * CLUSTER) is True
    # The partial last cluster, discarded up to the end of the disk, is zeroed.
    assert vm.discard("vda", 5 * CLUSTER, 8 * KiB) is True

    data = vm.expected("vda")
    assert data[CLUSTER:2 * CLUSTER] == b"\x5a" * CLUSTER
    assert data[2 * CLUSTER:3 * CLUSTER] == bytes(CLUSTER)
    assert data[3 * CLUSTER:5 * CLUSTER] == b"\x5a" * 2 * CLUSTER
    assert data[5 * CLUSTER:] == bytes(8 * KiB)
    vm.verify("vda")
    stop_and_check_images(vm)


def test_discard_on_raw_punches_the_whole_range(vm_factory) -> None:
    vm = vm_factory({"vda": MiB}, fmt="raw")
    vm.start()
    vm.write("vda", 0, 2 * CLUSTER, 0x77)
    assert vm.discard("vda", 512, 4 * KiB) is True
    assert vm.expected("vda")[:512 + 4 * KiB] == b"\x77" * 512 + bytes(4 * KiB)
    vm.verify("vda")
    stop_and_check_images(vm)


def test_failed_write_raises_and_leaves_model(vm_factory) -> None:
    vm = vm_factory({"vda": MiB})
    vm.start()
    vm.write("vda", 0, 512, 0x01)
    with pytest.raises(HarnessError, match="write failed"):
        vm.write("vda", MiB, 512, 0x02)              # entirely past the end
    with pytest.raises(HarnessError, match="write failed"):
        vm.write("vda", MiB - 512, 1024, 0x03)       # crosses the end
    with pytest.raises(HarnessError, match="failed"):
        vm.write_zeroes("vda", 2 * MiB, 512)
    with pytest.raises(HarnessError, match="discard failed"):
        vm.discard("vda", 2 * MiB, CLUSTER)
    with pytest.raises(ValueError):
        vm.write("vda", 100, 512, 0x04)              # not sector-aligned
    with pytest.raises(KeyError):
        vm.write("vdz", 0, 512, 0x04)
    assert vm.expected("vda") == b"\x01" * 512 + bytes(MiB - 512)
    vm.write("vda", 512, 512, 0x05)                  # the log is still in step
    vm.verify("vda")
    stop_and_check_images(vm)


def test_confirmation_lines_are_consumed_once(vm_factory, monkeypatch) -> None:
    vm = vm_factory({"vda": MiB})
    vm.start()
    for _ in range(3):
        vm.write("vda", 0, 512, 0x09)
    assert vm.log_path.read_text().count("wrote 512/512 bytes at offset 0") == 3
    monkeypatch.setattr(harness, "CONFIRM_TIMEOUT", 0.3)
    with pytest.raises(HarnessError, match="no 'wrote 512/512"):
        vm._await_line("wrote 512/512 bytes at offset 0", "stale line")
    # qemu-io complains on stderr only: the harness times out, showing stderr.
    with pytest.raises(HarnessError, match='command "bogus" not found'):
        vm._qemu_io("vda", "bogus 0 512", "never printed")


def test_start_failure_reports_stderr(vm_factory) -> None:
    vm = vm_factory({"vda": MiB})
    vm.start()
    vm.stop()
    vm.disks["vda"].path.write_bytes(b"not a qcow2 image" * 100)
    with pytest.raises(HarnessError, match="qcow2"):
        vm.start()
    assert not vm.running


def test_background_writer_records_writes_in_order(vm_factory) -> None:
    vm = vm_factory({"vda": 2 * MiB, "vdb": MiB, "vdc": MiB})
    vm.start()
    vm.write("vdb", 0, MiB, 0x01)  # baseline that the pattern cycle must skip
    with BackgroundWriter(vm, length=4 * KiB, interval=0) as writer:
        writer.wait_for(30)
        for _ in range(20):  # the test thread shares the harness monitor
            assert vm.qmp("query-status")["status"] == "prelaunch"
    writes = writer.writes
    assert len(writes) >= 30
    assert writes == list(itertools.islice(writer.plan(), len(writes)))
    assert [w.disk for w in writes[:6]] == ["vda", "vdb", "vdc"] * 2
    assert writes[1].pattern != 0x01

    vm.stop()
    images = {d: image_bytes(vm.disks[d].path) for d in vm.disks}
    for disk in vm.disks:
        assert images[disk] == vm.expected(disk)
    assert is_prefix(writes, images, writer.baseline) == len(writes)


def test_background_writer_order_is_qemu_order(vm_factory) -> None:
    """A transaction on the tool's monitor cuts the recorded order into prefix and suffix."""
    vm = vm_factory({"vda": 8 * MiB, "vdb": 8 * MiB, "vdc": 8 * MiB})
    vm.start()
    tool = QEMUMonitorProtocol(str(vm.qmp_socket))
    tool.connect()
    try:
        with BackgroundWriter(vm, length=CLUSTER) as writer:
            writer.wait_for(10)
            tool.cmd("transaction", actions=[
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": f"{d}-fmt", "name": "cut", "granularity": CLUSTER}}
                for d in vm.disks
            ])
            writer.wait_for(len(writer.writes) + 10)
    finally:
        tool.close()
    writes = writer.writes
    dirty = {d: vm.bitmaps(d)[0]["count"] // CLUSTER for d in vm.disks}
    # Some cut point c: exactly the writes after it are in the new bitmaps.
    cuts = [c for c in range(len(writes) + 1)
            if all(sum(w.disk == d for w in writes[c:]) == n for d, n in dirty.items())]
    assert cuts, (dirty, writes)
    assert 10 <= cuts[0] <= len(writes) - 10
    vm.kill()


def test_background_writer_stops_when_its_range_is_full(vm_factory) -> None:
    vm = vm_factory({"vda": MiB, "vdb": MiB})
    vm.start()
    writer = BackgroundWriter(vm, length=4 * KiB, start=CLUSTER, end=CLUSTER + 16 * KiB).start()
    writer.wait_for(8)
    assert writer.stop() == list(writer.plan())
    assert {(w.disk, w.offset) for w in writer.writes} == {
        (d, CLUSTER + i * 4 * KiB) for d in ("vda", "vdb") for i in range(4)
    }
    assert writer.error is None
    vm.kill()


def test_background_writer_reports_write_errors(vm_factory) -> None:
    vm = vm_factory({"vda": MiB})
    vm.start()
    writer = BackgroundWriter(vm, length=4 * KiB).start()
    writer.wait_for(2)
    vm.kill()
    deadline = time.monotonic() + 10
    while writer.alive and time.monotonic() < deadline:  # let it hit the dead VM before asking it to stop
        time.sleep(0.01)
    with pytest.raises(HarnessError, match="BackgroundWriter failed"):
        writer.stop()


def test_is_prefix() -> None:
    base = {"a": bytes(8192), "b": bytes(8192)}
    writes = [("a", 0, 512, 1), ("b", 0, 512, 2), ("a", 512, 512, 3), ("b", 1024, 512, 4)]

    def apply(n: int) -> dict[str, bytes]:
        images = {d: bytearray(v) for d, v in base.items()}
        for disk, offset, length, pattern in writes[:n]:
            images[disk][offset:offset + length] = bytes([pattern]) * length
        return {d: bytes(v) for d, v in images.items()}

    for k in range(len(writes) + 1):
        assert is_prefix(writes, apply(k), base) == k
        assert is_prefix(writes, apply(k)) == k

    hole = dict(apply(4))
    hole["b"] = base["b"][:512] + hole["b"][512:]  # write 1 missing, 2 and 3 present
    with pytest.raises(AssertionError, match="not a prefix"):
        is_prefix(writes, hole, base)

    torn = dict(apply(2))
    torn["a"] = torn["a"][:512] + b"\x03" * 256 + torn["a"][768:]
    with pytest.raises(AssertionError, match="torn"):
        is_prefix(writes, torn, base)


def test_assert_image_equals_names_the_offset(tmp_path: Path) -> None:
    image = tmp_path / "x.raw"
    image.write_bytes(bytes(4096) + b"\x01" * 512 + bytes(512))
    assert_image_equals(image, bytes(4096) + b"\x01" * 512 + bytes(512), "raw")
    with pytest.raises(AssertionError, match=r"offset 4096 \(0x1000.*512 differing bytes"):
        assert_image_equals(image, bytes(5120), "raw")
    with pytest.raises(AssertionError, match="size"):
        assert_image_equals(image, bytes(4096), "raw")
