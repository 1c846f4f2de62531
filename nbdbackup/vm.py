"""What a running VM has: its disks and their dirty bitmaps, read over QMP;
and the QMP vocabulary that changes those bitmaps (transaction actions)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import NbdBackupError, UsageError, VMUnsuitable
from .names import GRANULARITY, check_name
from .qmp import QMPSession
from .records import Bitmap, Disk

log = logging.getLogger(__name__)

# Filters that may sit between a device and its format node; we look through them.
FILTER_DRIVERS = {"throttle", "copy-on-read", "compress", "blklogwrites", "copy-before-write", "snapshot-access"}


def disk_id_of(qdev: str, device: str) -> str | None:
    """The guest device id: /machine/peripheral/vda/virtio-backend -> vda."""
    parts = qdev.strip("/").split("/")
    if len(parts) >= 3 and parts[:2] == ["machine", "peripheral"]:
        return parts[2]
    if qdev and "/" not in qdev:
        return qdev
    return device or None


@dataclass(frozen=True)
class BlockNodes:
    """QEMU's named block nodes at one moment (one query-named-block-nodes answer).

    A run reads its disks, their bitmaps and any leftovers of an interrupted run
    from one snapshot; it takes a new one only after it changed something."""

    nodes: tuple[dict, ...]

    def names(self) -> list[str]:
        return [n["node-name"] for n in self.nodes]

    def bitmaps(self) -> dict[str, list[Bitmap]]:
        """Named dirty bitmaps per node.  A running job's own bitmap has no name and is left out."""
        return {node["node-name"]: [_bitmap(node["node-name"], b) for b in node.get("dirty-bitmaps", []) if "name" in b]
                for node in self.nodes}


def block_nodes(session: QMPSession) -> BlockNodes:
    return BlockNodes(tuple(session.execute("query-named-block-nodes", {"flat": True})))


def list_disks(session: QMPSession, snapshot: BlockNodes | None = None) -> list[Disk]:
    """Every block device with a medium, keyed by its guest device id (snapshot: the nodes, if already read)."""
    nodes = {n["node-name"]: n for n in (snapshot or block_nodes(session)).nodes}
    disks = []
    for blk in session.execute("query-block"):
        inserted = blk.get("inserted")
        if not inserted:
            continue
        disk_id = disk_id_of(blk.get("qdev", ""), blk.get("device", ""))
        if disk_id is None:
            log.warning("skipping a disk without a device id (%s)", inserted.get("node-name"))
            continue
        node = _below_filters(inserted, nodes)
        info = nodes.get(node, inserted)
        image = info.get("image", {})
        disks.append(
            Disk(
                id=disk_id,
                node=node,
                size=int(image.get("virtual-size", 0)),
                format=info.get("drv", image.get("format", "?")),
                filename=info.get("file", ""),
            )
        )
    return disks


def qcow2_disks(session: QMPSession, only: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                snapshot: BlockNodes | None = None) -> list[Disk]:
    """The disks that can carry checkpoints; VMUnsuitable when there are none."""
    disks = list_disks(session, snapshot)
    by_id = {d.id: d for d in disks}
    for wanted in only:
        if wanted not in by_id:
            raise VMUnsuitable(f"the VM has no disk {wanted!r}", hint=f"its disks are: {', '.join(sorted(by_id)) or 'none'}")
    chosen = [d for d in disks if (not only or d.id in only) and d.id not in exclude]
    for d in chosen:
        try:
            check_name("disk", d.id)
        except UsageError as exc:  # possible with JSON -device or device_add, which take any id
            raise VMUnsuitable(f"the VM's disk id {d.id!r} cannot name a disk in the repository ({exc.message})",
                               hint="give the device an id of letters, digits, '.', '_' and '-' (at most 64 characters), "
                                    "or leave the disk out with exclude = [...] in the config file") from None
    usable = [d for d in chosen if d.format == "qcow2"]
    for d in chosen:
        if d.format != "qcow2":
            log.warning("skipping disk %s: it is %s, and checkpoints need qcow2", d.id, d.format)
    if not usable:
        raise VMUnsuitable("the VM has no qcow2 disk to back up", hint="nbdbackup needs qcow2 images, which can hold persistent dirty bitmaps")
    return usable


def qemu_identity(session: QMPSession) -> str:
    """How the VM calls itself (-name, -uuid), for messages: "QEMU (-name vm3)", or "QEMU"."""
    try:
        name = session.execute("query-name").get("name")
        uuid = session.execute("query-uuid").get("UUID", "")
    except NbdBackupError:
        return "QEMU"
    parts = ([f"-name {name}"] if name else []) + ([f"-uuid {uuid}"] if uuid.strip("0-") else [])
    return f"QEMU ({', '.join(parts)})" if parts else "QEMU"


def node_bitmaps(session: QMPSession) -> dict[str, list[Bitmap]]:
    """Named dirty bitmaps per node, read now."""
    return block_nodes(session).bitmaps()


def _bitmap(node: str, b: dict) -> Bitmap:
    return Bitmap(node=node, name=b["name"], count=b["count"], recording=b.get("recording", True),
                  persistent=b.get("persistent", False), busy=b.get("busy", False), inconsistent=b.get("inconsistent", False))


def _below_filters(inserted: dict, nodes: dict[str, dict]) -> str:
    """The node under any filters on top of a disk: where its bitmaps live.

    Stable QMP only (no x-debug-query-block-graph): query-block shows the
    filtered child's image as the filter's backing-image; the named node with
    that image's format and file name is the one below."""
    top = inserted["node-name"]
    if nodes.get(top, {}).get("drv") not in FILTER_DRIVERS:
        return top
    image = inserted.get("image", {})
    while image.get("format") in FILTER_DRIVERS and "backing-image" in image:
        image = image["backing-image"]
    below = [n["node-name"] for n in nodes.values()
             if n.get("drv") == image.get("format") and n.get("file") == image.get("filename") and n.get("drv") not in FILTER_DRIVERS]
    return below[0] if len(below) == 1 else top  # ambiguous: left as is (skipped later as not qcow2)


# -- Transaction actions on dirty bitmaps (QMP's block-dirty-bitmap-*) ----------

Action = tuple[str, dict]


def bitmap_add(node: str, name: str, *, persistent: bool = True, disabled: bool = False) -> Action:
    args = {"node": node, "name": name, "persistent": persistent, "granularity": GRANULARITY}
    if disabled:
        args["disabled"] = True
    return ("block-dirty-bitmap-add", args)


def bitmap_remove(node: str, name: str) -> Action:
    return ("block-dirty-bitmap-remove", {"node": node, "name": name})


def bitmap_clear(node: str, name: str) -> Action:
    return ("block-dirty-bitmap-clear", {"node": node, "name": name})


def bitmap_enable(node: str, name: str) -> Action:
    return ("block-dirty-bitmap-enable", {"node": node, "name": name})


def bitmap_disable(node: str, name: str) -> Action:
    return ("block-dirty-bitmap-disable", {"node": node, "name": name})


def bitmap_merge(node: str, target: str, sources: Sequence[str] | Sequence[tuple[str, str]]) -> Action:
    """Merge sources (names on node, or (node, name) pairs elsewhere) into target on node."""
    bitmaps = [s if isinstance(s, str) else {"node": s[0], "name": s[1]} for s in sources]
    return ("block-dirty-bitmap-merge", {"node": node, "target": target, "bitmaps": bitmaps})
