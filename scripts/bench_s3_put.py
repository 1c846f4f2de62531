"""Where the time of an upload into S3 goes: PUT throughput of the local SeaweedFS, and CPU
seconds per MiB of the client and of the server, for boto3 as nbdbackup configures it
(signed payload over http), boto3 with an unsigned payload, and a minimal client
(http.client on kept-alive connections, botocore signing the headers only: no SDK work).

    flock /work/bench.lock .venv/bin/python scripts/bench_s3_put.py [--size 4M] [--mib 512] [--threads 8]

The server's CPU per MiB is what the co-located server costs a backup on the same CPUs,
whatever the client; --size shows whether it depends on the request count.  Where that CPU goes:
NBDBACKUP_WEED_CPUPROFILE=/tmp/weed.prof before the command, then scripts/pprof_top.py /tmp/weed.prof.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import http.client
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP / "tests"))
sys.path.insert(0, str(TOP / "scripts"))

import botocore.config  # noqa: E402
import botocore.session  # noqa: E402
from bench_data import parse_size  # noqa: E402
from botocore.auth import S3SigV4Auth  # noqa: E402
from botocore.awsrequest import AWSRequest  # noqa: E402
from botocore.credentials import Credentials  # noqa: E402
from s3server import KEY, SECRET, SeaweedFS  # noqa: E402


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def boto_put(server: SeaweedFS, signed: bool):
    s3 = {"addressing_style": "path"} | ({} if signed else {"payload_signing_enabled": False})
    session = botocore.session.Session()
    session.set_credentials(KEY, SECRET)
    cfg = botocore.config.Config(request_checksum_calculation="when_required", response_checksum_validation="when_required",
                                 s3=s3, max_pool_connections=32)
    client = session.create_client("s3", endpoint_url=server.endpoint, config=cfg, region_name="us-east-1")
    return lambda key, body: client.put_object(Bucket="put", Key=key, Body=body)


def raw_put(server: SeaweedFS):
    creds, local = Credentials(KEY, SECRET), threading.local()

    def put(key: str, body: bytes) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        req = AWSRequest("PUT", f"{server.endpoint}/put/{key}", data=body,
                         headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD", "Content-Length": str(len(body))})
        S3SigV4Auth(creds, "s3", "us-east-1").add_auth(req)
        conn.request("PUT", f"/put/{key}", body=body, headers=dict(req.headers.items()))
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"PUT answered HTTP {resp.status}")
    return put


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4M", help="object size (default 4M; nbdbackup's chunks are at most 4 MiB, compressed)")
    ap.add_argument("--mib", type=int, default=512, help="MiB to upload per client (default 512)")
    ap.add_argument("--threads", type=int, default=8, help="uploads in flight (default 8, as nbdbackup)")
    args = ap.parse_args()
    size = parse_size(args.size)
    count = max(1, args.mib * 2**20 // size)
    blobs = [os.urandom(size) for _ in range(8)]  # incompressible, like compressed chunks
    with tempfile.TemporaryDirectory(prefix="nbdb-put-", dir="/var/tmp") as work, SeaweedFS(Path(work)) as server:
        assert server.proc is not None
        server.client().create_bucket(Bucket="put")
        clients = {"boto3, signed payload (nbdbackup)": boto_put(server, True), "boto3, unsigned payload": boto_put(server, False),
                   "minimal client, unsigned payload": raw_put(server)}
        print(f"{count} PUTs of {size / 2**20:g} MiB, {args.threads} in flight, into SeaweedFS on 127.0.0.1")
        for name, put in clients.items():
            put("warm-up", b"x")
            c0, s0, t0 = own_cpu(), cpu_of(server.proc.pid), time.monotonic()
            with cf.ThreadPoolExecutor(args.threads) as pool:
                list(pool.map(lambda i, put=put, name=name: put(f"{name[:5]}/{i}", blobs[i % 8]), range(count)))
            seconds, mib = time.monotonic() - t0, count * size / 2**20
            client, srv = own_cpu() - c0, cpu_of(server.proc.pid) - s0
            print(f"{name:34} {mib / seconds:6.1f} MiB/s; CPU per MiB: client {client / mib * 1000:4.1f} ms, "
                  f"server {srv / mib * 1000:4.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
