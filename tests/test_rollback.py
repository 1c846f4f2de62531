"""rollback: a shut-down VM's own images put back to a checkpoint, in place, against real QEMU.

The VM (two disks, one with a partial last granule) gets a chain A..E with writes between
every checkpoint (overlapping writes, zero writes, a discard, the last partial granule).
After a clean shutdown, rollbacks to C, A and E must leave images identical to the
harness's model at that checkpoint, writing exactly the bitmap granules touched since it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import cli
import pytest
from faults import Run, child_pids
from harness import apply_ops, assert_image_equals, image_bytes

KiB, MiB = 1024, 1024 * 1024
GRANULE = 64 * KiB
SIZES = {"vda": 8 * MiB, "vdb": 5 * MiB + 3 * 512}  # vdb's last granule is partial
NAMES = ["A", "B", "C", "D", "E"]

# ops applied before each checkpoint: (disk, op, offset, length, pattern)
STEPS = [
    [("vda", "w", 0, 3 * MiB, 0x11), ("vdb", "w", 0, 5 * MiB, 0x21)],  # before A
    [("vda", "w", 1 * MiB, 64 * KiB, 0x12), ("vda", "w", 1 * MiB + 32 * KiB, 100 * KiB, 0x13), ("vdb", "w", SIZES["vdb"] - 1024, 1024, 0x22)],
    [("vdb", "z", 1 * MiB + 128 * KiB, 256 * KiB, 0), ("vda", "w", 6 * MiB, 512 * KiB, 0x14)],
    [("vda", "d", 0, 512 * KiB, 0), ("vdb", "w", 4 * MiB, 4 * KiB, 0x23), ("vda", "w", 6 * MiB + 256 * KiB, 512 * KiB, 0x15)],
    [("vda", "w", 7 * MiB + 512, 3 * 512, 0x16), ("vdb", "w", SIZES["vdb"] - 512, 512, 0x24), ("vdb", "z", 0, 1 * MiB, 0)],
]


def touched(steps, disk):
    """Bitmap granules the ops of steps touch on disk, in bytes (the last granule clipped)."""
    granules = {g for step in steps for d, _, off, n, _ in step if d == disk for g in range(off // GRANULE, (off + n - 1) // GRANULE + 1)}
    return sum(min(GRANULE, SIZES[disk] - g * GRANULE) for g in granules)


def images(vm):
    return [f"--image={d}={vm.disks[d].path}" for d in vm.disks]


def rollback(repo, vm, to, *args, expect=0):
    return cli.run(repo, "rollback", "vm1", "--to", to, *images(vm), *args, expect=expect)


def assert_images(vm, expected):
    for d in vm.disks:
        assert_image_equals(vm.disks[d].path, expected[d], "qcow2")


def make_chain(vm, repo):
    """A..E, one backup each; returns checkpoint -> {disk: content}."""
    vm.start()
    expected = {}
    for i, (name, step) in enumerate(zip(NAMES, STEPS, strict=True)):
        apply_ops(vm, step)
        cli.run(repo, "full" if i == 0 else "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", name)
        expected[name] = {d: vm.expected(d) for d in vm.disks}
    vm.write("vda", 2 * MiB, 128 * KiB, 0x17)  # after E: the active bitmap holds it
    return expected


def set_model(vm, content):
    for d, data in content.items():
        vm.model[d][:] = data


def test_rollback_to_c_then_a_then_e_writes_only_changed_blocks(vm_factory, repo, tmp_path):
    vm = vm_factory(SIZES)
    expected = make_chain(vm, repo)
    after_e = [("vda", "w", 2 * MiB, 128 * KiB, 0x17)]
    vm.stop()
    before = {d: image_bytes(vm.disks[d].path) for d in vm.disks}

    # dry run: a plan, nothing written
    plan = json.loads(rollback(repo, vm, "C", "--dry-run", "--json").stdout)
    assert plan["dry_run"] and {d["mode"] for d in plan["disks"]} == {"changed-blocks"}
    assert {d["disk"]: d["bytes"] for d in plan["disks"]} == {d: touched(STEPS[3:] + [after_e], d) for d in SIZES}
    assert all(image_bytes(vm.disks[d].path) == before[d] for d in vm.disks)

    # to C
    out = json.loads(rollback(repo, vm, "C", "--json").stdout)
    assert_images(vm, expected["C"])
    changed = {d: touched(STEPS[3:] + [after_e], d) for d in SIZES}
    assert {d["disk"]: d["written"] + d["zeroed"] for d in out["disks"]} == changed
    assert out["bytes"] == sum(changed.values()) < sum(SIZES.values()) // 4

    # the next incremental backs the rollback up; D and E stay usable; its restore is C
    vm.start()
    set_model(vm, expected["C"])
    rows = json.loads(cli.run(repo, "checkpoints", "vm1", "--qmp", vm.qmp_socket, "--json").stdout)
    assert all(r["usable"] for r in rows if r["name"] in NAMES), rows
    cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "F")
    restored = cli.restore(repo, vm, "F", tmp_path / "F")
    for d, path in restored.items():
        assert_image_equals(path, expected["C"][d], "qcow2")
    cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--since", "D", "--checkpoint", "G")
    for d, path in cli.restore(repo, vm, "G", tmp_path / "G").items():
        assert_image_equals(path, expected["C"][d], "qcow2")
    vm.stop()

    # to A: everything touched since A (the rollback's writes are among them)
    out = json.loads(rollback(repo, vm, "A", "--json").stdout)
    assert_images(vm, expected["A"])
    assert {d["disk"]: d["written"] + d["zeroed"] for d in out["disks"]} == {d: touched(STEPS[1:] + [after_e], d) for d in SIZES}

    # to E: forward again, from the backup at E
    rollback(repo, vm, "E")
    assert_images(vm, expected["E"])
    # running it again changes nothing and is accepted
    rollback(repo, vm, "E")
    assert_images(vm, expected["E"])

    # the chain still holds after all that: an incremental restores E
    vm.start()
    set_model(vm, expected["E"])
    vm.verify("vda")
    cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "H")
    for d, path in cli.restore(repo, vm, "H", tmp_path / "H").items():
        assert_image_equals(path, expected["E"][d], "qcow2")


def chain_broken_after_c(vm_factory, repo):
    """A shut-down VM with the chain A..E whose checkpoint D lost its bitmap on vdb:
    (vm, expected contents per checkpoint, the images' bytes now)."""
    vm = vm_factory(SIZES)
    expected = make_chain(vm, repo)
    bitmap = next(r["bitmap"] for r in json.loads((repo / "vms" / "vm1" / "checkpoints.json").read_text())["checkpoints"] if r["name"] == "D")
    vm.qmp("block-dirty-bitmap-remove", node=vm.disks["vdb"].node, name=bitmap)
    vm.stop()
    return vm, expected, {d: image_bytes(vm.disks[d].path) for d in vm.disks}


def test_broken_chain_is_refused_unless_full(vm_factory, repo):
    vm, expected, before = chain_broken_after_c(vm_factory, repo)
    proc = rollback(repo, vm, "C", expect=4)
    assert "is missing on disk vdb" in proc.stderr and "--full" in proc.stderr
    assert all(image_bytes(vm.disks[d].path) == before[d] for d in vm.disks)  # nothing written, not even on vda
    rollback(repo, vm, "C", "--dry-run", "--full")
    out = json.loads(rollback(repo, vm, "C", "--full", "--json").stdout)
    assert {d["mode"] for d in out["disks"]} == {"full"}
    assert {d["disk"]: d["bytes"] for d in out["disks"]} == SIZES
    assert_images(vm, expected["C"])
    # the image stays sparse: vda's zero half is not allocated
    info = json.loads(os.popen(f"qemu-img map --output=json {vm.disks['vda'].path}").read())
    allocated = sum(e["length"] for e in info if e["data"])
    assert allocated <= 4 * MiB, info


def on_tty(repo, *args, answer: bytes) -> tuple[int, str, str]:
    """Run nbdbackup with stdin and stderr on a pseudo-terminal; answer its question.
    (exit status, what the terminal showed, stdout)."""
    master, slave = os.openpty()
    proc = subprocess.Popen(cli.command(repo, *args), stdin=slave, stderr=slave, stdout=subprocess.PIPE, env=cli.environment())
    os.close(slave)
    shown = b""
    try:
        deadline = time.monotonic() + 120
        while b"[y/N]" not in shown:
            assert time.monotonic() < deadline and proc.poll() is None, f"no question asked: {shown!r}"
            if select.select([master], [], [], 1)[0]:
                shown += os.read(master, 4096)
        os.write(master, answer)
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the process closed the terminal
                break
            if not data:
                break
            shown += data
        out = proc.stdout.read().decode()
        return proc.wait(timeout=120), shown.decode(errors="replace"), out
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("answer", [b"n\n", b"y\n"])
def test_broken_chain_asks_on_a_terminal(vm_factory, repo, answer):
    """On a terminal the refusal becomes a question: no leaves the disks alone (exit 4), yes
    rewrites them whole as --full does.  Without a terminal (cron) it stays a refusal (above)."""
    vm, expected, before = chain_broken_after_c(vm_factory, repo)
    status, shown, out = on_tty(repo, "rollback", "vm1", "--to", "C", *images(vm), "--json", answer=answer)
    assert "is missing on disk vdb" in shown and "Rewrite the whole of vda, vdb (13.0MiB) from the backup at C instead? [y/N]" in shown, shown
    if answer == b"n\n":
        assert status == 4, shown
        assert "Traceback" not in shown and "--full" in shown
        assert all(image_bytes(vm.disks[d].path) == before[d] for d in vm.disks)
    else:
        assert status == 0, shown
        result = json.loads(out)
        assert {d["mode"] for d in result["disks"]} == {"full"} and all("confirmed" in d["reason"] for d in result["disks"])
        assert_images(vm, expected["C"])


def test_running_vm_is_refused_and_locked_images_too(vm_factory, repo):
    vm = vm_factory(SIZES)
    make_chain(vm, repo)
    vm.qmp("cont")  # the guest runs (no OS: the firmware idles)
    proc = rollback(repo, vm, "C", "--qmp", str(vm.qmp_socket), expect=16)
    assert "is running" in proc.stderr and "--pause" in proc.stderr
    assert vm.qmp("query-status")["running"]
    # without its QMP socket: QEMU's image locks refuse the second opener, nothing is written
    vm.qmp("stop")
    proc = rollback(repo, vm, "C", expect=16)
    assert "in use" in proc.stderr
    vm.verify("vda")
    vm.verify("vdb")


@pytest.mark.parametrize("pause", [False, True])
def test_paused_vm_is_rolled_back_through_an_overlay(vm_factory, repo, tmp_path, pause):
    vm = vm_factory(SIZES)
    expected = make_chain(vm, repo)
    after_e = [("vda", "w", 2 * MiB, 128 * KiB, 0x17)]
    if pause:
        vm.qmp("cont")
    out = json.loads(rollback(repo, vm, "C", "--qmp", str(vm.qmp_socket), *(["--pause"] if pause else []), "--json").stdout)
    assert {d["disk"]: d["written"] + d["zeroed"] for d in out["disks"]} == {d: touched(STEPS[3:] + [after_e], d) for d in SIZES}
    assert vm.qmp("query-status")["running"] == pause  # resumed only if rollback paused it
    assert any(e["event"] == "RESET" for e in vm.events), vm.events
    set_model(vm, expected["C"])
    for d in vm.disks:
        vm.verify(d)
    state = vm.block_state()
    assert state["exports"] == [] and state["jobs"] == [] and not [n for n in state["nodes"] if n.startswith("nbdbackup")], state
    assert not [b for bs in state["bitmaps"].values() for b in bs if b.get("name") == "nbdbackup-rollback"]
    # the chain stays true: an incremental backs the rollback up and restores C
    cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, "--checkpoint", "F")
    for d, path in cli.restore(repo, vm, "F", tmp_path / "F").items():
        assert_image_equals(path, expected["C"][d], "qcow2")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_rollback_completes_when_run_again(vm_factory, repo, signum):
    vm = vm_factory(SIZES)
    expected = make_chain(vm, repo)
    vm.stop()
    args = ("rollback", "vm1", "--to", "A", *images(vm))
    # at the first write: the writers of vda's first jobs wait there, vdb's turn has not come
    with Run(repo, *args, pause="write", after=1) as run:
        run.wait_paused()
        # the rollback holds the VM's lock: no backup of the VM meanwhile (refused before QMP is tried)
        assert "holds VM vm1" in cli.run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, expect=5).stderr
        daemons = child_pids(run.pid)
        if signum == signal.SIGKILL:
            run.kill()
        else:
            run.signal(signum)
            result = run.finish()
            assert result.returncode == 143, result.describe()
            assert "partly rolled back" in result.stderr and "run the same command again" in result.stderr
        deadline = time.monotonic() + 30
        while any(os.path.exists(f"/proc/{p}") for p in daemons) and time.monotonic() < deadline:
            time.sleep(0.05)  # the storage daemon quits (SIGTERM from nbdbackup's end) and stores the bitmaps
    assert (repo / "rollbacks" / "vm1.json").exists()
    with pytest.raises(AssertionError):
        assert_images(vm, expected["A"])  # partly written
    out = cli.run(repo, *args)
    assert "completing an interrupted rollback" in out.stdout
    assert_images(vm, expected["A"])
    assert not (repo / "rollbacks" / "vm1.json").exists()


@pytest.mark.parametrize("any_repo", ["encrypted"], indirect=True)
def test_rollback_from_an_encrypted_repository(vm_factory, any_repo):
    """Interrupted, completed, then to another point: the images equal the model each time; the
    marker of the unfinished rollback names nothing and is encrypted like the rest of the repository."""
    repo = any_repo
    vm = vm_factory(SIZES)
    expected = make_chain(vm, repo)
    vm.stop()
    args = ("rollback", "vm1", "--to", "B", *images(vm))
    with Run(repo, *args, pause="write", after=3) as run:
        run.wait_paused()
        run.signal(signal.SIGTERM)
        assert run.finish().returncode == 143
    [marker] = (repo / "rollbacks").iterdir()
    assert "vm1" not in marker.name and marker.read_bytes()[:4] == b"NBDE", marker
    assert b"vda" not in marker.read_bytes()
    out = cli.run(repo, *args)
    assert "completing an interrupted rollback" in out.stdout
    assert_images(vm, expected["B"])
    assert list((repo / "rollbacks").iterdir()) == []
    rollback(repo, vm, "D")
    assert_images(vm, expected["D"])
    stems = {p.name.split(".")[0] for p in repo.rglob("*")}  # whole names: keyed ones are random letters
    assert not stems & {"vm1", "vda", "vdb", *NAMES, "vm-vm1"}, stems


@pytest.mark.parametrize("new_size", [SIZES["vdb"] + 3 * MiB, 3 * MiB])
def test_resized_disk_is_refused_unless_full(vm_factory, repo, new_size):
    from faults import resize

    vm = vm_factory(SIZES)
    expected = make_chain(vm, repo)
    resize(vm, "vdb", new_size)
    vm.stop()
    proc = rollback(repo, vm, "D", expect=4)
    assert "vdb was resized since checkpoint D" in proc.stderr and "--full" in proc.stderr
    plan = json.loads(rollback(repo, vm, "D", "--full", "--dry-run", "--json").stdout)
    assert [d["disk"] for d in plan["disks"] if "resized" in d["reason"]] == ["vdb"]
    rollback(repo, vm, "D", "--full")
    assert_images(vm, expected["D"])


def test_storage_failure_midway_exits_17_and_a_rerun_completes(vm_factory, repo, tmp_path):
    from nbdbackup.repository.index import decode

    vm = vm_factory(SIZES)
    expected = make_chain(vm, repo)
    vm.stop()
    # the backup storage loses a chunk that the rollback to A needs (vda's data at 1 MiB)
    index = decode((repo / "vms" / "vm1" / "backups" / "A" / "vda.index").read_bytes(), "test")[1]
    cid = next(e.chunk for e in index if e.offset <= 1 * MiB < e.end).hex()
    chunk, aside = repo / "chunks" / cid[:2] / cid, tmp_path / "aside"
    chunk.rename(aside)
    proc = rollback(repo, vm, "A", expect=17)
    assert "partly rolled back" in proc.stderr and "run the same command again" in proc.stderr
    assert (repo / "rollbacks" / "vm1.json").exists()
    aside.rename(chunk)
    assert "completing an interrupted rollback (to A)" in rollback(repo, vm, "A").stdout
    assert_images(vm, expected["A"])


def test_images_from_the_config_file_and_the_vm_lock(vm_factory, repo, tmp_path):

    vm = vm_factory(SIZES)
    expected = make_chain(vm, repo)
    config = tmp_path / "config.toml"
    config.write_text("[vm.vm1]\nimages = { " + ", ".join(f'{d} = "{vm.disks[d].path}"' for d in vm.disks) + " }\n")
    # a backup of the VM holds its lock: the rollback waits for nobody and says so
    with Run(repo, "incremental", "vm1", "--qmp", vm.qmp_socket, pause="read") as backup:
        backup.wait_paused()
        proc = cli.run(repo, "--config", str(config), "rollback", "vm1", "--to", "C", expect=5)
        assert "holds VM vm1" in proc.stderr
        result = backup.finish()
        assert result.returncode == 0, result.describe()
    vm.stop()
    cli.run(repo, "--config", str(config), "rollback", "vm1", "--to", "C", "--disk", "vdb")
    assert_image_equals(vm.disks["vdb"].path, expected["C"]["vdb"], "qcow2")
    assert image_bytes(vm.disks["vda"].path) != expected["C"]["vda"]  # not chosen, not touched
    proc = cli.run(repo, "--config", str(config), "rollback", "vm1", "--to", "C", "--image", "vda", expect=2)
    assert "is not ID=PATH" in proc.stderr
    proc = cli.run(repo, "rollback", "vm1", "--to", "C", "--image", f"vda={vm.disks['vda'].path}", expect=2)
    assert "no image known for disk vdb" in proc.stderr


def test_config_images_are_checked(tmp_path, monkeypatch):
    from nbdbackup import config
    from nbdbackup.errors import UsageError

    conf = tmp_path / "c.toml"
    conf.write_text('[vm.vm1]\nimages = { vda = "/srv/vm1/vda.qcow2" }\n')
    assert config.load(str(conf), None).vm("vm1", required=False).images == {"vda": Path("/srv/vm1/vda.qcow2")}
    for bad in ('images = { vda = 3 }', 'images = { "a b" = "/x" }', 'images = "/x"'):
        conf.write_text(f"[vm.vm1]\n{bad}\n")
        with pytest.raises(UsageError):
            config.load(str(conf), None)


def test_images_of_another_vm_name_are_refused_even_with_full(vm_factory, repo):
    vm = vm_factory(SIZES)
    make_chain(vm, repo)
    other = vm_factory({"vda": 4 * MiB}, name="vm2")
    other.start()
    other.write("vda", 0, 1 * MiB, 0x55)
    cli.run(repo, "full", "vm2", "--qmp", other.qmp_socket)
    other.stop()
    vm.stop()
    before = image_bytes(other.disks["vda"].path)
    # vm1's rollback pointed at vm2's image by mistake
    proc = cli.run(repo, "rollback", "vm1", "--to", "C", "--full", "--disk", "vda", f"--image=vda={other.disks['vda'].path}", expect=4)
    assert "'vm2'" in proc.stderr
    assert image_bytes(other.disks["vda"].path) == before


@pytest.mark.parametrize("encryption", [None, "repokey"])
def test_chunks_decoded_into_a_reused_buffer(encryption):
    """The rollback's writers decode each chunk into their own reused buffer
    (Repository.decode_chunk_into): get_chunk's content, also through an encrypted
    repository's decryption, for zstd and stored chunks; a damaged chunk is refused."""
    from nbdbackup.errors import RepositoryDamaged
    from nbdbackup.repository import Repository
    from nbdbackup.repository.memory import MemoryBackend

    backend = MemoryBackend("r")
    repo = Repository.open(backend, create=True, encryption=encryption, **({"passphrase": b"pass phrase"} if encryption else {}))
    buffer = bytearray(5 * MiB)
    for data in (b"text " * 100000, os.urandom(200000)):
        cid = repo.chunk_id(data)
        repo.put_chunk(cid, data, 2)
        view = repo.decode_chunk_into(repo.fetch_chunk(cid, "test"), cid, "test", lambda n: memoryview(buffer))
        assert bytes(view) == data == repo.get_chunk(cid, "test")
    blob = bytearray(repo.fetch_chunk(cid, "test"))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(RepositoryDamaged):
        repo.decode_chunk_into(bytes(blob), cid, "test", lambda n: memoryview(buffer))
