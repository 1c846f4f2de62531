"""What a failed or interrupted backup leaves behind (issue 9, item 6): nothing.

* QEMU exactly as before the run, every bitmap included (the twin of the first
  checkpoint too), at every stage a signal can stop a first full backup;
* the chunks the run stored and no backup references are removed at once, unless
  another run holds the repository (then it says how much it left, and prune frees it);
  chunks that a concurrent run found already stored are never removed from under it
  (the rule in docs/FORMAT.md, "Deleting chunks").
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import cli
import pytest
from faults import (
    AFTER,
    NOTHING_LEFT,
    SIZES,
    Run,
    all_bitmaps,
    assert_no_partial_backups,
    assert_one_line_error,
    assert_recovers,
    assert_restores,
    backup,
    backups,
    bitmap_state,
    prepare,
    qemu_leftovers,
    records,
    scratch_left,
    small_filesystem,
    snapshot,
    write_data,
)

KiB, MiB = 1024, 1024 * 1024


def chunk_files(repo: Path) -> dict[str, int]:
    """Chunk file name -> size, temporaries included."""
    base = repo / "chunks"
    return {p.name: p.stat().st_size for p in base.rglob("*") if p.is_file()} if base.is_dir() else {}


def wait_for_end_of_cleanup(run) -> None:
    deadline = time.monotonic() + 10
    while "received" not in (run.dir / "stderr").read_text():
        assert run.proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)


CASES = [(stage, signal.SIGINT) for stage in ("freeze", "export", "read", "index")] + [("index", signal.SIGTERM)]


@pytest.mark.parametrize("stage,signum", CASES, ids=[f"{s}-{signal.Signals(g).name}" for s, g in CASES])
def test_signal_during_a_first_full_backup_leaves_qemu_and_the_repository_as_before(vm_factory, repo, tmp_path, stage, signum):
    vm = vm_factory(SIZES)
    vm.start()
    vm.write("vda", 0, 1 * MiB, 0x11)
    vm.write("vda", 4 * MiB, 64 * KiB, 0x12)
    vm.write("vdb", 0, 512 * KiB, 0x21)
    before = all_bitmaps(vm)
    assert before == {"vda": [], "vdb": []}
    with Run(repo, "full", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "hung", pause=stage, after=AFTER.get(stage, 1)) as run:
        run.wait_paused()
        at_pause = chunk_files(repo)
        if stage == "index":  # vda was read and stored: there is something to clean up
            assert len(at_pause) >= 2, at_pause
        run.signal(signum)
        wait_for_end_of_cleanup(run)
        result = run.finish()
    assert_one_line_error(result, 128 + signum)
    print(f"{stage}: {len(at_pause)} chunks ({sum(at_pause.values())} bytes) stored at the signal, "
          f"{len(chunk_files(repo))} left after the run")
    assert qemu_leftovers(vm) == NOTHING_LEFT
    assert all_bitmaps(vm) == before  # no checkpoint bitmap, and no twin either
    assert chunk_files(repo) == {} and scratch_left(repo) == [] and backups(repo) == [] and records(repo) == []
    assert "left" not in result.stderr, result.stderr
    # and the next run starts as if nothing had happened
    name = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket).stdout.strip()
    assert_restores(repo, vm, name, snapshot(vm), tmp_path / "out")


@pytest.mark.parametrize("stage", ["read", "index"])
def test_an_interrupted_incremental_removes_its_chunks_and_keeps_every_other(vm_factory, repo, tmp_path, stage):
    vm, at_one = prepare(vm_factory, repo)
    chunks_before, twins_before = chunk_files(repo), all_bitmaps(vm)
    before = bitmap_state(vm)
    with Run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "hung", pause=stage, after=AFTER[stage]) as run:
        run.wait_paused()
        stored = set(chunk_files(repo)) - set(chunks_before)
        run.signal(signal.SIGINT)
        wait_for_end_of_cleanup(run)
        result = run.finish()
    assert_one_line_error(result, 130)
    print(f"{stage}: {len(stored)} new chunks at the signal, {len(set(chunk_files(repo)) - set(chunks_before))} left")
    assert chunk_files(repo) == chunks_before
    assert bitmap_state(vm) == before and qemu_leftovers(vm) == NOTHING_LEFT
    assert all_bitmaps(vm) == twins_before  # the twin as before, dirty count included (no guest write meanwhile)
    assert_restores(repo, vm, "one", at_one, tmp_path / "one")
    assert_recovers(repo, vm, tmp_path / "next")
    assert_no_partial_backups(repo)


def test_chunks_another_run_may_use_are_left_and_prune_removes_them_later(vm_factory, repo, tmp_path):
    """vm1 and vm2 hold the same data.  vm1's backup stores the chunks, vm2's finds them stored
    (dedup) while vm1's is interrupted: vm1's run must not remove them (vm2's run holds the
    repository), it says how much it left; vm2's backup restores byte for byte; prune frees
    only what no backup uses."""
    data = random.Random(9).randbytes(3 * MiB)
    vm1, vm2 = vm_factory({"vda": 8 * MiB}, name="vm1"), vm_factory({"vda": 8 * MiB}, name="vm2")
    for vm in (vm1, vm2):
        vm.start()
        write_data(vm, "vda", 0, data)
    write_data(vm1, "vda", 4 * MiB, random.Random(1).randbytes(1 * MiB))  # vm1 only: garbage once vm1 fails
    with Run(repo, "full", "vm1", "--qmp", vm1.qmp_socket, "--checkpoint", "c1", pause="index") as run1:
        run1.wait_paused()  # vm1's disk is stored, its index not written
        shared = chunk_files(repo)
        with Run(repo, "full", "vm2", "--qmp", vm2.qmp_socket, "--checkpoint", "c2", pause="index") as run2:
            run2.wait_paused()  # vm2 read everything and found its chunks already stored
            assert chunk_files(repo) == shared
            run1.signal(signal.SIGINT)
            wait_for_end_of_cleanup(run1)
            result1 = run1.finish()
            assert_one_line_error(result1, 130)
            [left] = [line for line in result1.stderr.splitlines() if "left" in line]
            assert f"left {len(shared)} chunks" in left and "MiB" in left and "prune" in left, left
            assert chunk_files(repo) == shared
            result2 = run2.finish()
            assert result2.returncode == 0, result2.describe()
    assert backups(repo, "vm2") == ["c2"]
    assert_restores(repo, vm2, "c2", snapshot(vm2), tmp_path / "out-vm2")
    cli.run(repo, "prune", "vm2", "--qmp", vm2.qmp_socket, "--keep-last", "1")
    remaining = chunk_files(repo)
    assert set(remaining) < set(shared), "prune freed vm1's own chunk"
    assert_restores(repo, vm2, "c2", snapshot(vm2), tmp_path / "out-vm2-after-prune")
    cli.run(repo, "verify", "vm2")


def test_a_full_filesystem_leaves_no_chunks_behind(vm_factory, tmp_path):
    """The repository's filesystem fills up during an incremental: it fails (exit 7) and frees
    everything it had stored, so the filesystem is as full as before the run."""
    rng = random.Random(50)
    vm = vm_factory({"vda": 64 * MiB})
    vm.start()
    write_data(vm, "vda", 0, rng.randbytes(6 * MiB))
    with small_filesystem(tmp_path / "small", 50) as mount:
        repo = mount / "repo"
        backup(repo, vm, "full", "--checkpoint", "one")
        chunks_before, before = chunk_files(repo), all_bitmaps(vm)
        used_before = _used(mount)
        write_data(vm, "vda", 8 * MiB, rng.randbytes(52 * MiB))
        before_run = all_bitmaps(vm)
        proc = cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, expect=7)
        assert "full" in proc.stderr, proc.stderr
        used_after = _used(mount)
        print(f"full filesystem: {used_before / MiB:.1f} MiB used before the run, {used_after / MiB:.1f} MiB after it failed")
        assert chunk_files(repo) == chunks_before
        assert used_after <= used_before + 64 * KiB  # the checkpoint records may have grown a little
        assert qemu_leftovers(vm) == NOTHING_LEFT
        assert [(n, r, p) for n, r, p, _ in all_bitmaps(vm)["vda"]] == [(n, r, p) for n, r, p, _ in before_run["vda"]]
        assert {n for n, *_ in before["vda"]} == {n for n, *_ in all_bitmaps(vm)["vda"]}


def _used(mount: Path) -> int:
    import os

    st = os.statvfs(mount)
    return (st.f_blocks - st.f_bfree) * st.f_frsize
