"""The commit's sync with other programs' dirty data on the same filesystem (issue 9).

    scripts/bench commit [--chunks 64] [--chunk-size 1M] [--other 2G] [--repeat 3] [--workdir DIR]

A backup's commit must make its new chunk and index files durable before the manifest.
It used syncfs(2), which also waits for every other writer's dirty data on the repository's
filesystem (on a host whose VM images share it: gigabytes).  It now fsyncs its own files, in
parallel, then their directories.  Each round, on the filesystem of --workdir (a real disk,
not tmpfs):

  1. write --chunks files of --chunk-size incompressible bytes through the repository's
     LocalBackend (as a backup writes chunks: no fsync), and --other bytes into a file next
     to the repository without fsync (a VM's image being written);
  2. time the commit's sync: either `syncfs` (the old way: syncfs, then fsync of the
     directories) or `fsync` (LocalBackend.sync: per-file fsync in parallel, then the
     directories);
  3. sync everything, so the next round starts clean.

The two ways alternate; the best of --repeat rounds each is reported, with --other 0 as the
reference, and the ratio syncfs / fsync.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

from nbdbackup.repository.backend import LocalBackend, _fsync_dir  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import human, parse_size  # noqa: E402


def old_sync(backend: LocalBackend) -> None:
    """The commit before issue 9: syncfs(2) on the repository's filesystem, then its dirty directories."""
    fd = os.open(backend.root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed")
    finally:
        os.close(fd)
    for d in sorted(backend._dirty_dirs):
        _fsync_dir(d)
    backend._dirty_dirs.clear()
    backend._dirty_files.clear()


def dirty_other(path: Path, size: int) -> None:
    """size bytes written and not synced (the page cache holds them dirty)."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)


def one_round(workdir: Path, way: str, chunks: int, chunk_size: int, other: int) -> float:
    repo = workdir / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    os.sync()
    backend = LocalBackend(repo)
    for _ in range(chunks):
        h = os.urandom(32).hex()
        backend.write(f"chunks/{h[:2]}/{h}", os.urandom(chunk_size))
    backend.write("vms/vm1/backups/c1/vda.index", os.urandom(64 * 1024))
    if other:
        dirty_other(workdir / "other-vm-image", other)
    t0 = time.perf_counter()
    if way == "syncfs":
        old_sync(backend)
    else:
        backend.sync()
    elapsed = time.perf_counter() - t0
    os.sync()
    return elapsed


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench commit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=64, help="chunk files the backup wrote (default 64)")
    ap.add_argument("--chunk-size", default="1M", help="size of each (default 1M)")
    ap.add_argument("--other", default="2G", help="other dirty data on the same filesystem (default 2G)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per way and load; the best counts (default 3)")
    ap.add_argument("--workdir", default="/var/tmp/nbdbackup-bench-commit", help="on the filesystem to measure (default %(default)s)")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    chunk_size, other = parse_size(args.chunk_size), parse_size(args.other)
    fstype = next((line.split()[2] for line in Path("/proc/mounts").read_text().splitlines()
                   if line.split()[1] == _mountpoint(workdir)), "?")
    print(f"commit of {args.chunks} x {human(chunk_size)} chunk files + 1 index in {workdir} ({fstype}); best of {args.repeat}")
    results: dict[tuple[str, int], list[float]] = {}
    try:
        for load in (0, other):
            for _ in range(args.repeat):
                for way in ("syncfs", "fsync"):
                    results.setdefault((way, load), []).append(one_round(workdir, way, args.chunks, chunk_size, load))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{'other dirty data':>18} {'syncfs (old)':>14} {'fsync (new)':>14} {'ratio old/new':>14}")
    for load in (0, other):
        old, new = min(results[("syncfs", load)]), min(results[("fsync", load)])
        print(f"{human(load):>18} {old:>13.3f}s {new:>13.3f}s {old / new:>13.2f}x"
              f"   (medians {statistics.median(results[('syncfs', load)]):.3f}s / {statistics.median(results[('fsync', load)]):.3f}s)")
    return 0


def _mountpoint(path: Path) -> str:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return str(path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
