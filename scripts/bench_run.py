"""nbdbackup benchmark: nbdbackup against nbdcopy + zstd, timed in the same run on the same data.

    scripts/bench [--size 4G] [--data 2G] [--repeat N] [--json] [--sparse-size 64G,...]

Steps (see --help): build (or reuse) a qcow2 image with a realistic mix of data; start a
paused QEMU with it; time a reference full copy (the disk exported read-only over NBD by
the VM, `nbdcopy | zstd -3 -T2`), then `nbdbackup full`; the reference restore
(`zstd -d | nbdcopy` into a new qcow2 served by qemu-storage-daemon), then `nbdbackup
restore`; write 1% of the disk through the guest's device and time `nbdbackup incremental`
and the restore of that point; shut the VM down and time `nbdbackup rollback` to the full point
against the restore of that point (--rollback-only: just that, after a full backup and the
guest writes); check every restore byte for byte; optionally the same on large sparse disks. Prints a table (or JSON with --json) on stdout, progress on stderr.
`scripts/bench commit` instead measures the commit's sync with other dirty data pending
(scripts/bench_commit.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import build_in_subprocess, human, log, parse_size  # noqa: E402
from bench_qemu import VM, NbdExport, StorageDaemon, Timed, reap_all, run_pipeline, run_timed  # noqa: E402

TOP = Path(__file__).resolve().parent.parent
NBDBACKUP = TOP / ".venv" / "bin" / "nbdbackup"
PYTHON = TOP / ".venv" / "bin" / "python"
# How nbdbackup is run: the work tree's entry point, or (--rev) `python -m nbdbackup` on an exported revision.
NB_PREFIX: list[str] = [str(NBDBACKUP)]
NB_ENV: dict[str, str] | None = None
NB_CWD: Path | None = None  # `python -m` puts the current directory first on sys.path
NB_SOURCE = "work tree"
ZSTD_LEVEL = 3  # the reference's zstd level (zstd's own default)
ZSTD_THREADS = 2
FULL_RATIO_TARGET = 0.7
RESTORE_RATIO_TARGET = 0.7
SERVE_RATIO_TARGET = 1.5  # nbdcopy of a served disk, time, against restore of the same point
INCR_TARGET_PCT = 5.0
ROLLBACK_TARGET_PCT = 10.0
ROLLBACK_RSS_TARGET_KIB = 256 * 1024


class BenchError(RuntimeError):
    pass


class Interrupted(BaseException):
    """SIGTERM: unwind like Ctrl-C, so every finally (VM, daemons, run files) runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Row:
    step: str
    seconds: float
    virtual_bytes: int
    ratio: float | None = None
    ratio_text: str = ""
    rss_kib: int | None = None
    read_bytes: int | None = None
    stored_bytes: int | None = None
    all_seconds: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    cpu_seconds: float | None = None  # process tree + QEMU (best of the repetitions)
    cpu_ratio_text: str = ""

    @property
    def mbps(self) -> float:
        return self.virtual_bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


@dataclass
class Report:
    machine: dict[str, str]
    config: dict[str, Any]
    images: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    total_seconds: float = 0.0


# -- helpers -------------------------------------------------------------------------


def sh(argv: list[str], what: str) -> str:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"{what} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-1000:]}")
    return proc.stdout


def first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def use_revision(rev: str, into: Path) -> None:
    """Run nbdbackup from `git archive REV` (read-only on the repository), not from the work tree."""
    global NB_PREFIX, NB_ENV, NB_SOURCE, NB_CWD
    sha = sh(["git", "-C", str(TOP), "rev-parse", "--short", f"{rev}^{{commit}}"], f"git rev-parse {rev}").strip()
    archive = subprocess.Popen(["git", "-C", str(TOP), "archive", sha, "nbdbackup"], stdout=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout)
    if archive.wait() != 0 or tar.returncode != 0:
        raise BenchError(f"cannot export nbdbackup at {rev}")
    subprocess.run([str(PYTHON), "-m", "compileall", "-q", str(into / "nbdbackup")], stdout=subprocess.DEVNULL, check=False)  # as installed
    NB_PREFIX = [str(PYTHON), "-m", "nbdbackup"]
    NB_ENV = {**os.environ, "PYTHONPATH": str(into)}
    NB_CWD = into
    where = subprocess.run([str(PYTHON), "-c", "import nbdbackup; print(nbdbackup.__file__)"], capture_output=True,
                           text=True, env=NB_ENV, cwd=NB_CWD).stdout.strip()
    if not where.startswith(str(into)):
        raise BenchError(f"the exported nbdbackup is not the one imported ({where or 'import failed'})")
    NB_SOURCE = f"git {rev} ({sha}), exported"


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nbd = subprocess.run(["nbdcopy", "--version"], capture_output=True, text=True).stdout.split("\n")
    libnbd = next((line for line in nbd if line.startswith("libnbd")), "unknown")
    rev = subprocess.run(["git", "-C", str(TOP), "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    version = subprocess.run([*NB_PREFIX, "--version"], capture_output=True, text=True, env=NB_ENV, cwd=NB_CWD).stdout.strip()
    source = NB_SOURCE if NB_ENV is not None else f"work tree, git {rev}"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "qemu": first_line(["qemu-system-x86_64", "--version"]),
        "libnbd": libnbd,
        "nbdcopy": nbd[0] if nbd else "unknown",
        "zstd": first_line(["zstd", "--version"]).strip("* ").split(", by")[0],
        "python": platform.python_version(),
        "nbdbackup": f"{version or 'unknown version'} ({source})",
        "loadavg_start": loadavg(),
    }


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and its reaped descendants)."""
    hz = os.sysconf("SC_CLK_TCK")
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:3]) + sum(fields[5:8])  # user nice system (not idle iowait) irq softirq steal
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        own += r.ru_utime + r.ru_stime
    return busy / hz, own


def disk_usage(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def compare(a: Path, b: Path, what: str, report: Report, force_share: bool = False) -> bool:
    argv = ["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2"]
    if force_share:
        argv.append("-U")
    t0 = time.monotonic()
    proc = subprocess.run(argv + [str(a), str(b)], capture_output=True, text=True)
    ok = proc.returncode == 0
    detail = "identical" if ok else (proc.stdout + proc.stderr).strip() or f"exit {proc.returncode}"
    report.checks.append({"check": what, "ok": ok, "detail": detail, "seconds": round(time.monotonic() - t0, 1)})
    log(f"check {what}: {'OK' if ok else 'FAILED: ' + detail}")
    return ok


def new_qcow2(path: Path, size: int) -> None:
    path.unlink(missing_ok=True)
    sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(path), str(size)], "qemu-img create")


def best(runs: list[Timed]) -> Timed:
    return min(runs, key=lambda t: t.seconds)


def sync() -> None:
    """Untimed: flush earlier writes so no measurement pays for another's writeback."""
    os.sync()


class Nbdbackup:
    def __init__(self, repo: Path, config: Path) -> None:
        self.repo, self.config = repo, config

    def argv(self, *args: str) -> list[str]:
        return [*NB_PREFIX, "--repo", str(self.repo), "--config", str(self.config), *args]

    def run(self, *args: str) -> Timed:
        sync()
        t = run_timed(self.argv(*args), env=NB_ENV, cwd=NB_CWD)
        if not t.ok:
            raise BenchError(f"nbdbackup {' '.join(args)} failed (exit {t.returncodes[0]}): {t.stderr.strip()[-1500:]}")
        if t.stderr.strip():
            log(f"nbdbackup {args[0]} said on stderr: {t.stderr.strip()[-500:]}")
        return t

    def backups(self, vm: str) -> dict[str, dict]:
        proc = subprocess.run(self.argv("list", vm, "--json"), capture_output=True, text=True, env=NB_ENV, cwd=NB_CWD)
        if proc.returncode != 0:
            raise BenchError(f"nbdbackup list failed: {proc.stderr.strip()[-500:]}")
        out = proc.stdout
        return {b["checkpoint"]: b for b in json.loads(out)}


# -- measurements ---------------------------------------------------------------------


def reference_full(vm: VM, sockdir: Path, out: Path, request_size: int) -> Timed:
    """Export the paused VM's qcow2 node read-only over NBD; nbdcopy | zstd; fsync; unexport."""
    sock = sockdir / "ref-full.sock"
    out.unlink(missing_ok=True)
    sync()
    t0 = time.monotonic()
    with NbdExport(vm, sock, "vda"):
        t = run_pipeline(
            ["nbdcopy", f"--request-size={request_size}", f"nbd+unix:///vda?socket={sock}", "-"],
            ["zstd", f"-{ZSTD_LEVEL}", f"-T{ZSTD_THREADS}", "-q", "-f", "-o", str(out)],
        )
        if t.ok:
            fd = os.open(out, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    total = time.monotonic() - t0
    if not t.ok:
        raise BenchError(f"reference nbdcopy | zstd failed {t.returncodes}: {t.stderr.strip()[-1000:]}")
    t.extra = {"pipeline_seconds": t.seconds}
    t.seconds = total
    return t


def reference_restore(archive: Path, target: Path, size: int, sockdir: Path, request_size: int) -> Timed:
    """New qcow2, qemu-storage-daemon writable export, zstd -d | nbdcopy, daemon stop (flush)."""
    sock = sockdir / "ref-restore.sock"
    sync()
    t0 = time.monotonic()
    new_qcow2(target, size)
    with StorageDaemon(target, sock, "t"):
        t = run_pipeline(
            ["zstd", "-d", "-c", "-q", str(archive)],
            ["nbdcopy", f"--request-size={request_size}", "-", f"nbd+unix:///t?socket={sock}"],
        )
    total = time.monotonic() - t0
    if not t.ok:
        raise BenchError(f"reference zstd -d | nbdcopy failed {t.returncodes}: {t.stderr.strip()[-1000:]}")
    t.extra = {"pipeline_seconds": t.seconds}
    t.seconds = total
    return t


def remove_bitmaps(vm: VM) -> None:
    """Between repeated full backups (each into a fresh repository): drop the previous run's bitmaps."""
    assert vm.mon is not None
    for node in vm.mon.cmd("query-named-block-nodes", flat=True):
        if node["node-name"] == VM.NODE:
            for b in node.get("dirty-bitmaps", []):
                if "name" in b:
                    vm.mon.cmd("block-dirty-bitmap-remove", node=VM.NODE, name=b["name"])


def guest_writes(vm: VM, size: int, percent: float, seed: int) -> tuple[int, int, int, float]:
    """Scattered 64 KiB..1 MiB writes totalling `percent` of the disk; (count, bytes, dirty 64K-granules bytes, s)."""
    rng = random.Random(seed)
    want = int(size * percent / 100)
    total = count = 0
    granules: set[int] = set()
    t0 = time.monotonic()
    while total < want:
        length = min(rng.randrange(64 * 1024, 1024 * 1024 + 1, 4096), max(4096, (want - total + 4095) // 4096 * 4096))
        length = min(length, size)
        offset = rng.randrange(0, size - length + 1, 4096) if size > length else 0
        vm.write(offset, length, rng.randrange(1, 256))
        granules.update(range(offset // 65536, (offset + length + 65535) // 65536))
        total += length
        count += 1
    return count, total, len(granules) * 65536, time.monotonic() - t0


def rss(t: Timed) -> int:
    """Peak RSS of the measured process itself (polled VmHWM; see STANDARD_NOTES)."""
    return t.hwm_kib[0]


def main_case(args: argparse.Namespace, report: Report, rundir: Path, sockdir: Path, config: Path) -> None:
    size, repeat = args.size, args.repeat
    image = build_in_subprocess(args.workdir, size, args.data, seed=args.seed)
    report.images["main"] = {"path": str(image.path), **image.stats}
    disk = rundir / "vm1-vda.qcow2"
    log(f"copying the image to {disk}")
    sh(["cp", "--sparse=never", str(image.path), str(disk)], "cp")
    virtual = size
    vm = VM(disk, rundir, sockdir)
    vm.start()
    try:
        # a/b. full backup and its reference, interleaved (reference first: QEMU allows one NBD server).
        # CPU = the command's process tree (wait4) + QEMU's own CPU during the step (/proc), so that
        # the NBD server's work is charged to whoever makes QEMU do it.
        archive = rundir / "ref.zst"
        refs, fulls, cp_full, nb = [], [], "", Nbdbackup(rundir / "repo", config)
        for i in range(repeat):
            log(f"reference full: nbdcopy | zstd -{ZSTD_LEVEL} -T{ZSTD_THREADS} ({i + 1}/{repeat})")
            q0 = vm.cpu_seconds()
            refs.append(reference_full(vm, sockdir, archive, args.request_size))
            refs[-1].extra["qemu_cpu"] = vm.cpu_seconds() - q0
            log(f"  {refs[-1].seconds:.2f}s, CPU {sum(refs[-1].cpu):.2f}s + QEMU {refs[-1].extra['qemu_cpu']:.2f}s")
            if i:
                shutil.rmtree(nb.repo)
                remove_bitmaps(vm)
            log(f"nbdbackup full ({i + 1}/{repeat})")
            q0 = vm.cpu_seconds()
            t = nb.run("full", "vm1", "--qmp", str(vm.tool_qmp))
            qemu_cpu = vm.cpu_seconds() - q0
            cp_full = t.stdout.strip().splitlines()[-1]
            t.extra = {**nb.backups("vm1")[cp_full], "qemu_cpu": qemu_cpu}
            fulls.append(t)
            log(f"  {t.seconds:.2f}s, CPU {sum(t.cpu):.2f}s + QEMU {qemu_cpu:.2f}s, checkpoint {cp_full}")
        ref = best(refs)
        ref_cpu = min(sum(r.cpu) + r.extra["qemu_cpu"] for r in refs)
        ref_full = Row("full: nbdcopy | zstd (reference)", ref.seconds, virtual, 1.0, "1.00 (ref)", rss_kib=sum(ref.hwm_kib),
                       stored_bytes=os.path.getsize(archive), all_seconds=[r.seconds for r in refs],
                       extra={"pipeline_seconds": ref.extra["pipeline_seconds"], "hwm_kib_nbdcopy_zstd": ref.hwm_kib, "ru_maxrss_kib_nbdcopy_zstd": ref.maxrss_kib,
                              "cpu_tree": [sum(r.cpu) for r in refs], "cpu_qemu": [r.extra["qemu_cpu"] for r in refs]},
                       cpu_seconds=ref_cpu, cpu_ratio_text="1.00 (ref)")
        report.rows.append(ref_full)
        full = best(fulls)
        info = full.extra
        full_cpu = min(sum(t.cpu) + t.extra["qemu_cpu"] for t in fulls)
        ratio = (virtual / full.seconds) / (virtual / ref.seconds)
        report.rows.append(Row("full: nbdbackup full", full.seconds, virtual, ratio, f"{ratio:.2f}", rss(full),
                               info["read_bytes"], info["stored_bytes"], [t.seconds for t in fulls],
                               {"ru_maxrss_kib_tree": full.maxrss_kib[0], "cpu_tree": [sum(t.cpu) for t in fulls],
                                "cpu_qemu": [t.extra["qemu_cpu"] for t in fulls]},
                               cpu_seconds=full_cpu, cpu_ratio_text=f"{full_cpu / ref_cpu:.2f}x ref CPU"))
        report.targets.append({"target": f"full throughput >= {FULL_RATIO_TARGET} x reference", "value": round(ratio, 3),
                               "met": ratio >= FULL_RATIO_TARGET})
        if args.full_only:
            report.notes.append(f"--full-only: nbdbackup stored {human(info['stored_bytes'])}, zstd -{ZSTD_LEVEL} archive "
                                f"{human(os.path.getsize(archive))}; restore and incremental not measured")
            return
        report.notes.append(f"full backup of {human(virtual)}: nbdbackup stored {human(info['stored_bytes'])}, "
                            f"zstd -{ZSTD_LEVEL} archive {human(os.path.getsize(archive))}; "
                            f"repository on disk {human(dir_usage(nb.repo))}")

        # d. restore of the full point, and its reference
        ref_rs = []
        for i in range(repeat):
            target = rundir / "ref-restore.qcow2"
            log(f"reference restore: zstd -d | nbdcopy into qemu-storage-daemon ({i + 1}/{repeat})")
            ref_rs.append(reference_restore(archive, target, size, sockdir, args.request_size))
            ref_rs[-1].extra["usage"] = disk_usage(target)
            log(f"  {ref_rs[-1].seconds:.2f}s")
        ref_r = best(ref_rs)
        report.rows.append(Row("restore: zstd -d | nbdcopy (reference)", ref_r.seconds, virtual, 1.0, "1.00 (ref)",
                               sum(ref_r.hwm_kib), None, ref_r.extra["usage"], [r.seconds for r in ref_rs],
                               {"pipeline_seconds": ref_r.extra["pipeline_seconds"], "hwm_kib_zstd_nbdcopy": ref_r.hwm_kib, "ru_maxrss_kib_zstd_nbdcopy": ref_r.maxrss_kib},
                               cpu_seconds=min(sum(r.cpu) for r in ref_rs), cpu_ratio_text="(zstd+nbdcopy only)"))
        compare(rundir / "ref-restore.qcow2", image.path, "reference restore == source image", report)
        (rundir / "ref-restore.qcow2").unlink()
        # context only: what decompressing the archive alone costs (no NBD, no image writes)
        floors = []
        for _ in range(repeat):
            sync()
            floors.append(run_timed(["zstd", "-d", "-q", "-f", "-o", "/dev/null", str(archive)]))
            if not floors[-1].ok:
                raise BenchError(f"zstd -d failed: {floors[-1].stderr.strip()[-500:]}")
        fl = best(floors)
        report.rows.append(Row("restore floor: zstd -d > /dev/null (info)", fl.seconds, virtual, None,
                               f"{fl.seconds / ref_r.seconds:.2f}x ref time", rss(fl), None, None,
                               [t.seconds for t in floors]))

        restores = []
        out_full = rundir / "restore-full"
        for i in range(repeat):
            shutil.rmtree(out_full, ignore_errors=True)
            log(f"nbdbackup restore --to {cp_full} ({i + 1}/{repeat})")
            restores.append(nb.run("restore", "vm1", "--to", cp_full, "--output", str(out_full)))
            log(f"  {restores[-1].seconds:.2f}s")
        rs = best(restores)
        restore_full = rs
        ratio = (virtual / rs.seconds) / (virtual / ref_r.seconds)
        report.rows.append(Row("restore: nbdbackup restore (full point)", rs.seconds, virtual, ratio, f"{ratio:.2f}", rss(rs),
                               None, disk_usage(out_full / "vda.qcow2"), [t.seconds for t in restores],
                               {"ru_maxrss_kib_tree": rs.maxrss_kib[0]}, cpu_seconds=min(sum(t.cpu) for t in restores),
                               cpu_ratio_text="(with its qemu-storage-daemon)"))
        report.targets.append({"target": f"restore throughput >= {RESTORE_RATIO_TARGET} x reference", "value": round(ratio, 3),
                               "met": ratio >= RESTORE_RATIO_TARGET})
        compare(out_full / "vda.qcow2", image.path, "nbdbackup restore of the full point == source image", report)
        shutil.rmtree(out_full)
        archive.unlink()

        # c. 1% guest writes, incremental
        log(f"guest writes: {args.incr_percent}% of the disk in 64 KiB..1 MiB writes through the device")
        n, written, dirty, secs = guest_writes(vm, size, args.incr_percent, args.seed + 1)
        log(f"  {n} writes, {human(written)} ({human(dirty)} of 64 KiB granules) in {secs:.1f}s")
        incs = []
        for i in range(repeat):
            extra = ["--since", cp_full] if i else []
            log(f"nbdbackup incremental ({i + 1}/{repeat})")
            q0 = vm.cpu_seconds()
            t = nb.run("incremental", "vm1", "--qmp", str(vm.tool_qmp), *extra)
            qemu_cpu = vm.cpu_seconds() - q0
            cp = t.stdout.strip().splitlines()[-1]
            t.extra = {**nb.backups("vm1")[cp], "qemu_cpu": qemu_cpu}
            incs.append(t)
            log(f"  {t.seconds:.2f}s, checkpoint {cp}")
        inc = best(incs)
        info = inc.extra
        pct = 100 * inc.seconds / full.seconds
        report.rows.append(Row(f"incremental: nbdbackup ({args.incr_percent:g}% written)", inc.seconds, virtual, pct / 100,
                               f"{pct:.1f}% of full", rss(inc), info["read_bytes"], info["stored_bytes"],
                               [t.seconds for t in incs],
                               {"writes": n, "written_bytes": written, "dirty_granule_bytes": dirty, "ru_maxrss_kib_tree": inc.maxrss_kib[0],
                                "all_cpu": [sum(t.cpu) + t.extra["qemu_cpu"] for t in incs]},
                               cpu_seconds=min(sum(t.cpu) + t.extra["qemu_cpu"] for t in incs)))
        report.targets.append({"target": f"incremental time <= {INCR_TARGET_PCT}% of full", "value": round(pct, 2),
                               "met": pct <= INCR_TARGET_PCT})
        report.notes.append(f"incremental: {n} guest writes of {human(written)} touch {human(dirty)} of 64 KiB bitmap "
                            f"granules; nbdbackup read {human(info['read_bytes'])}")

        out_inc = rundir / "restore-incr"
        restores = []
        for i in range(repeat):
            shutil.rmtree(out_inc, ignore_errors=True)
            log(f"nbdbackup restore --to latest (incremental point) ({i + 1}/{repeat})")
            restores.append(nb.run("restore", "vm1", "--to", "latest", "--output", str(out_inc)))
            log(f"  {restores[-1].seconds:.2f}s")
        rs = best(restores)
        ratio = (virtual / rs.seconds) / (virtual / ref_r.seconds)
        report.rows.append(Row("restore: nbdbackup restore (incremental point)", rs.seconds, virtual, ratio,
                               f"{ratio:.2f}", rss(rs), None, disk_usage(out_inc / "vda.qcow2"),
                               [t.seconds for t in restores], {"ru_maxrss_kib_tree": rs.maxrss_kib[0]},
                               cpu_seconds=min(sum(t.cpu) for t in restores)))
        serve_case(nb, report, virtual, rs, repeat)
    finally:
        vm.quit()
    compare(out_inc / "vda.qcow2", disk, "nbdbackup restore of the incremental point == disk after the writes", report)
    recover_case(nb, report, virtual, rs, rundir, sockdir, out_inc / "vda.qcow2")
    shutil.rmtree(out_inc)

    # e. the VM shut down: roll its own image back to the full point (what changed since: the 1% writes)
    rollback_step(nb, report, args, disk, image.path, cp_full, restore_full)


def rollback_step(nb: Nbdbackup, report: Report, args: argparse.Namespace, disk: Path, source: Path, cp_full: str,
                  restore_full: Timed) -> None:
    """Time `nbdbackup rollback` of the shut-down VM's image to cp_full against restore_full, the
    restore of that point timed in the same run; then the image must equal the source again."""
    rollbacks = []
    for i in range(args.repeat):
        log(f"nbdbackup rollback --to {cp_full} (VM shut down) ({i + 1}/{args.repeat})")
        t = nb.run("rollback", "vm1", "--to", cp_full, f"--image=vda={disk}", "--json")
        t.extra = json.loads(t.stdout)
        rollbacks.append(t)
        log(f"  {t.seconds:.2f}s, {human(t.extra['bytes'])} written")
    rb = best(rollbacks)
    pct = 100 * rb.seconds / restore_full.seconds
    report.rows.append(Row(f"rollback: nbdbackup rollback ({args.incr_percent:g}% changed)", rb.seconds, args.size, pct / 100,
                           f"{pct:.1f}% of restore", rss(rb), None, None, [t.seconds for t in rollbacks],
                           {"written_bytes": rb.extra["bytes"], "ru_maxrss_kib_tree": rb.maxrss_kib[0]}))
    report.targets.append({"target": f"rollback time <= {ROLLBACK_TARGET_PCT}% of a full restore of the same point",
                           "value": round(pct, 2), "met": pct <= ROLLBACK_TARGET_PCT})
    report.targets.append({"target": "rollback peak RSS < 256 MiB", "value": rss(rb), "met": rss(rb) < ROLLBACK_RSS_TARGET_KIB})
    compare(disk, source, "nbdbackup rollback to the full point == source image", report)


def vm_disk(args: argparse.Namespace, report: Report, rundir: Path) -> tuple[Any, Path]:
    """The built (or cached) image, and a copy of it in the run directory for the VM to use."""
    image = build_in_subprocess(args.workdir, args.size, args.data, seed=args.seed)
    report.images["main"] = {"path": str(image.path), **image.stats}
    disk = rundir / "vm1-vda.qcow2"
    log(f"copying the image to {disk}")
    sh(["cp", "--sparse=never", str(image.path), str(disk)], "cp")
    return image, disk


def rollback_case(args: argparse.Namespace, report: Report, rundir: Path, sockdir: Path, config: Path) -> None:
    """--rollback-only: full backup, restore of it (the reference), guest writes, VM shut down, rollback."""
    image, disk = vm_disk(args, report, rundir)
    nb = Nbdbackup(rundir / "repo", config)
    vm = VM(disk, rundir, sockdir)
    vm.start()
    try:
        log("nbdbackup full")
        t = nb.run("full", "vm1", "--qmp", str(vm.tool_qmp))
        cp_full = t.stdout.strip().splitlines()[-1]
        log(f"  {t.seconds:.2f}s, checkpoint {cp_full}")
        log(f"guest writes: {args.incr_percent}% of the disk in 64 KiB..1 MiB writes through the device")
        n, written, dirty, secs = guest_writes(vm, args.size, args.incr_percent, args.seed + 1)
        log(f"  {n} writes, {human(written)} ({human(dirty)} of 64 KiB granules) in {secs:.1f}s")
    finally:
        vm.quit()
    restores = []
    out_full = rundir / "restore-full"
    for i in range(args.repeat):
        shutil.rmtree(out_full, ignore_errors=True)
        log(f"nbdbackup restore --to {cp_full} ({i + 1}/{args.repeat})")
        restores.append(nb.run("restore", "vm1", "--to", cp_full, "--output", str(out_full)))
        log(f"  {restores[-1].seconds:.2f}s")
    rs = best(restores)
    report.rows.append(Row("restore: nbdbackup restore (full point)", rs.seconds, args.size, None, "", rss(rs),
                           None, disk_usage(out_full / "vda.qcow2"), [t.seconds for t in restores]))
    compare(out_full / "vda.qcow2", image.path, "nbdbackup restore of the full point == source image", report)
    shutil.rmtree(out_full)
    report.notes.append(f"--rollback-only: {n} guest writes of {human(written)} touch {human(dirty)} of 64 KiB granules "
                        "since the full backup; the rollback's reference is the restore of that backup")
    rollback_step(nb, report, args, disk, image.path, cp_full, rs)


@contextlib.contextmanager
def serving(nb: Nbdbackup, vm: str) -> Iterator[tuple[str, float]]:
    """`nbdbackup serve VM --to latest --disk vda` running: its URI, and the seconds it took to print it."""
    t0 = time.monotonic()
    proc = subprocess.Popen(nb.argv("serve", vm, "--to", "latest", "--disk", "vda"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=NB_ENV, cwd=NB_CWD)
    try:
        uri = proc.stdout.readline().strip()
        if not uri.startswith("nbd"):
            raise BenchError(f"nbdbackup serve printed no URI: {proc.stderr.read()[-500:]}")
        yield uri, time.monotonic() - t0
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


def serve_case(nb: Nbdbackup, report: Report, virtual: int, restore: Timed, repeat: int, vm: str = "vm1", where: str = "",
               nbdcopy: tuple[str, ...] = (), how: str = "") -> None:
    """`nbdbackup serve` of the incremental point: time to the first URI, and nbdcopy of the
    whole served disk to null: (reads everything, writes nothing) against the restore just timed.
    nbdcopy: its options (how: their description), e.g. one request at a time like QEMU's block-stream."""
    starts, copies, peaks = [], [], []
    for i in range(repeat):
        sync()
        with serving(nb, vm) as (uri, start):
            starts.append(start)
            log(f"nbdcopy {uri} null: ({i + 1}/{repeat})")
            t = run_timed(["nbdcopy", *nbdcopy, uri, "null:"])
            if not t.ok:
                raise BenchError(f"nbdcopy of the served disk failed: {t.stderr.strip()[-500:]}")
            copies.append(t)
            peaks.append(server_peak_kib(uri.split("socket=", 1)[-1]))
            log(f"  {t.seconds:.2f}s (serving after {starts[-1]:.2f}s)")
    cp = best(copies)
    ratio = cp.seconds / restore.seconds
    report.rows.append(Row(f"serve{where}: nbdcopy{how} served disk -> null: (incremental point)", cp.seconds, virtual, ratio,
                           f"{ratio:.2f}x restore time", max(peaks) or None, None, None, [t.seconds for t in copies],
                           {"serve_start_seconds": [round(x, 3) for x in starts]}))
    report.targets.append({"target": f"nbdcopy{how} of a served disk{where} <= {SERVE_RATIO_TARGET} x restore time{where}",
                           "value": round(ratio, 3), "met": ratio <= SERVE_RATIO_TARGET})
    report.notes.append(f"serve{where}{how}: first URI after {min(starts):.2f}s (best of {len(starts)})")


RANDOM_READS = 1000  # --serve-only: 4 KiB reads at random places in the disk's data, one at a time
RANDOM_READ_SIZE = 4096


def random_read_offsets(image: Path, n: int, seed: int) -> list[int]:
    """n offsets of RANDOM_READ_SIZE-aligned reads inside the image's data (qemu-img map), every
    byte of data equally likely: where a booting guest or a file restore reads, not the holes."""
    extents = [(e["start"], e["length"]) for e in json.loads(sh(["qemu-img", "map", "--output=json", str(image)], "qemu-img map"))
               if e["data"] and e["length"] >= RANDOM_READ_SIZE]
    rnd = random.Random(seed)
    picks = rnd.choices(extents, weights=[n for _, n in extents], k=n)
    return [start + rnd.randrange(0, length - RANDOM_READ_SIZE + 1) // RANDOM_READ_SIZE * RANDOM_READ_SIZE
            for start, length in picks]


def timed_reads(uri: str, offsets: list[int]) -> tuple[float, list[bytes]]:
    """Seconds for the reads at offsets, one request at a time over one NBD connection (libnbd),
    and what they read."""
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        t0 = time.perf_counter()
        got = [h.pread(RANDOM_READ_SIZE, off) for off in offsets]
        return time.perf_counter() - t0, got
    finally:
        h.shutdown()


def serve_reads_case(args: argparse.Namespace, report: Report, rundir: Path, sockdir: Path, config: Path) -> None:
    """--serve-only: a full backup, then RANDOM_READS random 4 KiB reads of the served backup
    (`nbdbackup serve`, a fresh server each time: nothing cached) against the same reads of the
    backed-up image itself (qemu-storage-daemon), then nbdcopy of the whole disk from both; the
    data read must be the same.  With --s3 the backup is also copied into a local SeaweedFS and
    served from there, in the same repetitions."""
    _, disk = vm_disk(args, report, rundir)
    nb = Nbdbackup(rundir / "repo", config)
    with VM(disk, rundir, sockdir) as vm:
        log("nbdbackup full")
        t = nb.run("full", "vm1", "--qmp", str(vm.tool_qmp))
        log(f"  {t.seconds:.2f}s")
    offsets = random_read_offsets(disk, RANDOM_READS, args.seed)
    with contextlib.ExitStack() as stack:
        served = {"a directory": nb}
        if args.s3:
            served["S3"] = s3_copy_of(stack, nb, rundir)
        times: dict[tuple[str, str], list[float]] = {}  # (side, what) -> seconds per repetition
        starts = []
        ref_uri = f"nbd+unix:///vda?socket={sockdir / 'ref.sock'}"
        for i in range(args.repeat):
            sync()
            log(f"reference: {RANDOM_READS} random 4 KiB reads of the image, then nbdcopy ({i + 1}/{args.repeat})")
            with StorageDaemon(disk, sockdir / "ref.sock", export="vda"):
                expected = served_reads(ref_uri, offsets, times, "image")
            for side, server_nb in served.items():
                log(f"nbdbackup serve from {side}: the same reads ({i + 1}/{args.repeat})")
                with serving(server_nb, "vm1") as (uri, start):
                    starts.append(start)
                    if served_reads(uri, offsets, times, side) != expected:
                        raise BenchError(f"the backup served from {side} read differently from the image it is a backup of")
    for what in ("reads", *SERVE_COPIES):
        ref = min(times["image", what])
        size = RANDOM_READS * RANDOM_READ_SIZE if what == "reads" else args.size
        how = f"{RANDOM_READS} random 4 KiB reads" if what == "reads" else f"nbdcopy{what} -> null:"
        report.rows.append(Row(f"reference: {how} of the image (qemu-storage-daemon)", ref, size, None,
                               f"{1000 * ref / RANDOM_READS:.3f} ms/read" if what == "reads" else "", None, None, None, times["image", what]))
        for side in served:
            best_s = min(times[side, what])
            text = f"{best_s / ref:.2f}x reference" + (f", {1000 * best_s / RANDOM_READS:.3f} ms/read" if what == "reads" else "")
            report.rows.append(Row(f"serve from {side}: {how} of the full backup", best_s, size, best_s / ref, text,
                                   None, None, None, times[side, what]))
    report.notes.append(f"--serve-only: {RANDOM_READS} reads of 4 KiB at random places in the disk's data, one at a time, "
                        "a fresh server each repetition, every read equal to the image's; then nbdcopy of the whole disk "
                        f"to null: from the same server (after the random reads); first URI after {min(starts):.2f}s at best")


@contextlib.contextmanager
def s3_server(rundir: Path) -> Iterator[tuple[Any, Path]]:
    """A local SeaweedFS with the bucket "bench", its credentials in nbdbackup's environment:
    (the server, a config file pointing nbdbackup at it)."""
    sys.path.insert(0, str(TOP / "tests"))
    from s3server import SeaweedFS

    with SeaweedFS(rundir / "seaweedfs") as server:
        server.client().create_bucket(Bucket="bench")
        os.environ.update(server.env())  # inherited by the nbdbackup processes
        if NB_ENV is not None:  # --rev: its environment was taken before the server existed
            NB_ENV.update(server.env())
        s3conf = rundir / "s3-config.toml"
        s3conf.write_text(server.config_text())
        yield server, s3conf


def s3_copy_of(stack: contextlib.ExitStack, nb: Nbdbackup, rundir: Path) -> Nbdbackup:
    """A local SeaweedFS (stopped with stack) holding a copy of nb's backups of vm1: its Nbdbackup."""
    _, s3conf = stack.enter_context(s3_server(rundir))
    log("nbdbackup copy into S3 (SeaweedFS)")
    Nbdbackup(nb.repo, s3conf).run("copy", "vm1", "--to", "s3://bench/serve")
    return Nbdbackup("s3://bench/serve", s3conf)  # type: ignore[arg-type]


def served_reads(uri: str, offsets: list[int], times: dict[tuple[str, str], list[float]], side: str) -> list[bytes]:
    """The random reads, then the nbdcopy runs, of uri, timed into times[side, ...]; what the reads read."""
    seconds, got = timed_reads(uri, offsets)
    times.setdefault((side, "reads"), []).append(seconds)
    log(f"  {seconds:.3f}s")
    for how, options in SERVE_COPIES.items():
        times.setdefault((side, how), []).append(nbdcopy_to_null(uri, options))
    return got


SERVE_COPIES = {"": (), " (1 request at a time, 512 KiB)": ("--connections=1", "--requests=1", "--request-size=524288")}


def nbdcopy_to_null(uri: str, options: tuple[str, ...]) -> float:
    t = run_timed(["nbdcopy", *options, uri, "null:"])
    if not t.ok:
        raise BenchError(f"nbdcopy of {uri} failed: {t.stderr.strip()[-500:]}")
    return t.seconds


def server_peak_kib(socket: str) -> int:
    """VmHWM of the nbdkit serving on socket (its Python plugin: cache and read-ahead included); 0 if not found."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
            if args and args[0].endswith(b"nbdkit") and socket.encode() in args:
                return next(int(ln.split()[1]) for ln in (proc / "status").read_text().splitlines() if ln.startswith("VmHWM:"))
        except (OSError, StopIteration, ValueError):
            continue
    return 0


def recover_case(nb: Nbdbackup, report: Report, virtual: int, restore: Timed, rundir: Path, sockdir: Path,
                 restored: Path) -> None:
    """`nbdbackup recover` of the incremental point into a paused VM: the first guest read (64 KiB at
    offset 0 through the device, just after the VM started) and the time until every block is local,
    against the restore of the same point; the result must equal that restore."""
    out = rundir / "recover"
    shutil.rmtree(out, ignore_errors=True)
    rvm = VM(out / "vda.qcow2", rundir, sockdir, name="rec")
    sync()
    proc = subprocess.Popen(nb.argv("recover", "vm1", "--to", "latest", "--output", str(out), "--disk", "vda",
                                    "--qmp", str(rvm.tool_qmp)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=NB_ENV, cwd=NB_CWD)
    try:
        t0 = time.monotonic()
        if not proc.stdout.readline().strip().endswith("vda.qcow2"):
            raise BenchError(f"nbdbackup recover printed no image: {proc.stderr.read()[-500:]}")
        ready = time.monotonic() - t0
        log(f"nbdbackup recover: images ready after {ready:.2f}s; starting the VM on them")
        rvm.start()
        t1 = time.monotonic()
        assert rvm.mon is not None
        rvm.mon.cmd("human-monitor-command", command_line=f'qemu-io -d {VM.QDEV} "read 0 65536"')
        first = time.monotonic() - t1
        _, err = proc.communicate(timeout=3600)
        streamed = time.monotonic() - t1
        if proc.returncode != 0:
            raise BenchError(f"nbdbackup recover failed (exit {proc.returncode}): {err.strip()[-800:]}")
        log(f"  first guest read {first:.3f}s after the VM started; every block local after {streamed:.2f}s")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
        rvm.quit()
    ratio = streamed / restore.seconds
    report.rows.append(Row("recover: VM start -> every block local (incremental point)", streamed, virtual, ratio,
                           f"{ratio:.2f}x restore time", None, None, disk_usage(out / "vda.qcow2"), [streamed],
                           {"images_ready_seconds": round(ready, 3), "first_read_seconds": round(first, 3)}))
    report.targets.append({"target": f"recover streaming <= {SERVE_RATIO_TARGET} x restore time", "value": round(ratio, 3),
                           "met": ratio <= SERVE_RATIO_TARGET})
    report.targets.append({"target": "first guest read after recover <= 2 s", "value": round(first, 3), "met": first <= 2.0})
    compare(out / "vda.qcow2", restored, "recovered image == restore of the same point", report)
    shutil.rmtree(out)


def dir_usage(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def sparse_case(args: argparse.Namespace, report: Report, rundir: Path, sockdir: Path, config: Path, size: int) -> None:
    label = f"sparse {human(size)}, {human(args.sparse_data)} data"
    image = build_in_subprocess(args.workdir, size, args.sparse_data, seed=args.seed)
    report.images[label] = {"path": str(image.path), **image.stats}
    disk = rundir / "vm2-vda.qcow2"
    sh(["cp", "--sparse=never", str(image.path), str(disk)], "cp")
    nb = Nbdbackup(rundir / "repo-sparse", config)
    vm = VM(disk, rundir, sockdir, name="vm2")
    vm.start()
    try:
        fulls = []
        for i in range(args.repeat):
            if i:
                shutil.rmtree(nb.repo)
                remove_bitmaps(vm)
            log(f"{label}: nbdbackup full ({i + 1}/{args.repeat})")
            t = nb.run("full", "vm2", "--qmp", str(vm.tool_qmp))
            t.extra = nb.backups("vm2")[t.stdout.strip().splitlines()[-1]]
            fulls.append(t)
            log(f"  {t.seconds:.2f}s")
        full = best(fulls)
        info = full.extra
        report.rows.append(Row(f"full: nbdbackup ({label})", full.seconds, size, None, "-", rss(full),
                               info["read_bytes"], info["stored_bytes"], [t.seconds for t in fulls],
                               {"data_bytes": image.stats["data_bytes"], "ru_maxrss_kib_tree": full.maxrss_kib[0],
                                "data_MBps": image.stats["data_bytes"] / full.seconds / 1e6}))
        out = rundir / "restore-sparse"
        restores = []
        for i in range(args.repeat):
            shutil.rmtree(out, ignore_errors=True)
            log(f"{label}: nbdbackup restore ({i + 1}/{args.repeat})")
            restores.append(nb.run("restore", "vm2", "--to", "latest", "--output", str(out)))
            log(f"  {restores[-1].seconds:.2f}s")
        rs = best(restores)
        report.rows.append(Row(f"restore: nbdbackup ({label})", rs.seconds, size, None, "-", rss(rs), None,
                               disk_usage(out / "vda.qcow2"), [t.seconds for t in restores],
                               {"data_bytes": image.stats["data_bytes"], "ru_maxrss_kib_tree": rs.maxrss_kib[0],
                                "data_MBps": image.stats["data_bytes"] / rs.seconds / 1e6}))
    finally:
        vm.quit()
    compare(out / "vda.qcow2", image.path, f"{label}: nbdbackup restore == source image", report)
    shutil.rmtree(out)
    shutil.rmtree(nb.repo)
    disk.unlink()


ENCRYPTION_TARGET = 1.10  # issue 13: encrypted full backup and restore at most 1.10x the unencrypted time


def encryption_case(args: argparse.Namespace, report: Report, rundir: Path, sockdir: Path, config: Path) -> None:
    """Full backup and restore of the same VM into an unencrypted and an encrypted (repokey) repository,
    interleaved (which goes first alternates between repetitions), best of --repeat each;
    ratio = encrypted / unencrypted (time, peak RSS, peak private memory)."""
    image = build_in_subprocess(args.workdir, args.size, args.data, seed=args.seed)
    disk = rundir / "vm3-vda.qcow2"
    sh(["cp", "--sparse=never", str(image.path), str(disk)], "cp")
    passphrase = rundir / "passphrase"
    passphrase.write_text("bench passphrase\n")
    enc_config = rundir / "config-encrypted.toml"
    enc_config.write_text('encryption = "repokey"\n' + config.read_text())
    plain, encrypted = Nbdbackup(rundir / "repo-plain", config), Nbdbackup(rundir / "repo-encrypted", enc_config)
    global NB_ENV
    saved_env = NB_ENV
    NB_ENV = {**(NB_ENV or os.environ), "NBDBACKUP_PASSWORD_FILE": str(passphrase), "XDG_CONFIG_HOME": str(rundir / "xdg")}
    vm = VM(disk, rundir, sockdir, name="vm3")
    vm.start()
    times: dict[str, dict[str, list[Timed]]] = {"full": {"plain": [], "encrypted": []}, "restore": {"plain": [], "encrypted": []}}
    try:
        pairs = (("plain", plain), ("encrypted", encrypted))
        for i in range(args.repeat):
            for label, nb in pairs if i % 2 == 0 else pairs[::-1]:
                shutil.rmtree(nb.repo, ignore_errors=True)
                remove_bitmaps(vm)
                log(f"encryption: nbdbackup full into the {label} repository ({i + 1}/{args.repeat})")
                t = nb.run("full", "vm3", "--qmp", str(vm.tool_qmp))
                t.extra = nb.backups("vm3")[t.stdout.strip().splitlines()[-1]]
                times["full"][label].append(t)
                log(f"  {t.seconds:.2f}s")
        for i in range(args.repeat):
            for label, nb in pairs if i % 2 == 0 else pairs[::-1]:
                out = rundir / f"restore-{label}"
                shutil.rmtree(out, ignore_errors=True)
                log(f"encryption: nbdbackup restore from the {label} repository ({i + 1}/{args.repeat})")
                times["restore"][label].append(nb.run("restore", "vm3", "--to", "latest", "--output", str(out)))
                log(f"  {times['restore'][label][-1].seconds:.2f}s")
    finally:
        vm.quit()
        NB_ENV = saved_env
    for step in ("full", "restore"):
        base, enc = best(times[step]["plain"]), best(times[step]["encrypted"])
        ratio = enc.seconds / base.seconds
        for label, t in (("unencrypted", base), ("encrypted (repokey)", enc)):
            report.rows.append(Row(f"{step}: nbdbackup, {label} repository", t.seconds, args.size, None,
                                   "1.00 (ref)" if t is base else f"{ratio:.2f}x time", rss(t),
                                   t.extra.get("read_bytes") if step == "full" else None,
                                   t.extra.get("stored_bytes") if step == "full" else None,
                                   [x.seconds for x in times[step]["plain" if t is base else "encrypted"]],
                                   cpu_seconds=sum(t.cpu), cpu_ratio_text="1.00 (ref)" if t is base else f"{sum(enc.cpu) / sum(base.cpu):.2f}x"))
        report.targets.append({"target": f"encrypted {step} time <= {ENCRYPTION_TARGET} x unencrypted", "value": round(ratio, 3),
                               "met": ratio <= ENCRYPTION_TARGET})
        rss_ratio = rss(enc) / rss(base) if rss(base) else 0
        anon_base, anon_enc = (max(t.anon_kib[0] for t in times[step][k]) for k in ("plain", "encrypted"))
        report.targets.append({"target": f"encrypted {step} peak RSS <= {ENCRYPTION_TARGET} x unencrypted", "value": round(rss_ratio, 3),
                               "met": rss_ratio <= ENCRYPTION_TARGET})
        pairwise = ", ".join(f"{e.seconds / p.seconds:.2f}" for p, e in zip(times[step]["plain"], times[step]["encrypted"], strict=True))
        cpu_best = min(sum(t.cpu) for t in times[step]["encrypted"]) / min(sum(t.cpu) for t in times[step]["plain"])
        report.notes.append(f"ENCRYPTION OVERHEAD, {step}: time {ratio:.2f}x ({enc.seconds:.2f}s encrypted vs {base.seconds:.2f}s "
                            f"unencrypted, best of {args.repeat}; per repetition {pairwise}); CPU {cpu_best:.2f}x (least "
                            f"CPU seconds of each, less sensitive to other load than time); peak RSS {rss_ratio:.2f}x "
                            f"({rss(enc) // 1024} vs {rss(base) // 1024} MiB); peak private memory (RssAnon) "
                            f"{anon_enc / anon_base if anon_base else 0:.2f}x ({anon_enc // 1024} vs {anon_base // 1024} MiB)")
        # The peak of one run varies by a few MiB with how the allocator's arenas happen to fill
        # (timing): every repetition's, and the ratio of the medians, beside the best run's.
        peaks = {k: [rss(t) / 1024 for t in times[step][k]] for k in ("plain", "encrypted")}
        medians = {k: statistics.median(v) for k, v in peaks.items()}
        report.notes.append(f"ENCRYPTION OVERHEAD, {step}: peak RSS of each repetition (MiB): unencrypted "
                            f"{', '.join(f'{v:.1f}' for v in peaks['plain'])}; encrypted {', '.join(f'{v:.1f}' for v in peaks['encrypted'])}; "
                            f"ratio of the medians {medians['encrypted'] / medians['plain'] if medians['plain'] else 0:.2f}x")
    compare(rundir / "restore-encrypted" / "vda.qcow2", image.path, "restore from the encrypted repository == source image", report)
    for path in (plain.repo, encrypted.repo, rundir / "restore-plain", rundir / "restore-encrypted"):
        shutil.rmtree(path, ignore_errors=True)
    disk.unlink()


def proc_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a running process (/proc/PID/stat), its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def s3_case(args: argparse.Namespace, report: Report, rundir: Path, sockdir: Path) -> None:
    """The same VM backed up into a directory and into S3 (a local SeaweedFS) in turn: full,
    incremental of --incr-percent, restore; prints S3/directory time ratios (issue 12's targets),
    with the CPU seconds of nbdbackup, QEMU and the S3 server per step: on a machine where the
    server shares the CPUs, (all CPU seconds) / (CPUs) is a floor no client can go below."""
    image = build_in_subprocess(args.workdir, args.size, args.data, seed=args.seed)
    disk = rundir / "vm3-vda.qcow2"
    sh(["cp", "--sparse=never", str(image.path), str(disk)], "cp")
    ncpu = os.cpu_count() or 1
    with s3_server(rundir) as (server, s3conf):
        dirconf = rundir / "dir-config.toml"
        dirconf.write_text("")
        assert server.proc is not None
        spid = server.proc.pid
        vm = VM(disk, rundir, sockdir, name="vm3")
        vm.start()
        times: dict[tuple[str, str], list[Timed]] = {}
        running = [True]  # the VM's QEMU is up (its CPU seconds are counted); False once it quit, for the restores

        def qemu_cpu() -> float:
            return vm.cpu_seconds() if running[0] else 0.0

        def timed(step: str, kind: str, nb: Nbdbackup, *argv: str) -> None:
            q0, s0 = qemu_cpu(), proc_cpu_seconds(spid)
            t = nb.run(*argv)
            t.extra = {"nbdbackup_cpu": sum(t.cpu), "qemu_cpu": qemu_cpu() - q0,
                       "server_cpu": proc_cpu_seconds(spid) - s0}
            times.setdefault((step, kind), []).append(t)
            log(f"  {t.seconds:.2f}s; CPU s: nbdbackup {t.extra['nbdbackup_cpu']:.1f}, QEMU {t.extra['qemu_cpu']:.1f}, "
                f"S3 server {t.extra['server_cpu']:.1f}")

        # Each repetition: a full into a new directory and a new S3 prefix, 1% written, an incremental into each.
        rounds = [{"directory": Nbdbackup(rundir / f"repo-dir{i}", dirconf), "S3": Nbdbackup(f"s3://bench/repo{i}", s3conf)}  # type: ignore[arg-type]
                  for i in range(args.repeat)]
        try:
            for i, repos in enumerate(rounds):
                remove_bitmaps(vm)
                for kind, nb in repos.items():
                    log(f"S3 comparison: nbdbackup full into {kind} ({i + 1}/{args.repeat})")
                    timed("full", kind, nb, "full", "vm3", "--qmp", str(vm.tool_qmp))
                n, written, _dirty, _secs = guest_writes(vm, args.size, args.incr_percent, args.seed + 2 + i)
                for kind, nb in repos.items():
                    log(f"S3 comparison: nbdbackup incremental into {kind} ({human(written)} written; {i + 1}/{args.repeat})")
                    timed("incremental", kind, nb, "incremental", "vm3", "--qmp", str(vm.tool_qmp))
        finally:
            vm.quit()
        running[0] = False
        for i in range(args.repeat):
            for kind, nb in rounds[-1].items():
                out = rundir / f"restore-{kind}"
                shutil.rmtree(out, ignore_errors=True)
                log(f"S3 comparison: nbdbackup restore from {kind} ({i + 1}/{args.repeat})")
                timed("restore", kind, nb, "restore", "vm3", "--to", "latest", "--output", str(out))
                if i == args.repeat - 1:
                    compare(out / "vda.qcow2", disk, f"restore from {kind} == disk after the writes", report)
                    shutil.rmtree(out)
        # serve from S3 (issue 14): nbdcopy of the served disk against the S3 restore just timed
        s3_restore = best(times[("restore", "S3")])
        serve_case(rounds[-1]["S3"], report, args.size, s3_restore, args.repeat, vm="vm3", where=" from S3")
        serve_case(rounds[-1]["S3"], report, args.size, s3_restore, args.repeat, vm="vm3", where=" from S3",
                   nbdcopy=("--connections=1", "--requests=1", "--request-size=524288"), how=" (1 request at a time, 512 KiB)")
        raw = raw_put_rate(server, rundir)
    targets = {"full": 1.25, "incremental": 1.5, "restore": 1.25}
    for step, limit in targets.items():
        d, s3 = best(times[(step, "directory")]), best(times[(step, "S3")])
        ratio = s3.seconds / d.seconds
        for t in (d, s3):
            cpu = t.extra["nbdbackup_cpu"] + t.extra["qemu_cpu"] + t.extra["server_cpu"]
            t.extra["cpu_floor_seconds"] = cpu / ncpu
        floor = s3.extra["cpu_floor_seconds"] / d.seconds
        into = "from" if step == "restore" else "into"
        report.rows.append(Row(f"{step}: {into} directory (S3 reference)", d.seconds, args.size, 1.0, "1.00 (ref)", rss(d),
                               all_seconds=[t.seconds for t in times[(step, "directory")]], extra=d.extra,
                               cpu_seconds=d.extra["nbdbackup_cpu"] + d.extra["qemu_cpu"]))
        report.rows.append(Row(f"{step}: {into} S3 (SeaweedFS, same run)", s3.seconds, args.size, ratio, f"{ratio:.2f}x time", rss(s3),
                               all_seconds=[t.seconds for t in times[(step, "S3")]], extra=s3.extra,
                               cpu_seconds=s3.extra["nbdbackup_cpu"] + s3.extra["qemu_cpu"]))
        report.targets.append({"target": f"S3 {step} time <= {limit} x directory", "value": round(ratio, 3), "met": ratio <= limit})
        report.targets.append({"target": f"S3 {step} peak RSS < 256 MiB", "value": rss(s3), "met": (rss(s3) or 0) < 256 * 1024})
        report.notes.append(
            f"S3 {step}: CPU seconds nbdbackup {s3.extra['nbdbackup_cpu']:.1f} (directory {d.extra['nbdbackup_cpu']:.1f}), "
            f"QEMU {s3.extra['qemu_cpu']:.1f} ({d.extra['qemu_cpu']:.1f}), S3 server {s3.extra['server_cpu']:.1f}; "
            f"all of them over {ncpu} CPUs = {s3.extra['cpu_floor_seconds']:.2f}s = {floor:.2f}x the directory's time "
            "(on an otherwise idle machine, no S3 client could be faster than that here)")
    report.notes.append(f"S3 server alone, PUT of {raw['objects']} x {human(raw['object_bytes'])} incompressible objects, "
                        f"{raw['threads']} threads, minimal client (no SDK, unsigned payload): {raw['MiBps']:.0f} MiB/s, "
                        f"server CPU {raw['server_ms_per_MiB']:.1f} ms per MiB")
    disk.unlink()


def raw_put_rate(server: Any, rundir: Path, objects: int = 96, size: int = 4 << 20, threads: int = 8) -> dict[str, Any]:
    """The server's PUT capacity with the least client work there is: http.client on kept-alive
    connections, botocore's SigV4 signer on headers only (UNSIGNED-PAYLOAD)."""
    import concurrent.futures as cf
    import http.client
    import threading

    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    from s3server import KEY, SECRET

    creds, local = Credentials(KEY, SECRET), threading.local()
    blobs = [os.urandom(size) for _ in range(8)]

    def put(i: int) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        path = f"/bench/raw/{i}"
        req = AWSRequest("PUT", server.endpoint + path, data=blobs[i % 8],
                         headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD", "Content-Length": str(size)})
        S3SigV4Auth(creds, "s3", "us-east-1").add_auth(req)
        conn.request("PUT", path, body=blobs[i % 8], headers=dict(req.headers.items()))
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise BenchError(f"raw PUT answered HTTP {resp.status}")

    assert server.proc is not None
    s0, t0 = proc_cpu_seconds(server.proc.pid), time.monotonic()
    with cf.ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, range(objects)))
    seconds, mib = time.monotonic() - t0, objects * size / 2**20
    log(f"S3 server alone: {mib / seconds:.0f} MiB/s of PUTs")
    return {"objects": objects, "object_bytes": size, "threads": threads, "MiBps": mib / seconds,
            "server_ms_per_MiB": (proc_cpu_seconds(server.proc.pid) - s0) / mib * 1000}


# -- output ---------------------------------------------------------------------------


def fmt_bytes(n: int | None) -> str:
    return "-" if n is None else human(n)


def print_table(report: Report, file: Any = sys.stdout) -> None:
    m = report.machine
    p = lambda s="": print(s, file=file)  # noqa: E731
    p(f"machine: {m['nproc']} cpus, {m['cpu']}, kernel {m['kernel']}; {m['qemu']}; {m['libnbd']}; {m['zstd']}")
    p(f"nbdbackup: {m['nbdbackup']}; python {m['python']}")
    p(f"load average at start (1/5/15 min): {m['loadavg_start']}; CPU used by other processes during the run: "
      f"{m.get('foreign_cpu_seconds', '?')}s ({m.get('foreign_cpu_share', '?')} of the machine)")
    for label, st in report.images.items():
        kinds = ", ".join(f"{k} {human(v)}" for k, v in st["bytes_by_kind"].items())
        p(f"image {label}: {human(st['virtual_size'])} virtual, {st['extents']} extents ({kinds}), "
          f"{human(st['data_bytes'])} allocated data, rest holes/zero clusters")
    p(f"config: repeat {report.config['repeat']} (best of; full and reference interleaved), nbdbackup compression "
      f"{report.config.get('compression') or 'default'}, workers {report.config.get('workers') or 'default'}, nbdcopy --request-size={report.config['request_size']}, "
      f"zstd -{ZSTD_LEVEL} -T{ZSTD_THREADS}")
    p()
    head = ["step", "seconds", "MB/s", "ratio to reference", "CPU s (tree+QEMU)", "CPU ratio", "peak RSS MiB", "read over NBD", "stored"]
    rows = [[r.step, f"{r.seconds:.2f}", f"{r.mbps:.0f}", r.ratio_text or "-",
             "-" if r.cpu_seconds is None else f"{r.cpu_seconds:.2f}", r.cpu_ratio_text or "-",
             "-" if r.rss_kib is None else f"{r.rss_kib / 1024:.0f}", fmt_bytes(r.read_bytes), fmt_bytes(r.stored_bytes)]
            for r in report.rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: " | ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                     for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    p(line(head))
    p("-+-".join("-" * w for w in widths))
    for r in rows:
        p(line(r))
    p()
    for t in report.targets:
        p(f"target: {t['target']}: {t['value']} -> {'met' if t['met'] else 'NOT MET'}")
    for c in report.checks:
        p(f"check: {c['check']}: {'OK' if c['ok'] else 'FAILED (' + c['detail'] + ')'}")
    for n in report.notes:
        p(f"note: {n}")
    for e in report.errors:
        p(f"ERROR: {e}")
    p(f"total benchmark time: {report.total_seconds:.0f}s")


STANDARD_NOTES = [
    "MB/s = virtual disk size / seconds (10^6 bytes/s), for nbdbackup and the references alike; "
    "ratio = nbdbackup MB/s / reference MB/s (incremental: its time as % of the full's)",
    "seconds are wall time of the whole command: nbdbackup's include Python start-up, QMP set-up, fleecing and the "
    "repository sync at commit; the reference full includes the NBD export set-up/teardown and an fsync of the "
    "archive, the reference restore the image creation, qemu-storage-daemon start and stop (its flush); "
    "pipeline-only times are in --json (extra.pipeline_seconds)",
    "page cache is not dropped between steps (not reliably possible here): every step reads a warm image; "
    "`sync` runs (untimed) before each step",
    "peak RSS: VmHWM of the measured process itself, polled every 10 ms until it exits (nbdbackup's Python "
    "process, without the qemu-img / qemu-storage-daemon it starts; references: nbdcopy + zstd summed); --json "
    "also has wait4()'s ru_maxrss (extra.ru_maxrss_kib_*: the largest of the process tree, but Linux starts "
    "a child's value at its parent's RSS at fork time)",
    "restore rows' 'stored' column: disk usage of the restored image file (nbdcopy 1.14 reading a pipe writes "
    "every byte, zeroes included, so the reference restore writes the whole virtual size and leaves a fully "
    "allocated image: a weak reference; the 'restore floor' row, zstd -d alone, is there for context)",
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G", help="virtual disk size (default 4G)")
    ap.add_argument("--data", default="2G", help="data in the disk, holes elsewhere (default 2G)")
    ap.add_argument("--workdir", default="/var/tmp/nbdbackup-bench", help="cache of built images and run files (default %(default)s)")
    ap.add_argument("--repeat", type=int, default=1, help="run each measurement N times, report the best (default 1)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    ap.add_argument("--request-size", default="4M", help="nbdcopy --request-size for the references (default 4M)")
    ap.add_argument("--incr-percent", type=float, default=1.0, help="percentage of the disk written before the incremental (default 1)")
    ap.add_argument("--sparse-size", default="64G",
                    help="comma-separated virtual sizes of sparse-disk cases (default 64G; 'none' to skip), e.g. 64G,1T")
    ap.add_argument("--sparse-data", default="1G", help="data in each sparse disk (default 1G)")
    ap.add_argument("--full-only", action="store_true", help="measure only the full backup and its reference (to weigh settings)")
    ap.add_argument("--encryption-only", action="store_true",
                    help="measure only full backup and restore into an encrypted vs an unencrypted repository")
    ap.add_argument("--rollback-only", action="store_true",
                    help="measure only the rollback of the shut-down VM against the restore of the same point")
    ap.add_argument("--serve-only", action="store_true",
                    help="measure only random 4 KiB reads and whole-disk copies of a served full backup against the same "
                         "of the image (with --s3: served from a local SeaweedFS too)")
    ap.add_argument("--no-encryption", action="store_true", help="skip the encrypted-vs-unencrypted comparison")
    ap.add_argument("--compression", type=int, help="nbdbackup's zstd level (default: nbdbackup's default)")
    ap.add_argument("--workers", type=int, help="nbdbackup's workers setting (default: nbdbackup's default)")
    ap.add_argument("--seed", type=int, default=1, help="layout/content seed (default 1)")
    ap.add_argument("--s3", action="store_true", help="also compare backups into S3 (a local SeaweedFS) with a directory")
    ap.add_argument("--s3-only", action="store_true", help="only the S3 comparison")
    ap.add_argument("--keep", action="store_true", help="keep the run directory (images, logs) for inspection")
    ap.add_argument("--rev", metavar="GIT-REV",
                    help="benchmark nbdbackup as committed at this revision (git archive into the run directory, "
                         "run with the project's venv) instead of the work tree")
    args = ap.parse_args(argv)
    try:
        args.size = parse_size(args.size)
        args.data = parse_size(args.data)
        args.sparse_data = parse_size(args.sparse_data)
        args.request_size = parse_size(args.request_size)
        args.sparse_sizes = [] if args.sparse_size.strip().lower() in ("none", "", "0") else \
            [parse_size(s) for s in args.sparse_size.split(",")]
    except ValueError as exc:
        ap.error(str(exc))
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    args.workdir = Path(args.workdir)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not NBDBACKUP.exists():
        print(f"bench: {NBDBACKUP} is missing: run scripts/setup", file=sys.stderr)
        return 2
    missing = [p for p in ("nbdcopy", "zstd", "qemu-img", "qemu-io", "qemu-storage-daemon", "qemu-system-x86_64", "stdbuf")
               if shutil.which(p) is None]
    if missing:
        print(f"bench: missing programs: {', '.join(missing)}", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    busy0, own0 = cpu_seconds()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rundir = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
    if args.rev:
        try:
            (rundir / "src").mkdir()
            use_revision(args.rev, rundir / "src")
        except BenchError as exc:
            shutil.rmtree(rundir, ignore_errors=True)
            print(f"bench: {exc}", file=sys.stderr)
            return 2
    report = Report(machine_info(), {"size": args.size, "data": args.data, "repeat": args.repeat,
                                      "request_size": args.request_size, "incr_percent": args.incr_percent,
                                      "sparse_sizes": args.sparse_sizes, "sparse_data": args.sparse_data, "seed": args.seed,
                                      "rev": args.rev, "compression": args.compression, "workers": args.workers})
    report.notes.extend(STANDARD_NOTES)
    sockdir = Path(tempfile.mkdtemp(prefix="nbdbench-", dir="/tmp"))  # unix socket paths must stay short
    config = rundir / "config.toml"
    config.write_text("".join(f"[vm.{vm}]\n{key} = {value}\n" for vm in ("vm1", "vm2", "vm3")
                              for key, value in (("compression", args.compression), ("workers", args.workers)) if value is not None))
    status = 0
    try:
        if args.rollback_only:
            rollback_case(args, report, rundir, sockdir, config)
        elif args.serve_only:
            serve_reads_case(args, report, rundir, sockdir, config)
        elif not (args.s3_only or args.encryption_only):
            main_case(args, report, rundir, sockdir, config)
            for size in args.sparse_sizes:
                sparse_case(args, report, rundir, sockdir, config, size)
        if (args.s3 and not args.serve_only) or args.s3_only:
            s3_case(args, report, rundir, sockdir)
        if not (args.no_encryption or args.s3_only or args.rollback_only or args.serve_only):
            encryption_case(args, report, rundir, sockdir, config)
    except BenchError as exc:
        report.errors.append(str(exc))
        status = 1
    except Exception as exc:  # a bug here or a tool misbehaving: show it, still print what was measured
        import traceback

        traceback.print_exc()
        report.errors.append(f"{type(exc).__name__}: {exc}")
        status = 1
    except KeyboardInterrupt:
        report.errors.append("interrupted (SIGINT)")
        status = 130
    except Interrupted as exc:
        report.errors.append(f"interrupted ({exc})")
        status = 128 + exc.signum
    finally:
        reap_all()
        shutil.rmtree(sockdir, ignore_errors=True)
        if args.keep or status:
            log(f"run files kept in {rundir}")
        else:
            shutil.rmtree(rundir, ignore_errors=True)
    if any(not c["ok"] for c in report.checks):
        status = status or 1
    report.total_seconds = time.monotonic() - started
    busy1, own1 = cpu_seconds()  # every child has been reaped by now
    foreign = max(0.0, (busy1 - busy0) - (own1 - own0))
    capacity = report.total_seconds * (os.cpu_count() or 1)
    report.machine["foreign_cpu_seconds"] = f"{foreign:.1f}"
    report.machine["foreign_cpu_share"] = f"{100 * foreign / capacity:.0f}%" if capacity else "?"
    if capacity and foreign / capacity > 0.10:
        report.notes.insert(0, f"WARNING: other processes used {foreign:.0f} CPU seconds during the run "
                               f"({report.machine['foreign_cpu_share']} of the machine): timings are noisy; "
                               "rerun on a quiet machine, or with --repeat N (best of N)")
    if args.json:
        out = asdict(report)
        for r, row in zip(out["rows"], report.rows, strict=True):
            r["MBps"] = round(row.mbps, 1)
        print(json.dumps(out, indent=1))
    else:
        print_table(report)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
