"""Top functions of a Go CPU profile (pprof format), e.g. of the test S3 server (SeaweedFS):

    NBDBACKUP_WEED_CPUPROFILE=/tmp/weed.prof flock /work/bench.lock .venv/bin/python scripts/bench_s3_put.py
    .venv/bin/python scripts/pprof_top.py /tmp/weed.prof [-n 25] [--focus PutObjectHandler] [--callers crypto/md5.block]

The weed binary is stripped (perf shows no names), but Go's own profiler writes function names
into the profile: a gzip'd profile.proto (github.com/google/pprof/proto/profile.proto), read here
with a minimal protobuf reader.  Prints the CPU seconds of the profile, then the functions by flat
share (CPU spent in the function itself) and by cumulative share (in it or what it called);
--callers FUNC shows the call chains that lead to FUNC's flat samples instead.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of one protobuf message."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _ints(wire: int, value: int | bytes) -> list[int]:
    """A repeated integer field: one varint, or a packed run of them."""
    if wire == 0:
        return [value]  # type: ignore[list-item]
    out, i = [], 0
    assert isinstance(value, bytes)
    while i < len(value):
        v, i = _varint(value, i)
        out.append(v)
    return out


@dataclass
class Profile:
    samples: list[tuple[list[str], int]]  # (stack, innermost frame first; CPU nanoseconds)

    @property
    def total(self) -> int:
        return sum(v for _, v in self.samples)


def load(path: Path) -> Profile:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    strings: list[str] = []
    functions: dict[int, int] = {}  # function id -> name's string index
    locations: dict[int, list[int]] = {}  # location id -> function ids, innermost (inlined) first
    raw: list[tuple[list[int], list[int]]] = []
    for number, _wire, value in _fields(data):
        if number == 6:  # string_table
            strings.append(value.decode())  # type: ignore[union-attr]
        elif number == 2:  # sample: location_id (1), value (2)
            locs: list[int] = []
            values: list[int] = []
            for n, w, v in _fields(value):  # type: ignore[arg-type]
                if n == 1:
                    locs += _ints(w, v)
                elif n == 2:
                    values += _ints(w, v)
            raw.append((locs, values))
        elif number == 4:  # location: id (1), line (4) = {function_id (1), line (2)}
            lid, funcs = 0, []
            for n, _w, v in _fields(value):  # type: ignore[arg-type]
                if n == 1:
                    lid = v  # type: ignore[assignment]
                elif n == 4:
                    funcs.append(next((fv for fn, _, fv in _fields(v) if fn == 1), 0))  # type: ignore[arg-type]
            locations[lid] = funcs  # type: ignore[assignment]
        elif number == 5:  # function: id (1), name (2)
            fields = {n: v for n, _w, v in _fields(value)}  # type: ignore[arg-type]
            functions[fields.get(1, 0)] = fields.get(2, 0)  # type: ignore[index,assignment]
    samples = []
    for locs, values in raw:
        stack = [strings[functions.get(fid, 0)] for lid in locs for fid in locations.get(lid, [])]
        samples.append((stack, values[-1]))  # the last sample type of a CPU profile: cpu nanoseconds
    return Profile(samples)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", type=Path)
    ap.add_argument("-n", type=int, default=25, help="rows per table (default 25)")
    ap.add_argument("--focus", default="", help="only samples with a frame whose name contains this")
    ap.add_argument("--callers", metavar="FUNC", help="call chains leading to FUNC's own samples (FUNC: the full name)")
    ap.add_argument("--depth", type=int, default=8, help="frames per call chain with --callers (default 8)")
    args = ap.parse_args(argv)
    prof = load(args.profile)
    samples = [(s, v) for s, v in prof.samples if not args.focus or any(args.focus in f for f in s)]
    total = sum(v for _, v in samples) or 1
    print(f"{total / 1e9:.2f} CPU seconds in {len(samples)} stacks" + (f" with a frame matching {args.focus!r}" if args.focus else ""))
    if args.callers:
        chains: collections.Counter[str] = collections.Counter()
        for stack, v in samples:
            if stack and stack[0] == args.callers:
                chains[" < ".join(f.rsplit("/", 1)[-1] for f in stack[1:args.depth + 1])] += v
        for chain, v in chains.most_common(args.n):
            print(f"{v / total * 100:5.1f}%  {chain}")
        return 0
    flat: collections.Counter[str] = collections.Counter()
    cum: collections.Counter[str] = collections.Counter()
    for stack, v in samples:
        if stack:
            flat[stack[0]] += v
        for name in set(stack):
            cum[name] += v
    for title, counter in (("flat", flat), ("cumulative", cum)):
        print(f"-- {title}")
        for name, v in counter.most_common(args.n):
            print(f"{v / total * 100:5.1f}% {v / 1e9:7.2f}s  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
