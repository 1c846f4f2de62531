"""Prometheus text-format metrics for node_exporter's textfile collector.

One file holds every VM's metrics; each run updates its VM's lines under a
lock and replaces the file atomically, so the collector never reads a part.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .lock import file_lock

METRICS = {
    "nbdbackup_last_run_timestamp_seconds": "When the last backup run of the VM ended (Unix time).",
    "nbdbackup_last_success_timestamp_seconds": "When the last successful backup of the VM ended (Unix time).",
    "nbdbackup_last_exit_code": "Exit code of the last backup run of the VM (0 = success).",
    "nbdbackup_last_duration_seconds": "Duration of the last backup run of the VM.",
    "nbdbackup_last_read_bytes": "Bytes read from the VM's disks by the last successful backup.",
    "nbdbackup_last_stored_bytes": "Bytes added to the repository by the last successful backup.",
}
_LINE = re.compile(r'^(\w+)\{vm="([^"]*)"\} (\S+)$')


@dataclass(frozen=True)
class RunMetrics:
    vm: str
    exit_code: int
    duration: float
    read_bytes: int = 0
    stored_bytes: int = 0


def update(path: Path, run: RunMetrics, *, now: float | None = None) -> None:
    now = time.time() if now is None else now
    with file_lock(path.with_name(path.name + ".lock"), what=f"metrics file {path}", wait=30):
        values = _read(path)
        mine = {
            "nbdbackup_last_run_timestamp_seconds": now,
            "nbdbackup_last_exit_code": run.exit_code,
            "nbdbackup_last_duration_seconds": round(run.duration, 3),
        }
        if run.exit_code == 0:
            mine.update({
                "nbdbackup_last_success_timestamp_seconds": now,
                "nbdbackup_last_read_bytes": run.read_bytes,
                "nbdbackup_last_stored_bytes": run.stored_bytes,
            })
        for name, value in mine.items():
            values.setdefault(name, {})[run.vm] = value
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(render(values))
        os.replace(tmp, path)


def render(values: dict[str, dict[str, float]]) -> str:
    lines = []
    for name, help_text in METRICS.items():
        if not values.get(name):
            continue
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines += [f'{name}{{vm="{vm}"}} {_number(v)}' for vm, v in sorted(values[name].items())]
    return "\n".join(lines) + "\n"


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _read(path: Path) -> dict[str, dict[str, float]]:
    values: dict[str, dict[str, float]] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return values
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and m.group(1) in METRICS:
            values.setdefault(m.group(1), {})[m.group(2)] = float(m.group(3))
    return values
