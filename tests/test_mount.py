"""mount/umount: guest filesystems of a backup point, read-only, from a real backup of a running VM."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import cli
import pytest

KiB, MiB = 1024, 1024 * 1024
DISK = 400 * MiB
EXT_AT, EXT_SIZE = 1 * MiB, 32 * MiB
FAT_AT, FAT_SIZE = 33 * MiB, 30 * MiB
XFS_AT, XFS_SIZE = 64 * MiB, 320 * MiB  # mkfs.xfs wants 300 MiB at least
SMALL_DISK = 64 * MiB  # ext4 and vfat only
PIECE = 4 * MiB


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def known_files(root: Path, tag: str) -> dict[str, bytes]:
    files = {
        "hello.txt": f"hello from {tag}\n".encode(),
        "big.bin": os.urandom(3 * MiB + 123),
        "sub/nested.txt": f"nested {tag}\n".encode() * 100,
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def build_disk(tmp: Path, *, xfs: bool = True) -> tuple[Path, dict[str, bytes], dict[str, bytes], dict[str, bytes]]:
    """A GPT disk image (parted) with an ext4 (mke2fs -d), a vfat (mkfs.fat + mtools) and, if xfs,
    an xfs (mkfs.xfs, files copied in through a loop mount) partition; without xfs the disk is SMALL_DISK."""
    disk = tmp / "disk.img"
    sh("truncate", "-s", str(DISK if xfs else SMALL_DISK), str(disk))
    sh("parted", "-s", str(disk), "mklabel", "gpt", "mkpart", "linux", "ext4", "1MiB", "33MiB",
       "mkpart", "efi", "fat32", "33MiB", "63MiB", *(("mkpart", "data", "xfs", "64MiB", "384MiB") if xfs else ()))
    ext_src, fat_src = tmp / "ext-src", tmp / "fat-src"
    ext_files, fat_files = known_files(ext_src, "ext4"), known_files(fat_src, "vfat")
    ext, fat = tmp / "ext.img", tmp / "fat.img"
    sh("mke2fs", "-q", "-t", "ext4", "-d", str(ext_src), str(ext), str(EXT_SIZE // KiB))
    sh("mkfs.fat", "-C", str(fat), str(FAT_SIZE // KiB))
    sh("mmd", "-i", str(fat), "::sub")
    for name in fat_files:
        sh("mcopy", "-i", str(fat), str(fat_src / name), f"::{name}")
    for part, at in ((ext, EXT_AT), (fat, FAT_AT)):
        sh("dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={at // MiB}", "conv=notrunc", "status=none")
    if not xfs:
        return disk, ext_files, fat_files, {}
    xfs, xfs_src, xfs_mnt = tmp / "xfs.img", tmp / "xfs-src", tmp / "xfs-mnt"
    xfs_files = known_files(xfs_src, "xfs")
    sh("truncate", "-s", str(XFS_SIZE), str(xfs))
    sh("mkfs.xfs", "-q", str(xfs))
    xfs_mnt.mkdir()
    sh("mount", "-o", "loop", str(xfs), str(xfs_mnt))
    try:
        sh("cp", "-a", f"{xfs_src}/.", str(xfs_mnt))
    finally:
        sh("umount", str(xfs_mnt))
    sh("dd", f"if={xfs}", f"of={disk}", "bs=1M", f"seek={XFS_AT // MiB}", "conv=notrunc", "status=none")
    return disk, ext_files, fat_files, xfs_files


def write_into_vm(vm, disk: str, image: Path, tmp: Path) -> None:
    """Copy the image into the running VM's disk through its device (qemu-io in QEMU), skipping zeroes."""
    data = image.read_bytes()
    for off in range(0, len(data), PIECE):
        piece = data[off:off + PIECE]
        if piece.count(0) == len(piece):
            continue
        src = tmp / "piece"
        src.write_bytes(piece)
        vm._qemu_io(disk, f"write -s {src} {off} {len(piece)}", f"wrote {len(piece)}/{len(piece)} bytes at offset {off}")
        vm.model[disk][off:off + len(piece)] = piece


def leftovers(directory: Path) -> list[str]:
    found = []
    mounts = Path("/proc/mounts").read_text()
    if str(directory) in mounts:
        found.append(f"mounts: {[ln for ln in mounts.splitlines() if str(directory) in ln]}")
    loops = sh("losetup", "--list", "--noheadings", "--output", "BACK-FILE")
    if "nbdbackup-mounts" in loops:
        found.append(f"loop devices: {loops}")
    ps = sh("ps", "-eo", "args")
    for prog in ("nbdfuse", "fusefat", "nbdkit"):
        if any(prog in ln and ("nbdbackup-mounts" in ln or str(directory) in ln) for ln in ps.splitlines()):
            found.append(f"{prog} still runs")
    return found


def test_mount_partitions_ext4_vfat_and_xfs_from_a_backup(vm_factory, repo, tmp_path):
    vm = vm_factory({"vda": DISK})
    vm.start()
    image, ext_files, fat_files, xfs_files = build_disk(tmp_path)
    write_into_vm(vm, "vda", image, tmp_path)
    name = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket).stdout.strip()
    vm.write("vda", EXT_AT, 1 * MiB, 0xEE)  # later guest writes do not reach the backup

    where = tmp_path / "mnt"
    where.mkdir()
    out = cli.run(repo, "mount", "vm1", str(where), "--to", name).stdout
    try:
        assert f"{where}/vda/p1\text4" in out and f"{where}/vda/p2\tvfat" in out and f"{where}/vda/p3\txfs" in out, out
        for files, part in ((ext_files, "p1"), (fat_files, "p2"), (xfs_files, "p3")):
            for rel, data in files.items():
                assert (where / "vda" / part / rel).read_bytes() == data, f"{part}/{rel}"
        # Read-only: nothing can be written.
        for part in ("p1", "p2", "p3"):
            try:
                (where / "vda" / part / "new.txt").write_text("x")
                raise AssertionError(f"{part} is writable")
            except OSError:
                pass
        # The directory is in use now: a second mount is refused (exit 14), the first keeps working.
        cli.run(repo, "mount", "vm1", str(where), "--to", name, expect=14)
        assert (where / "vda" / "p1" / "hello.txt").read_bytes() == ext_files["hello.txt"]
    finally:
        cli.run(repo, "umount", str(where))
    assert leftovers(where) == []
    assert list(where.iterdir()) == []
    cli.run(repo, "umount", str(where), expect=14)  # nothing mounted any more


def nbdkit_processes(repo) -> list[int]:
    """The nbdkit servers of repo (other tests' servers may run too)."""
    found = []
    for p in Path("/proc").iterdir():
        try:
            args = (p / "cmdline").read_bytes().split(b"\0") if p.name.isdigit() else []
        except OSError:
            continue
        if args and args[0].endswith(b"nbdkit") and f"repo={repo}".encode() in args:
            found.append(int(p.name))
    return found


def assert_key_hidden(repo, places: list[Path]) -> None:
    """The master key of an encrypted repository appears in no server's command line or environment,
    and in no file of places (logs, state): it reached nbdkit through a pipe only."""
    import base64

    from nbdbackup.config import load
    from nbdbackup.repository import Repository

    settings = load(None, str(repo))
    master = Repository.open(settings.repo, create=False, s3=settings.s3).cipher.master_key
    secrets = (master, master.hex().encode(), base64.b64encode(master))
    servers = nbdkit_processes(repo)
    assert servers, "no nbdkit runs"
    for pid in servers:
        for what in ("cmdline", "environ"):
            blob = Path(f"/proc/{pid}/{what}").read_bytes()
            assert not any(s in blob for s in secrets), f"the key is in nbdkit's {what}"
        assert b"keyfd=" in Path(f"/proc/{pid}/cmdline").read_bytes()
    for place in places:
        for f in (p for p in place.rglob("*") if p.is_file() and not p.name == "nbd"):
            assert not any(s in f.read_bytes() for s in secrets), f"the key is in {f}"


@pytest.mark.parametrize("any_repo", ["encrypted", "s3", "s3-encrypted"], indirect=True)
def test_mount_from_encrypted_and_s3_repositories(vm_factory, any_repo, tmp_path, request):
    from nbdbackup.mounting import state_dir

    repo = any_repo
    vm = vm_factory({"vda": SMALL_DISK})
    vm.start()
    image, ext_files, fat_files, _ = build_disk(tmp_path, xfs=False)
    write_into_vm(vm, "vda", image, tmp_path)
    name = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket).stdout.strip()

    where = tmp_path / "mnt"
    where.mkdir()
    out = cli.run(repo, "mount", "vm1", str(where), "--to", name).stdout
    try:
        assert f"{where}/vda/p1\text4" in out and f"{where}/vda/p2\tvfat" in out, out
        for files, part in ((ext_files, "p1"), (fat_files, "p2")):
            for rel, data in files.items():
                assert (where / "vda" / part / rel).read_bytes() == data, f"{part}/{rel}"
        if "NBDBACKUP_PASSWORD_FILE" in os.environ:  # an encrypted repository
            assert_key_hidden(repo, [state_dir(where)])
    finally:
        cli.run(repo, "umount", str(where))
    assert leftovers(where) == []
    assert list(where.iterdir()) == []
    if str(repo).startswith("s3://"):  # nbdkit released its lock when umount stopped it
        assert request.getfixturevalue("s3_repo").keys("repo/locks/") == []


def test_mount_bad_input(vm_factory, repo, tmp_path):
    vm = vm_factory({"vda": 1 * MiB})
    vm.start()
    vm.write("vda", 0, 64 * KiB, 0x11)
    name = cli.run(repo, "full", "vm1", "--qmp", vm.qmp_socket).stdout.strip()
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    cli.run(repo, "mount", "vm1", str(full), "--to", name, expect=14)
    cli.run(repo, "mount", "vm1", str(tmp_path / "missing"), "--to", name, expect=14)
    cli.run(repo, "mount", "vm1", str(full / "x"), "--to", name, expect=14)
    empty = tmp_path / "empty"
    empty.mkdir()
    cli.run(repo, "mount", "vm1", str(empty), "--to", "nosuch", expect=4)
    # Tools missing (a PATH without nbdkit, nbdfuse, partx ...): one line, exit 15, nothing done.
    env = {**cli.environment(), "PATH": "/nonexistent"}
    proc = subprocess.run(cli.command(repo, "mount", "vm1", str(empty), "--to", name), capture_output=True, text=True, env=env)
    assert proc.returncode == 15 and "is not installed" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = subprocess.run(cli.command(repo, "serve", "vm1", "--to", name), capture_output=True, text=True, env=env)
    assert proc.returncode == 15 and "nbdkit is not installed" in proc.stderr, proc.stderr
    assert leftovers(empty) == [] and list(empty.iterdir()) == []
    # A disk with no filesystem: nothing to mount, said on stderr; umount still cleans up.
    proc = cli.run(repo, "mount", "vm1", str(empty), "--to", name)
    assert "no filesystem" in proc.stderr
    cli.run(repo, "umount", str(empty))
    assert leftovers(empty) == [] and list(empty.iterdir()) == []
