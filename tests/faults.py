"""Fault injection for nbdbackup's integration tests.

Two halves:

* **In the nbdbackup process** (this file run as a script): ``python
  tests/faults.py --repo R full vm1 ...`` runs the real command line after
  installing one *pause point*, chosen by the environment:

      NBDB_FAULT_POINT  freeze | export | read | index | manifest | confirm | write | config
      NBDB_FAULT_AFTER  pause from the Nth time the point is reached (default 1)
      NBDB_FAULT_DIR    where the point announces itself and waits

  When the point is reached, the process writes ``$NBDB_FAULT_DIR/reached``
  and waits (every thread that reaches the point again waits too) until the
  test creates ``$NBDB_FAULT_DIR/go``. While it waits, the test inspects
  QEMU and the repository, then injects its fault: SIGKILL, SIGINT or
  SIGTERM to nbdbackup, SIGKILL to QEMU or to qemu-storage-daemon, an export
  deleted under the reader, ... The pause makes every stage deterministic;
  it changes no state (QEMU and the repository are exactly as a crash at
  that instant leaves them).

  | point    | where nbdbackup waits                                                       |
  |----------|-----------------------------------------------------------------------------|
  | freeze   | before the freeze transaction (pending record written, fleece nodes added)  |
  | export   | after the transaction, before nbd-server-start (checkpoint bitmap exists)   |
  | read     | before an NBD read of the backup's data (exports exist, no index yet)       |
  | index    | before writing a disk's index file (all of that disk was read)              |
  | manifest | before writing manifest.json (every index written and synced)               |
  | confirm  | after the manifest, before the checkpoint record is set to confirmed        |
  | write    | restore, rollback: before an NBD write into the qemu-storage-daemon export  |
  | config   | creating a repository: config.json's temporary file written, not yet published |

  Each point wraps one internal function (see _install). A refactoring that
  renames it makes the tests fail with "did not reach pause point", never pass
  without the fault.

* **In the test process**: :class:`Run` starts such a process, and helpers
  look at what a run left in QEMU and in the repository.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nbdbackup import names
from nbdbackup.names import BlockNames

THIS = Path(__file__).resolve()
PAUSE_LIMIT = 120.0  # seconds a paused run waits for "go" before it goes on by itself

POINTS = ("freeze", "export", "read", "index", "manifest", "confirm", "write", "config")


# ---------------------------------------------------------------------------
# The nbdbackup side: pause points
# ---------------------------------------------------------------------------


class _Pause:
    def __init__(self, point: str, after: int, where: Path) -> None:
        self.point, self.after, self.where = point, after, where
        self.count = 0
        self.lock = threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            self.count += 1
            if self.count < self.after:
                return
            reached = self.where / "reached"
            if not reached.exists():
                tmp = self.where / ".reached.tmp"
                tmp.write_text(f"{self.point} {os.getpid()} {threading.current_thread().name}\n")
                tmp.rename(reached)
        deadline = time.monotonic() + PAUSE_LIMIT
        go = self.where / "go"
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.005)


class _OsWith:
    """The os module, with some functions replaced."""

    def __init__(self, **functions: Any) -> None:
        self.__dict__.update(functions)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def _install(point: str, after: int, where: Path) -> None:
    """Wrap the one function where `point` lies so that it waits first."""
    from nbdbackup.checkpoints import Checkpoints
    from nbdbackup.nbdio import NbdEndpoint
    from nbdbackup.qmp import QMPSession
    from nbdbackup.repository.backend import LocalBackend

    pause = _Pause(point, after, where)

    def wrap(cls: type, name: str, when: Any) -> None:
        original = getattr(cls, name)

        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if when(*args, **kwargs):
                pause()
            return original(self, *args, **kwargs)

        setattr(cls, name, wrapper)

    if point == "freeze":
        wrap(QMPSession, "transaction", lambda actions, *a, **k: any(t == "blockdev-backup" for t, _ in list(actions)))
    elif point == "export":
        wrap(QMPSession, "execute", lambda command, *a, **k: command == "nbd-server-start")
    elif point == "read":
        wrap(NbdEndpoint, "pread", lambda *a, **k: True)
        wrap(NbdEndpoint, "read_into", lambda *a, **k: True)
    elif point == "index":
        wrap(LocalBackend, "write", lambda key, *a, **k: key.endswith(".index"))
    elif point == "manifest":
        wrap(LocalBackend, "write", lambda key, *a, **k: key.endswith("/manifest.json"))
    elif point == "confirm":
        wrap(Checkpoints, "confirm", lambda *a, **k: True)
    elif point == "write":
        from nbdbackup.rawimage import RawImage

        wrap(NbdEndpoint, "pwrite", lambda *a, **k: True)
        wrap(NbdEndpoint, "write_batch", lambda *a, **k: True)
        wrap(RawImage, "write", lambda *a, **k: True)  # restore to raw writes the file itself
    elif point == "config":
        # config.json is written to a temporary file, then published by rename or by link:
        # wait before either.
        import nbdbackup.repository.backend as backend

        def publishing(real: Any) -> Any:
            def publish(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
                if str(dst).endswith("/config.json"):
                    pause()
                return real(src, dst, *args, **kwargs)

            return publish

        backend.os = _OsWith(replace=publishing(os.replace), link=publishing(os.link))  # type: ignore[attr-defined]
    else:
        raise SystemExit(f"faults.py: unknown pause point {point!r}; known: {', '.join(POINTS)}")


def main(argv: list[str]) -> None:
    point = os.environ.get("NBDB_FAULT_POINT", "")
    if point:
        _install(point, int(os.environ.get("NBDB_FAULT_AFTER", "1")), Path(os.environ["NBDB_FAULT_DIR"]))
    from nbdbackup.cli import main as nbdbackup_main

    nbdbackup_main(argv)


# ---------------------------------------------------------------------------
# The test side
# ---------------------------------------------------------------------------

KiB, MiB = 1024, 1024 * 1024


def environment(**extra: str) -> dict[str, str]:
    import cli

    env = cli.environment()
    env.update(extra)
    return env


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return f"exit {self.returncode}\nstdout: {self.stdout}\nstderr: {self.stderr}"


class Run:
    """One nbdbackup process, optionally pausing at a point (see the module docstring).

    A context manager: on exit a process still alive is SIGKILLed, and so is
    every qemu-storage-daemon it started.
    """

    def __init__(self, repo: Path, *args: Any, pause: str | None = None, after: int = 1) -> None:
        self.args = [str(a) for a in args]
        self.pause = pause
        self.dir = Path(tempfile.mkdtemp(prefix="nbdb-fault-"))
        env = environment()
        # nbdbackup's private socket directories go below this run's own directory, which is
        # removed afterwards: a killed run cannot remove its own.
        (self.dir / "tmp").mkdir()
        env["TMPDIR"] = str(self.dir / "tmp")
        env.pop("XDG_RUNTIME_DIR", None)
        if pause:
            env.update(NBDB_FAULT_POINT=pause, NBDB_FAULT_AFTER=str(after), NBDB_FAULT_DIR=str(self.dir))
        self._out = open(self.dir / "stdout", "w+")
        self._err = open(self.dir / "stderr", "w+")
        self.proc = subprocess.Popen([sys.executable, str(THIS), "--repo", str(repo), *self.args],
                                     stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err, env=env)
        self.children: set[int] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _output(self) -> tuple[str, str]:
        self._out.flush()
        self._err.flush()
        return (self.dir / "stdout").read_text(), (self.dir / "stderr").read_text()

    def wait_paused(self, timeout: float = 60.0) -> str:
        """Wait until the process reached its pause point; fail if it exits first."""
        assert self.pause, "this run has no pause point"
        reached = self.dir / "reached"
        deadline = time.monotonic() + timeout
        while not reached.exists():
            if self.proc.poll() is not None:
                out, err = self._output()
                raise AssertionError(f"nbdbackup {' '.join(self.args)} exited {self.proc.returncode} "
                                     f"before reaching pause point {self.pause!r}\nstdout: {out}\nstderr: {err}")
            if time.monotonic() > deadline:
                raise AssertionError(f"nbdbackup {' '.join(self.args)} did not reach pause point {self.pause!r} in {timeout}s")
            time.sleep(0.005)
        self.children |= set(child_pids(self.pid))
        return reached.read_text()

    def release(self) -> None:
        (self.dir / "go").touch()

    def signal(self, signum: int) -> None:
        self.children |= set(child_pids(self.pid))
        os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL nbdbackup (as an OOM kill or `kill -9` would) and reap it."""
        self.signal(signal.SIGKILL)
        self.proc.wait(30)

    def finish(self, timeout: float = 120.0) -> Result:
        """Let a paused run go on; wait for its end."""
        self.release()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self._output()
            raise AssertionError(f"nbdbackup {' '.join(self.args)} did not finish within {timeout}s\nstderr: {err}") from None
        out, err = self._output()
        return Result(rc, out, err)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill()
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._out.close()
        self._err.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


def assert_one_line_error(result: Result, expect: int | None = None) -> str:
    """A failed run: the expected status, one error line, no traceback; returns that line."""
    assert result.returncode != 0, result.describe()
    if expect is not None:
        assert result.returncode == expect, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.describe()
    return errors[0]


# -- QEMU state ---------------------------------------------------------------


def qemu_leftovers(vm: Any) -> dict[str, list[Any]]:
    """What a backup may leave in QEMU: its exports, jobs, nodes and temporary bitmaps."""
    state = vm.block_state()
    return {
        "exports": sorted(e["id"] for e in state["exports"]),
        "jobs": sorted(j["device"] for j in state["jobs"]),
        "nodes": sorted(n for n in state["nodes"] if n.startswith("nbdbackup")),
        # a job's own bitmap has no name; nbdbackup's temporary ones are named nbdbackup-...
        "temporary bitmaps": sorted((node, b.get("name", "<unnamed>")) for node, bitmaps in state["bitmaps"].items()
                                    for b in bitmaps if b.get("name", "nbdbackup-").startswith("nbdbackup-")),
    }


# Where a paused run stops: "read" at the second read (the first one's chunk may be stored),
# "index" before the second disk's index (the first disk's index is written); other points: the first.
AFTER = {"index": 2, "read": 2}

NOTHING_LEFT = {"exports": [], "jobs": [], "nodes": [], "temporary bitmaps": []}


def all_bitmaps(vm: Any) -> dict[str, list[tuple[str, bool, bool, int]]]:
    """Every bitmap on every disk, twin included: (name, recording, persistent, dirty bytes), sorted."""
    return {d: sorted((b.get("name", "<unnamed>"), b["recording"], b["persistent"], b["count"]) for b in vm.bitmaps(d))
            for d in vm.disks}


def bitmap_state(vm: Any) -> dict[str, list[tuple[str, bool, bool]]]:
    """Every named checkpoint bitmap on every disk: (name, recording, persistent), sorted.
    The active bitmap's twin (nbdbackup.<ns>.@twin) is left out: twin_state() shows it."""
    return {d: sorted((b.get("name", "<unnamed>"), b["recording"], b["persistent"]) for b in vm.bitmaps(d)
                      if not b.get("name", "").endswith(".@twin")) for d in vm.disks}


def twin_state(vm: Any) -> dict[str, list[tuple[bool, bool, int]]]:
    """The twin bitmap on every disk: (recording, persistent, dirty bytes)."""
    return {d: [(b["recording"], b["persistent"], b["count"]) for b in vm.bitmaps(d) if b.get("name", "").endswith(".@twin")]
            for d in vm.disks}


def snapshot(vm: Any) -> dict[str, bytes]:
    return {d: vm.expected(d) for d in vm.disks}


def resize(vm: Any, disk: str, size: int) -> None:
    """block_resize a disk through the harness monitor and follow it in the harness's model."""
    vm.qmp("block_resize", **{"node-name": vm.disks[disk].node, "size": size})
    vm.disks[disk] = dataclasses.replace(vm.disks[disk], size=size)
    model = vm.model[disk]
    if size < len(model):
        del model[size:]
    else:
        model.extend(bytes(size - len(model)))


def write_data(vm: Any, disk: str, offset: int, data: bytes) -> None:
    """Write arbitrary (e.g. incompressible) bytes like the guest would, and model them.

    The harness only writes patterns; qemu-io's ``write -s FILE`` takes the
    bytes from a file. The harness's own qemu-io runner waits for the
    confirmation line.
    """
    with tempfile.NamedTemporaryFile(prefix="nbdb-data-", dir=vm.workdir) as f:
        f.write(data)
        f.flush()
        n = len(data)
        with vm._lock:
            vm._qemu_io(disk, f"write -s {f.name} {offset} {n}", f"wrote {n}/{n} bytes at offset {offset}")
            vm.model[disk][offset:offset + n] = data


# -- repository state -----------------------------------------------------------


def backups(repo: Path, vm: str = "vm1") -> list[str]:
    """Checkpoint names of the backups `nbdbackup list` shows."""
    import cli

    return [b["checkpoint"] for b in json.loads(cli.run(repo, "list", vm, "--json").stdout)]


def records(repo: Path, vm: str = "vm1") -> list[dict[str, Any]]:
    path = repo / "vms" / vm / "checkpoints.json"
    return json.loads(path.read_text())["checkpoints"] if path.exists() else []


def reseal(doc: dict[str, Any]) -> bytes:
    """A JSON document with a valid seal (docs/FORMAT.md, Seals), as nbdbackup writes it."""
    import hashlib

    body = {k: v for k, v in doc.items() if k != "sha256"}
    body["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"


def partial_backups(repo: Path, vm: str = "vm1") -> list[str]:
    """Backup folders without a manifest."""
    base = repo / "vms" / vm / "backups"
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not (p / "manifest.json").exists()) if base.is_dir() else []


def scratch_left(repo: Path) -> list[str]:
    base = repo / "tmp"
    return sorted(str(p.relative_to(base)) for p in base.rglob("*")) if base.is_dir() else []


def manifest(repo: Path, checkpoint: str, vm: str = "vm1") -> dict[str, Any]:
    return json.loads((repo / "vms" / vm / "backups" / checkpoint / "manifest.json").read_text())


def assert_restores(repo: Path, vm: Any, checkpoint: str, expected: dict[str, bytes], out: Path) -> None:
    """Restore every disk of a backup and compare each byte with `expected` (disk id -> content)."""
    import cli
    from harness import assert_image_equals

    cli.run(repo, "restore", vm.name, "--to", checkpoint, "--output", out)
    got = sorted(p.name for p in out.iterdir())
    assert got == sorted(f"{d}.qcow2" for d in expected), f"restore of {checkpoint} wrote {got}, expected disks {sorted(expected)}"
    for disk, content in expected.items():
        assert_image_equals(out / f"{disk}.qcow2", content, "qcow2")


def backup(repo: Path, vm: Any, kind: str, *args: Any) -> str:
    import cli

    return cli.run(repo, kind, vm.name, "--qmp", vm.qmp_socket, *args).stdout.strip()


def assert_recovers(repo: Path, vm: Any, out: Path, kind: str = "incremental") -> str:
    """The next run succeeds, restores exactly what the guest wrote, and leaves nothing behind
    in QEMU or in the scratch directory. (Tests check for backup folders without a manifest
    with assert_no_partial_backups, last.)"""
    name = backup(repo, vm, kind)
    assert_restores(repo, vm, name, snapshot(vm), out)
    left = qemu_leftovers(vm)
    assert left == NOTHING_LEFT, f"the run after a fault left this in QEMU: {left}"
    assert scratch_left(repo) == [], f"scratch files left: {scratch_left(repo)}"
    return name


def assert_no_partial_backups(repo: Path, vm: str = "vm1") -> None:
    left = partial_backups(repo, vm)
    base = repo / "vms" / vm / "backups"
    assert left == [], ("backup folders without a manifest are left in the repository: "
                        + "; ".join(f"{name}/ holds {sorted(p.name for p in (base / name).iterdir())}" for name in left))


# -- a small filesystem for the repository ------------------------------------------


@contextlib.contextmanager
def small_filesystem(path: Path, size_mib: int) -> Iterator[Path]:
    """A tmpfs of `size_mib` MiB mounted at path (needs CAP_SYS_ADMIN); unmounted on exit."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"this test needs to mount a small tmpfs as the repository and cannot "
                             f"(run the suite as root or with CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def grow_filesystem(path: Path, size_mib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_mib}m", str(path)], check=True, capture_output=True)


def remount(path: Path, mode: str) -> None:
    """mode: "ro" or "rw"."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


if __name__ == "__main__":
    main(sys.argv[1:])


def block_names(repo: Path) -> BlockNames:
    """The names of the nodes, jobs and exports the repository's backups create."""
    return BlockNames(names.block_namespace(json.loads((repo / "config.json").read_text())["id"]))


SIZES = {"vda": 8 * MiB, "vdb": 4 * MiB + 512}  # vdb ends inside a bitmap granule


def prepare(vm_factory: Any, repo: Path) -> tuple[Any, dict[str, bytes]]:
    """A VM with a full backup "one", and changes on both disks for the next incremental:
    in both 4 MiB chunk windows of vda, more than one chunk holds (two reads: an incremental packs
    small changed ranges into one chunk) and on vdb.  Returns (vm, content at one)."""
    vm = vm_factory(SIZES)
    vm.start()
    vm.write("vda", 0, 1 * MiB, 0x11)
    vm.write("vda", 4 * MiB, 64 * KiB, 0x12)
    vm.write("vdb", 0, 512 * KiB, 0x21)
    backup(repo, vm, "full", "--checkpoint", "one")
    at_one = snapshot(vm)
    vm.write("vda", 64 * KiB, 4 * MiB - 64 * KiB, 0x13)
    vm.write("vda", 5 * MiB, 128 * KiB, 0x14)
    vm.write("vdb", 1 * MiB, 64 * KiB, 0x22)
    return vm, at_one
