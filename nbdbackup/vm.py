"""What a running VM has: its disks and their dirty bitmaps, read over QMP."""

from __future__ import annotations

import logging

from .errors import VMUnsuitable
from .names import check_name
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


def list_disks(session: QMPSession) -> list[Disk]:
    """Every block device with a medium, keyed by its guest device id."""
    nodes = {n["node-name"]: n for n in session.execute("query-named-block-nodes", {"flat": True})}
    children = _file_children(session) if any(n.get("drv") in FILTER_DRIVERS for n in nodes.values()) else {}
    disks = []
    for blk in session.execute("query-block"):
        inserted = blk.get("inserted")
        if not inserted:
            continue
        disk_id = disk_id_of(blk.get("qdev", ""), blk.get("device", ""))
        if disk_id is None:
            log.warning("skipping a disk without a device id (%s)", inserted.get("node-name"))
            continue
        check_name("disk", disk_id)
        node = inserted["node-name"]
        while nodes.get(node, {}).get("drv") in FILTER_DRIVERS and node in children:
            node = children[node]
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


def qcow2_disks(session: QMPSession, only: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> list[Disk]:
    """The disks that can carry checkpoints; VMUnsuitable when there are none."""
    disks = list_disks(session)
    by_id = {d.id: d for d in disks}
    for wanted in only:
        if wanted not in by_id:
            raise VMUnsuitable(f"the VM has no disk {wanted!r}", hint=f"its disks are: {', '.join(sorted(by_id)) or 'none'}")
    chosen = [d for d in disks if (not only or d.id in only) and d.id not in exclude]
    usable = [d for d in chosen if d.format == "qcow2"]
    for d in chosen:
        if d.format != "qcow2":
            log.warning("skipping disk %s: it is %s, and checkpoints need qcow2", d.id, d.format)
    if not usable:
        raise VMUnsuitable("the VM has no qcow2 disk to back up", hint="nbdbackup needs qcow2 images, which can hold persistent dirty bitmaps")
    return usable


def node_bitmaps(session: QMPSession) -> dict[str, list[Bitmap]]:
    """Named dirty bitmaps per node.  A running job's own bitmap has no name and is left out."""
    result: dict[str, list[Bitmap]] = {}
    for node in session.execute("query-named-block-nodes", {"flat": True}):
        bitmaps = []
        for b in node.get("dirty-bitmaps", []):
            if "name" not in b:
                continue
            bitmaps.append(
                Bitmap(
                    node=node["node-name"],
                    name=b["name"],
                    granularity=b["granularity"],
                    count=b["count"],
                    recording=b.get("recording", True),
                    persistent=b.get("persistent", False),
                    busy=b.get("busy", False),
                    inconsistent=b.get("inconsistent", False),
                )
            )
        result[node["node-name"]] = bitmaps
    return result



def _file_children(session: QMPSession) -> dict[str, str]:
    """node name -> node name of its 'file' child, from the block graph."""
    graph = session.execute("x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    return {names[e["parent"]]: names[e["child"]] for e in graph["edges"] if e["name"] == "file" and e["parent"] in names}
