"""Index codec and overlay: the maths that makes every backup a complete restore point."""

import random

import pytest

from nbdbackup.errors import RepositoryDamaged
from nbdbackup.records import Extent, IndexEntry
from nbdbackup.repository import index

A, B, C = b"a" * 32, b"b" * 32, b"c" * 32


def materialise(entries, size, chunks):
    """The disk an index describes, given chunk contents."""
    disk = bytearray(size)
    for e in entries:
        disk[e.offset:e.end] = chunks[e.chunk][e.chunk_offset:e.chunk_offset + e.length]
    return bytes(disk)


def test_round_trip():
    entries = [IndexEntry(0, 4096, A), IndexEntry(65536, 100, B, 7)]
    size, back = index.decode(index.encode(1 << 20, entries), "t")
    assert (size, back) == (1 << 20, entries)


@pytest.mark.parametrize("damage", ["truncate", "flip", "extend"])
def test_damage_is_detected(damage):
    blob = bytearray(index.encode(1 << 20, [IndexEntry(0, 4096, A)]))
    if damage == "truncate":
        blob = blob[:-5]
    elif damage == "flip":
        blob[40] ^= 1
    else:
        blob += b"\0"
    with pytest.raises(RepositoryDamaged):
        index.decode(bytes(blob), "t")


def test_overlapping_entries_are_refused():
    with pytest.raises(ValueError):
        index.encode(100, [IndexEntry(0, 10, A), IndexEntry(5, 10, B)])


def test_overlay_splits_straddling_entries():
    old = [IndexEntry(0, 100, A)]
    new = [IndexEntry(40, 10, B)]
    got = index.overlay(old, [Extent(30, 30)], new, 100)
    assert got == [IndexEntry(0, 30, A, 0), IndexEntry(40, 10, B, 0), IndexEntry(60, 40, A, 60)]


def test_overlay_drops_ranges_past_a_shrunk_disk():
    assert index.overlay([IndexEntry(0, 100, A)], [], [], 50) == [IndexEntry(0, 50, A, 0)]


def test_overlay_matches_a_byte_model():
    """Random old indexes and regions: overlay equals writing the new data over the old disk."""
    rng = random.Random(7)
    size = 4096
    for _ in range(300):
        chunks = {}
        old = []
        pos = 0
        while pos < size:
            pos += rng.randrange(0, 300)
            n = min(rng.randrange(1, 400), size - pos)
            if n <= 0:
                break
            cid = rng.randbytes(32)
            chunks[cid] = rng.randbytes(n + 50)
            old.append(IndexEntry(pos, n, cid, rng.randrange(0, 50)))
            pos += n
        regions, new = [], []
        pos = 0
        while pos < size:
            pos += rng.randrange(1, 500)
            n = min(rng.randrange(1, 300), size - pos)
            if n <= 0:
                break
            regions.append(Extent(pos, n))
            if rng.random() < 0.7:  # a region with data; else it became zero
                cid = rng.randbytes(32)
                chunks[cid] = rng.randbytes(n)
                new.append(IndexEntry(pos, n, cid))
            pos += n
        expected = bytearray(materialise(old, size, chunks))
        for r in regions:
            expected[r.offset:r.end] = bytes(r.length)
        for e in new:
            expected[e.offset:e.end] = chunks[e.chunk][:e.length]
        got = index.overlay(old, regions, new, size)
        assert materialise(got, size, chunks) == bytes(expected)
