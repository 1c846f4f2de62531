"""full/incremental/auto --dry-run: the plan, and nothing changed in QEMU or the repository.

The dry run's plan is then checked against what the real run does."""

from __future__ import annotations

import fcntl
import hashlib
import json

import cli
from faults import AFTER, NOTHING_LEFT, Run, all_bitmaps, prepare, qemu_leftovers

KiB, MiB = 1024, 1024 * 1024
SIZES = {"vda": 4 * MiB, "vdb": 2 * MiB}


def tree(repo):
    """Every file of the repository with its content's digest, lock files aside: a run creates
    them when they are missing and writes its pid into an exclusive one (see locks())."""
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(repo.rglob("*")) if p.is_file() and p.parent.name != "locks"}


def locks_held(repo):
    """The lock files that someone holds now."""
    held = []
    for lock in sorted((repo / "locks").glob("*")):
        with open(lock, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(lock.name)
    return held


def qemu_state(vm):
    """Every bitmap (twin included, with its dirty count), node, export and job."""
    state = vm.block_state()
    return {"bitmaps": all_bitmaps(vm), "nodes": sorted(state["nodes"]), "exports": state["exports"], "jobs": state["jobs"]}


def dry_run(repo, vm, mode, *args):
    before = (qemu_state(vm), tree(repo))
    plan = json.loads(cli.run(repo, mode, vm.name, "--qmp", vm.qmp_socket, "--dry-run", "--json", *args).stdout)
    assert (qemu_state(vm), tree(repo)) == before, "a dry run changed QEMU or the repository"
    assert locks_held(repo) == []
    return plan


def test_an_incremental_dry_run_changes_nothing_and_the_real_run_follows_its_plan(vm_factory, repo):
    vm = vm_factory(SIZES)
    vm.start()
    vm.write("vda", 0, 1 * MiB, 0x11)
    first = cli.run(repo, "full", vm.name, "--qmp", vm.qmp_socket).stdout.strip()
    vm.write("vda", 1 * MiB, 128 * KiB, 0x12)  # two granules on vda, nothing on vdb

    plan = dry_run(repo, vm, "incremental", "--checkpoint", "two")
    assert plan["kind"] == "incremental" and plan["since"] == first and plan["checkpoint"] == "two"
    assert plan["twin_checked"] and plan["repairs_first"] == [] and plan["notes"] == []
    disks = {d["id"]: d for d in plan["disks"]}
    assert {d: (p["read"], p["at_most_bytes"]) for d, p in disks.items()} == {"vda": ("changed", 128 * KiB), "vdb": ("changed", 0)}
    assert all(p["reason"] == f"changed since {first}" for p in disks.values())

    text = cli.run(repo, "incremental", vm.name, "--qmp", vm.qmp_socket, "--dry-run", "--checkpoint", "two").stdout
    assert f"would make an incremental backup since {first}, checkpoint two" in text, text
    assert f"disk vda (4.0MiB): read the changed blocks, at most 128.0KiB: changed since {first}" in text, text

    done = json.loads(cli.run(repo, "incremental", vm.name, "--qmp", vm.qmp_socket, "--json", "--checkpoint", "two").stdout)
    assert (done["kind"], done["since"], done["checkpoint"]) == (plan["kind"], plan["since"], "two")
    assert {d["id"]: d["read_bytes"] for d in done["disks"]} == {d: p["at_most_bytes"] for d, p in disks.items()}


def test_an_auto_dry_run_plans_the_full_backup_that_auto_then_makes(vm_factory, repo):
    """Another tool cleared the active bitmap: the twin check (which leaves nothing behind) finds
    it, the plan is a full backup and says why; `auto` then makes exactly that."""
    vm = vm_factory(SIZES)
    vm.start()
    cli.run(repo, "full", vm.name, "--qmp", vm.qmp_socket, "--checkpoint", "one")
    vm.write("vdb", 0, 64 * KiB, 0x21)
    bitmaps = [b["name"] for b in vm.bitmaps("vdb") if not b["name"].endswith("@twin")]
    assert len(bitmaps) == 1  # checkpoint one's, recording
    vm.qmp("block-dirty-bitmap-clear", node=vm.disks["vdb"].node, name=bitmaps[0])

    plan = dry_run(repo, vm, "auto", "--checkpoint", "two")
    assert plan["kind"] == "full" and plan["since"] is None
    assert [(d["id"], d["read"], d["reason"]) for d in plan["disks"]] == [("vda", "all", "full backup"), ("vdb", "all", "full backup")]
    assert len(plan["notes"]) == 1 and "changed by another tool" in plan["notes"][0] and "vdb" in plan["notes"][0]

    cli.run(repo, "auto", vm.name, "--qmp", vm.qmp_socket, "--checkpoint", "two")
    assert [(b["checkpoint"], b["kind"]) for b in cli.backups(repo)][-1] == ("two", "full")


def test_a_full_dry_run_of_a_new_vm_creates_no_bitmap(vm_factory, repo):
    vm = vm_factory(SIZES)
    vm.start()
    cli.run(repo, "init", "--encryption", "none")
    plan = dry_run(repo, vm, "full")
    assert plan["kind"] == "full" and [d["id"] for d in plan["disks"]] == ["vda", "vdb"]
    assert all(d["at_most_bytes"] == SIZES[d["id"]] for d in plan["disks"])
    assert all(not b for b in all_bitmaps(vm).values())
    assert cli.backups(repo) == []


def test_a_dry_run_lists_the_repairs_that_the_real_run_makes_first(vm_factory, repo):
    """A bitmap in our namespace without a record (as a crash leaves one): the dry run says the
    run removes it first, and leaves it; the real run removes it."""
    vm = vm_factory(SIZES)
    vm.start()
    cli.run(repo, "full", vm.name, "--qmp", vm.qmp_socket, "--checkpoint", "one")
    ours = next(b["name"] for b in vm.bitmaps("vda") if not b["name"].endswith("@twin"))
    stray = ours.rsplit(".", 1)[0] + ".stray"
    vm.qmp("block-dirty-bitmap-add", node=vm.disks["vda"].node, name=stray, persistent=True)

    plan = dry_run(repo, vm, "incremental", "--checkpoint", "two")
    assert plan["repairs_first"] == [f"remove bitmaps without a checkpoint record: {stray}"]
    assert plan["kind"] == "incremental" and plan["since"] == "one"
    assert stray in [b["name"] for b in vm.bitmaps("vda")]

    cli.run(repo, "incremental", vm.name, "--qmp", vm.qmp_socket, "--checkpoint", "two")
    assert stray not in [b["name"] for b in vm.bitmaps("vda")]


def test_auto_all_dry_run_plans_every_vm_and_exits_with_the_worst_code(vm_factory, repo, tmp_path):
    vm = vm_factory(SIZES)
    vm.start()
    cli.run(repo, "full", vm.name, "--qmp", vm.qmp_socket, "--checkpoint", "one")
    vm.write("vdb", 0, 64 * KiB, 0x21)
    conf = tmp_path / "c.toml"
    conf.write_text(f'[vm.{vm.name}]\nqmp = "{vm.qmp_socket}"\n[vm.zz]\nqmp = "{tmp_path / "gone.sock"}"\n')
    before = (qemu_state(vm), tree(repo))
    proc = cli.run(repo, "--config", conf, "auto", "--all", "--dry-run", "--json", expect=3)
    assert (qemu_state(vm), tree(repo)) == before and locks_held(repo) == []
    rows = {r["vm"]: r for r in json.loads(proc.stdout)}
    assert rows["zz"]["exit_code"] == 3 and "gone.sock" in rows["zz"]["error"]
    plan = rows[vm.name]["plan"]
    assert (plan["kind"], plan["since"]) == ("incremental", "one")
    assert {d["id"]: d["at_most_bytes"] for d in plan["disks"]} == {"vda": 0, "vdb": 64 * KiB}
    assert cli.backups(repo, vm.name)[-1]["checkpoint"] == "one"  # no backup was made


def test_after_a_killed_run_the_dry_run_lists_the_repairs_and_plans_as_the_real_run_then_does(vm_factory, repo, tmp_path):
    """nbdbackup killed while it read the disks: its exports, nodes and pending checkpoint are
    still there.  The dry run lists their removal, leaves them, and plans the
    incremental since the last good checkpoint that the real run then makes."""
    vm, _ = prepare(vm_factory, repo)
    with Run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "hung", pause="read", after=AFTER["read"]) as run:
        run.wait_paused()
        run.kill()
    assert qemu_leftovers(vm) != NOTHING_LEFT

    plan = dry_run(repo, vm, "incremental", "--checkpoint", "two")
    repairs = plan["repairs_first"]
    assert "roll back checkpoint hung: its backup never completed" in repairs, repairs
    assert any(r.startswith("remove the export ") and r.endswith(" left by an interrupted run") for r in repairs), repairs
    assert any(r.startswith("remove the node ") for r in repairs), repairs
    assert (plan["kind"], plan["since"]) == ("incremental", "one")
    assert not plan["twin_checked"] and plan["notes"] == ["the active bitmap is compared with its twin after the repairs, by the real run"]

    done = json.loads(cli.run(repo, "incremental", vm.name, "--qmp", vm.qmp_socket, "--json", "--checkpoint", "two").stdout)
    assert (done["kind"], done["since"]) == ("incremental", "one")
    assert qemu_leftovers(vm) == NOTHING_LEFT
