"""Checkpoint chain maths (pure): which bitmaps to merge, delete plans, validation."""

import pytest

from nbdbackup import chain
from nbdbackup.errors import ChainBroken, CheckpointUnknown
from nbdbackup.records import Bitmap, CheckpointRecord


def bitmap_name(checkpoint):
    return f"nbdbackup.12345678.{checkpoint}"


def rec(name, state="confirmed", chain_id="c1", disks=("vda", "vdb")):
    return CheckpointRecord(name=name, created="2026-01-01T00:00:00Z", chain=chain_id, disks=disks, bitmap=bitmap_name(name), state=state)


def bm(name, *, recording=False, persistent=True, busy=False, inconsistent=False):
    return Bitmap(node="n", name=bitmap_name(name), count=0, recording=recording,
                  persistent=persistent, busy=busy, inconsistent=inconsistent)


RECORDS = [rec("A"), rec("B"), rec("C"), rec("D")]


def sound_bitmaps():
    per_disk = {bitmap_name(n): bm(n, recording=(n == "D")) for n in "ABCD"}
    return {"vda": dict(per_disk), "vdb": dict(per_disk)}


def test_since_chain_is_k_to_newest():
    assert [r.name for r in chain.since_chain(RECORDS, "B")] == ["B", "C", "D"]


def test_resolve_latest_and_unknown():
    assert chain.resolve(RECORDS, "latest").name == "D"
    with pytest.raises(CheckpointUnknown):
        chain.resolve(RECORDS, "Z")
    with pytest.raises(CheckpointUnknown):
        chain.resolve([], "latest")


@pytest.mark.parametrize(
    "name, merge_into, enable",
    [("A", None, False), ("B", "A", False), ("D", "C", True)],
)
def test_delete_plans_follow_the_seed(name, merge_into, enable):
    plan = chain.plan_delete(RECORDS, name)
    assert (plan.remove, plan.merge_into, plan.enable) == (bitmap_name(name), merge_into and bitmap_name(merge_into), enable)


def test_sound_chain_passes():
    chain.check_since(RECORDS, RECORDS[1], sound_bitmaps())


@pytest.mark.parametrize(
    "breakage, words",
    [
        (lambda b: b["vdb"].pop(bitmap_name("C")), "missing on disk vdb"),
        (lambda b: b["vda"].__setitem__(bitmap_name("C"), bm("C", inconsistent=True)), "inconsistent"),
        (lambda b: b["vda"].__setitem__(bitmap_name("B"), bm("B", recording=True)), "should be disabled"),
        (lambda b: b["vda"].__setitem__(bitmap_name("D"), bm("D", recording=False)), "should be recording"),
        (lambda b: b["vda"].__setitem__(bitmap_name("C"), bm("C", persistent=False)), "not persistent"),
        (lambda b: b["vda"].__setitem__(bitmap_name("C"), bm("C", busy=True)), "busy"),
    ],
)
def test_broken_chain_is_refused(breakage, words):
    bitmaps = sound_bitmaps()
    breakage(bitmaps)
    with pytest.raises(ChainBroken, match=words):
        chain.check_since(RECORDS, RECORDS[1], bitmaps)


def test_damage_before_since_does_not_matter():
    bitmaps = sound_bitmaps()
    del bitmaps["vda"][bitmap_name("A")]
    chain.check_since(RECORDS, RECORDS[1], bitmaps)


def test_removed_disk_is_ignored_and_unfinished_checkpoint_refused():
    bitmaps = sound_bitmaps()
    del bitmaps["vdb"]
    chain.check_since(RECORDS, RECORDS[1], bitmaps)
    with pytest.raises(ChainBroken, match="never completed"):
        chain.check_since([*RECORDS[:3], rec("D", state="pending")], RECORDS[1], sound_bitmaps())


def test_a_disabled_bitmap_must_keep_its_recorded_count():
    records = [CheckpointRecord(**{**r.__dict__, "counts": {"vda": 0, "vdb": 0}}) if r.name != "D" else r for r in RECORDS]
    chain.check_since(records, records[1], sound_bitmaps())
    bitmaps = sound_bitmaps()
    bitmaps["vdb"][bitmap_name("C")] = Bitmap(node="n", name=bitmap_name("C"), count=65536,
                                              recording=False, persistent=True, busy=False, inconsistent=False)
    with pytest.raises(ChainBroken, match="changed by another tool"):
        chain.check_since(records, records[1], bitmaps)


@pytest.mark.parametrize(
    "twin, counts, words",
    [(None, None, "missing"), (bm("T", recording=False), (0, 0), "unusable"), (bm("T", recording=True), (65536, 0), "cleared"),
     (bm("T", recording=True), (0, 65536), "cleared")],
)
def test_the_active_bitmap_must_equal_its_twin(twin, counts, words):
    assert chain.twin_problem(RECORDS[-1], "vda", bm("T", recording=True), (4096, 4096)) is None
    assert words in chain.twin_problem(RECORDS[-1], "vda", twin, counts)


def test_assess_shows_another_vm_names_bitmaps_as_foreign():
    records = [rec("A", disks=("vda",))]
    bitmaps = {"vda": {bitmap_name("A"): bm("A", recording=True), bitmap_name("Y1"): bm("Y1", recording=True),
                       bitmap_name("orphan"): bm("orphan")}}
    rows = {r.name: r for r in chain.assess(records, bitmaps, "nbdbackup.12345678.", {bitmap_name("Y1"): "vm3"})}
    assert rows["A"].state == "ok"
    assert rows[bitmap_name("Y1")].state == "foreign" and "VM vm3 of this repository" in rows[bitmap_name("Y1")].problems[0]
    assert rows["orphan"].state == "orphan"


def test_assess_takes_the_state_from_the_problem_not_from_its_words():
    """Names that hold a state's word (a checkpoint 'missing-busy' on disk 'inconsistent') do not change the
    state shown; of several problems the first of missing, inconsistent, busy, altered is shown."""
    records = [rec("missing-busy", disks=("inconsistent", "vdb"))]
    bitmaps = {"inconsistent": {bitmap_name("missing-busy"): bm("missing-busy", recording=True, persistent=False)},
               "vdb": {bitmap_name("missing-busy"): bm("missing-busy", recording=True)}}
    [row] = chain.assess(records, bitmaps, "nbdbackup.12345678.")
    assert (row.state, row.usable, len(row.problems)) == ("altered", False, 1) and "not persistent" in row.problems[0]
    del bitmaps["vdb"][bitmap_name("missing-busy")]
    [row] = chain.assess(records, bitmaps, "nbdbackup.12345678.")
    assert row.state == "missing" and len(row.problems) == 2
