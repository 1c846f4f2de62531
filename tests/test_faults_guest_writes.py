"""The guest writes as fast as it can for the whole length of the backups.

Each backup must restore to exactly one instant (the writes it holds are a
prefix of the guest's writes, none torn), and the fleecing scratch file may
only grow by what the guest overwrote after that instant: one 64 KiB cluster
per guest write at most, plus qcow2 metadata. (The harness's writes run in
QEMU's main loop, as the freeze transaction does, so each write is wholly
before or after the freeze: exactly writes[k:] come after it.)
"""

from __future__ import annotations

import time

import cli
from faults import NOTHING_LEFT, Run, assert_restores, backup, qemu_leftovers, scratch_left, snapshot
from harness import BackgroundWriter, image_bytes, is_prefix

KiB, MiB = 1024, 1024 * 1024
SLOT = 64 * KiB  # each guest write: one 64 KiB, 64 KiB-aligned slot (= one scratch cluster)
METADATA = 512 * KiB  # per scratch image: header, L1, refcount table and block, one L2 table


def run_sampling_scratch(repo, vm, kind, writer):
    """Run a backup while the writer writes, sampling the scratch files' sizes.

    Returns the backup's name, the number of guest writes completed before it
    started and after it ended, and per disk the samples (scratch size, guest
    writes completed right after the size was read).
    """
    before = len(writer.writes)
    samples: dict[str, list[tuple[int, int]]] = {}
    with Run(repo, kind, "vm1", "--qmp", vm.qmp_socket) as run:
        while run.proc.poll() is None:
            for path in (repo / "tmp").glob("*/*.fleece.qcow2"):
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue
                samples.setdefault(path.name.split(".")[0], []).append((size, len(writer.writes)))
            time.sleep(0.002)
        result = run.finish()
    after = len(writer.writes)
    assert result.returncode == 0, result.describe()
    return result.stdout.strip(), before, after, samples


def test_guest_writing_at_full_speed_during_backups(vm_factory, repo, tmp_path):
    vm = vm_factory({"vda": 256 * MiB, "vdb": 128 * MiB})
    vm.start()
    vm.write("vda", 0, 32 * MiB, 0x5A)  # data to read, and to overwrite: each overwrite is copied first
    vm.write("vdb", 0, 16 * MiB, 0xA5)
    backup(repo, vm, "full", "--checkpoint", "one")
    with BackgroundWriter(vm, length=SLOT, interval=0) as writer:
        writer.wait_for(20)
        results = []
        for kind in ("incremental", "full"):
            results.append(run_sampling_scratch(repo, vm, kind, writer))
            writer.wait_for(len(writer.writes) + 20)
    writes = writer.writes

    for i, (name, before, after, samples) in enumerate(results):
        images = restored(repo, vm, name, tmp_path / f"b{i}")
        k = is_prefix(writes, images, writer.baseline)  # one instant, nothing torn
        assert before <= k <= after, (name, before, k, after)
        assert sorted(samples) == ["vda", "vdb"], f"the scratch files were not seen: {samples}"
        for disk, seen in samples.items():
            # A scratch image can only hold the clusters the guest overwrote after the freeze
            # (writes k, k+1, ...: those not in the backup), up to the last write completed when
            # its size was read, plus the one in flight then.
            for size, done in seen:
                overwritten = sum(1 for w in writes[k:done + 1] if w.disk == disk)
                assert size <= overwritten * SLOT + METADATA, (
                    f"backup {name}: scratch of {disk} was {size} bytes when the guest had written only "
                    f"{overwritten} x {SLOT} bytes to it since the freeze (+ {METADATA} for metadata)")
        print(f"backup {name}: guest writes {before}..{after}, prefix {k}; largest scratch: "
              f"{ {d: max(seen) for d, seen in samples.items()} }")
    assert qemu_leftovers(vm) == NOTHING_LEFT and scratch_left(repo) == []
    last = backup(repo, vm, "incremental")
    assert_restores(repo, vm, last, snapshot(vm), tmp_path / "last")


def restored(repo, vm, name, out):
    cli.run(repo, "restore", vm.name, "--to", name, "--output", out)
    return {d: image_bytes(out / f"{d}.qcow2", "qcow2") for d in vm.disks}
