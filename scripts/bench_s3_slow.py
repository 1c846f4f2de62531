"""Does a slow S3 server stall the guest?  Guest write latency while `nbdbackup full` uploads
into a SeaweedFS behind a proxy that delays every forwarded block by --delay seconds,
against the same writes with no backup running (same VM, same run).

    .venv/bin/python scripts/bench_s3_slow.py [--delay 0.05] [--writes 40]

Fleecing (copy-before-write into a local overlay) means a guest write waits for at most
one local copy of the old data, never for the repository: the ratio should stay near 1.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP / "tests"))

from faults import write_data  # noqa: E402
from harness import TestVM  # noqa: E402
from s3server import SeaweedFS  # noqa: E402

MiB = 1 << 20


class SlowProxy:
    def __init__(self, port: int, delay: float) -> None:
        self.port_to, self.delay = port, delay
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.port_to))
            threading.Thread(target=self._pipe, args=(conn, up, self.delay), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, conn, 0), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket, delay: float) -> None:
        try:
            while data := a.recv(256 * 1024):
                if delay:
                    time.sleep(delay)
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass


def write_latencies(vm: TestVM, n: int, base: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.monotonic()
        vm.write("vda", base + (i % 16) * MiB, 64 * 1024, 0x40 + i % 64)
        out.append(time.monotonic() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delay", type=float, default=0.05, help="seconds added per forwarded 256 KiB block (default 0.05)")
    ap.add_argument("--writes", type=int, default=40)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nbdb-slow-", dir="/var/tmp"))
    with SeaweedFS(work / "seaweedfs") as server:
        server.client().create_bucket(Bucket="slow")
        proxy = SlowProxy(server.port, args.delay)
        conf = work / "c.toml"
        conf.write_text(f'[s3]\nendpoint = "http://127.0.0.1:{proxy.port}"\naddressing = "path"\n')
        env = {**os.environ, **server.env(), "NBDBACKUP_CONFIG": str(conf), "PYTHONPATH": str(TOP)}
        vm = TestVM(work / "vm", {"vda": 256 * MiB})
        vm.start()
        try:
            for i in range(32):  # incompressible: every byte must cross the slow link
                write_data(vm, "vda", i * 4 * MiB, os.urandom(4 * MiB))
            idle = write_latencies(vm, args.writes, 0)
            results = {}
            for kind, repo in (("directory", str(work / "repo")), ("slow S3", "s3://slow/r")):
                started = time.monotonic()
                backup = subprocess.Popen([sys.executable, "-m", "nbdbackup", "--repo", repo, "full", "vm1", "--qmp",
                                           str(vm.qmp_socket)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                while not vm.block_state()["exports"]:
                    time.sleep(0.01)
                busy = write_latencies(vm, args.writes, 0)  # overwrites data the backup may not have read yet
                during = time.monotonic() - started
                out, err = backup.communicate(timeout=900)
                if backup.returncode != 0:
                    print(f"backup into {kind} failed: {err.strip()}", file=sys.stderr)
                    return 1
                results[kind] = (busy, during, time.monotonic() - started)
        finally:
            vm.cleanup()
    med_idle = statistics.median(idle)
    print(f"guest 64 KiB writes ({args.writes} each), median when idle: {med_idle * 1000:.1f} ms")
    for kind, (busy, during, total) in results.items():
        med = statistics.median(busy)
        print(f"during a full backup (128 MiB random) into {kind:<9}: median {med * 1000:.1f} ms (x{med / med_idle:.2f} idle), "
              f"max {max(busy) * 1000:.1f} ms; backup took {total:.1f}s, writes in its first {during:.1f}s")
    print(f"slow S3 = SeaweedFS behind a proxy adding {args.delay * 1000:.0f} ms per 256 KiB forwarded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
