"""Benchmark data: a qcow2 image with a realistic mix of content, built offline and cached.

Layout (deterministic for a given size, data amount and seed): extents of 64 KiB..64 MiB
(log-uniform, 64 KiB aligned) separated by holes of random length. Each extent is one of

    text      natural-language-like lines (words drawn with their frequency in the
              system's license texts), about 3x compressible by zstd -3
    binary    slices of the programs in /usr/bin, about 2-3x compressible
    random    incompressible bytes
    zerodata  allocated qcow2 clusters holding zeroes (a guest that wrote zeroes)
    zeroclus  qcow2 zero clusters (`write -z`: a guest that discarded / zeroed)

Holes are unallocated clusters. The image is written as a sparse raw file with os.pwrite,
converted with `qemu-img convert -O qcow2` (holes and zero runs stay unallocated), then the
two zero kinds are applied with qemu-io. The image and a JSON sidecar with its statistics
are cached in the work directory under a name made of the parameters.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

GEN_VERSION = 1  # bump when the layout or content recipe changes (invalidates the cache)
ALIGN = 64 * 1024
MIN_EXTENT = 64 * 1024
MAX_EXTENT = 64 * 1024 * 1024
PIECE = 4 * 1024 * 1024
TEXT_POOL = 16 * 1024 * 1024
BINARY_POOL = 256 * 1024 * 1024
KINDS = {"text": 0.30, "binary": 0.25, "random": 0.25, "zerodata": 0.10, "zeroclus": 0.10}

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'4G', '512M', '1T', '65536' (binary units; KiB/MiB/GiB spellings accepted)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {text!r} (use e.g. 512M, 4G, 1T)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}".replace(".0", "")
        n /= 1024
    return str(n)


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Image:
    path: Path
    size: int
    stats: dict


def build_image(workdir: Path, size: int, data: int, seed: int = 1) -> Image:
    """The cached image for (size, data, seed), built if missing."""
    if size % ALIGN:
        raise ValueError(f"disk size must be a multiple of 64 KiB, not {size}")
    if data > size:
        raise ValueError(f"--data ({human(data)}) is larger than the disk ({human(size)})")
    workdir.mkdir(parents=True, exist_ok=True)
    stem = f"img-v{GEN_VERSION}-{size}-{data}-s{seed}"
    path = workdir / f"{stem}.qcow2"
    meta = workdir / f"{stem}.json"
    if path.exists() and meta.exists():
        stats = json.loads(meta.read_text())
        log(f"using cached image {path} ({human(size)} virtual, {human(data)} data)")
        return Image(path, size, stats)
    log(f"building image {path}: {human(size)} virtual, {human(data)} data (cached for reruns)")
    t0 = time.monotonic()
    rng = random.Random(seed)
    extents = layout(rng, size, data)
    raw = workdir / f".{stem}.raw.tmp"
    tmp = workdir / f".{stem}.qcow2.tmp"
    try:
        totals = _write_raw(raw, size, extents, rng)
        _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536", "-S", "4k",
              str(raw), str(tmp)])
        raw.unlink()
        _apply_zero_kinds(tmp, extents)
        stats = {
            "virtual_size": size,
            "data_target": data,
            "seed": seed,
            "extents": len(extents),
            "bytes_by_kind": totals,
            **allocation(tmp),
            "build_seconds": round(time.monotonic() - t0, 1),
        }
        os.replace(tmp, path)
        meta.write_text(json.dumps(stats, indent=1) + "\n")
    finally:
        raw.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    log(f"built in {time.monotonic() - t0:.1f}s: {stats['extents']} extents, "
        + ", ".join(f"{k} {human(v)}" for k, v in stats["bytes_by_kind"].items()))
    return Image(path, size, stats)


def layout(rng: random.Random, size: int, data: int) -> list[tuple[int, int, str]]:
    """(offset, length, kind) extents holding `data` bytes in total, separated by holes."""
    units = data // ALIGN
    targets = {k: int(units * w) for k, w in KINDS.items()}
    targets["text"] += units - sum(targets.values())
    remaining = dict(targets)
    sizes: list[tuple[int, str]] = []
    lo, hi = math.log(MIN_EXTENT // ALIGN), math.log(MAX_EXTENT // ALIGN)
    while any(remaining.values()):
        kinds = [k for k, v in remaining.items() if v > 0]
        kind = rng.choices(kinds, weights=[remaining[k] for k in kinds])[0]
        n = min(remaining[kind], max(1, int(math.exp(rng.uniform(lo, hi)))))
        remaining[kind] -= n
        sizes.append((n, kind))
    rng.shuffle(sizes)
    hole_units = (size - data) // ALIGN
    weights = [rng.expovariate(1.0) for _ in range(len(sizes) + 1)]
    scale = hole_units / sum(weights) if weights else 0
    gaps = [int(w * scale) for w in weights]
    gaps[-1] += hole_units - sum(gaps)
    extents = []
    pos = 0
    for (n, kind), gap in zip(sizes, gaps[:-1], strict=True):
        pos += gap * ALIGN
        extents.append((pos, n * ALIGN, kind))
        pos += n * ALIGN
    return extents


def _vocabulary() -> tuple[list[str], list[int]]:
    counts: Counter[str] = Counter()
    sources = sorted(Path("/usr/share/common-licenses").glob("*"))
    sources += sorted(Path("/usr/share/doc").glob("*/copyright"))[:400]
    for p in sources:
        try:
            if p.is_file() and not p.is_symlink():
                counts.update(re.findall(r"[A-Za-z][a-z]{1,14}", p.read_text(errors="replace")))
        except OSError:
            continue
    if len(counts) < 500:  # no license texts: words from syllables, Zipf weights
        rng = random.Random(7)
        syll = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "an", "el", "or", "us", "ber", "con", "der", "ing"]
        words = sorted({"".join(rng.choices(syll, k=rng.randint(1, 4))) for _ in range(5000)})
        return words, [max(1, 10000 // (i + 1)) for i in range(len(words))]
    words = sorted(counts)
    return words, [counts[w] for w in words]


def _text_pool(rng: random.Random) -> bytes:
    words, weights = _vocabulary()
    n = TEXT_POOL // 6
    toks = rng.choices(words, weights=weights, k=n)
    lines = (" ".join(toks[i:i + 11]) for i in range(0, n, 11))
    pool = "\n".join(lines).encode()
    while len(pool) < TEXT_POOL:
        pool += pool
    return pool[:TEXT_POOL]


def _binary_pool() -> bytes:
    parts, total = [], 0
    for p in sorted(Path("/usr/bin").iterdir()):
        if total >= BINARY_POOL:
            break
        try:
            if p.is_symlink() or not p.is_file():
                continue
            blob = p.read_bytes()
        except OSError:
            continue
        parts.append(blob)
        total += len(blob)
    pool = b"".join(parts)[:BINARY_POOL]
    if len(pool) < 16 * 1024 * 1024:
        raise RuntimeError("/usr/bin holds less than 16 MiB of programs to use as binary data")
    return pool


def _write_raw(raw: Path, size: int, extents: list[tuple[int, int, str]], rng: random.Random) -> dict[str, int]:
    text = _text_pool(rng)
    binary = _binary_pool()
    totals = {k: 0 for k in KINDS}
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for offset, length, kind in extents:
            totals[kind] += length
            if kind in ("zerodata", "zeroclus"):
                continue  # zero in the raw file (a hole); made allocated / zero clusters later
            bin_pos = rng.randrange(len(binary))
            done = 0
            while done < length:
                n = min(PIECE, length - done)
                if kind == "random":
                    piece = rng.randbytes(n)
                elif kind == "text":
                    blocks = []
                    for _ in range(0, n, ALIGN):
                        o = rng.randrange(len(text) - ALIGN)
                        blocks.append(text[o:o + ALIGN])
                    piece = b"".join(blocks)[:n]
                else:  # binary: a contiguous run of the pool, like files laid out on disk
                    piece = binary[bin_pos:bin_pos + n]
                    while len(piece) < n:
                        piece += binary[:n - len(piece)]
                    bin_pos = (bin_pos + n) % len(binary)
                view = memoryview(piece)
                pos = offset + done
                while view:
                    w = os.pwrite(fd, view, pos)
                    view, pos = view[w:], pos + w
                done += n
    finally:
        os.close(fd)
    return totals


def _apply_zero_kinds(image: Path, extents: list[tuple[int, int, str]]) -> None:
    cmds = []
    for offset, length, kind in extents:
        for start in range(offset, offset + length, 32 * 1024 * 1024):
            n = min(32 * 1024 * 1024, offset + length - start)
            if kind == "zerodata":
                cmds.append((f"write -P 0 {start} {n}", start, n))
            elif kind == "zeroclus":
                cmds.append((f"write -z {start} {n}", start, n))
    for i in range(0, len(cmds), 200):
        batch = cmds[i:i + 200]
        argv = ["qemu-io", "-f", "qcow2"]
        for c, _, _ in batch:
            argv += ["-c", c]
        out = _run(argv + [str(image)])
        for _, start, n in batch:
            if f"wrote {n}/{n} bytes at offset {start}" not in out:
                raise RuntimeError(f"qemu-io did not confirm a write at {start}+{n}: {out[-500:]}")


def allocation(image: Path, force_share: bool = False) -> dict[str, int]:
    """From `qemu-img map`: bytes that are data (allocated, not a zero cluster), zero clusters, holes."""
    argv = ["qemu-img", "map", "--output=json", "-f", "qcow2"]
    if force_share:
        argv.append("-U")
    entries = json.loads(_run(argv + [str(image)]))
    data = sum(e["length"] for e in entries if e.get("data") and not e.get("zero"))
    zero_alloc = sum(e["length"] for e in entries if e.get("zero") and e.get("data"))
    unalloc_zero = sum(e["length"] for e in entries if e.get("zero") and not e.get("data"))
    return {
        "data_bytes": data,  # what base:allocation reports as data (what a backup must read)
        "zero_allocated_bytes": zero_alloc,
        "zero_or_hole_bytes": unalloc_zero,
        "file_bytes": os.stat(image).st_blocks * 512,
    }


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc.stdout


def build_in_subprocess(workdir: Path, size: int, data: int, seed: int = 1) -> Image:
    """build_image in a child process, so the caller's memory stays small (its children's
    ru_maxrss starts from the parent's RSS at fork time)."""
    proc = subprocess.run([sys.executable, __file__, str(workdir), str(size), str(data), str(seed)],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the {human(size)} image failed (exit {proc.returncode})")
    info = json.loads(proc.stdout)
    return Image(Path(info["path"]), info["size"], info["stats"])


if __name__ == "__main__":
    img = build_image(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    print(json.dumps({"path": str(img.path), "size": img.size, "stats": img.stats}))
