"""A synchronous QMP session: the only module that imports qemu.qmp.

qemu.qmp is asyncio and alpha (pinned in pyproject.toml); this adapter runs it
on a private event loop and turns its errors into nbdbackup's.  Raw QMP dicts
stay inside the adapter modules (qmp, vm, pointintime) that speak QMP.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError

from .config import env_seconds
from .errors import QEMUCommandFailed, VMUnreachable

log = logging.getLogger(__name__)

# A held monitor accepts the connection but never greets: wait this long.
CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0


class QMPSession:
    """One connection to a VM's QMP monitor.  Use as a context manager."""

    def __init__(self, socket_path: Path, *, connect_timeout: float | None = None, guest_agent: bool = False) -> None:
        """guest_agent: the peer is qemu-guest-agent, which speaks QMP without greeting or negotiation.
        connect_timeout: default $NBDBACKUP_CONNECT_TIMEOUT or CONNECT_TIMEOUT seconds."""
        self.socket_path = Path(socket_path)
        self.connect_timeout = connect_timeout or env_seconds("NBDBACKUP_CONNECT_TIMEOUT", CONNECT_TIMEOUT)
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient("nbdbackup")
        if guest_agent:
            self._client.await_greeting = False
            self._client.negotiate = False
        # One listener for the whole session, registered before any command,
        # so no event that a command triggers can be missed.
        self._events = EventListener()
        self._client.register_listener(self._events)
        self._pending: list[dict] = []
        self.lost = False  # the connection broke (QEMU exited?): later commands fail at once

    # -- lifecycle -------------------------------------------------------

    def __enter__(self) -> QMPSession:
        try:
            self.connect()
        except BaseException:
            # No __exit__ follows: close the loop now, or it is collected at exit
            # and prints "Exception ignored ... Invalid file descriptor" on stderr.
            self._loop.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        path = self.socket_path
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise VMUnreachable(f"QMP socket {path} does not exist", hint="is the VM running, with -qmp unix:PATH,server=on,wait=off?") from None
        except PermissionError:
            raise VMUnreachable(f"QMP socket {path} is not accessible", hint="run as the user that owns the VM") from None
        if not stat.S_ISSOCK(mode):
            raise VMUnreachable(f"{path} is not a socket", hint="give the path of the VM's QMP monitor socket")
        try:
            self._run(self._client.connect(str(path)), self.connect_timeout)
        except TimeoutError:
            self._abandon()
            raise VMUnreachable(
                f"QMP socket {path} did not answer within {self.connect_timeout:g}s",
                hint="another client probably holds this monitor; give nbdbackup a -qmp socket of its own",
            ) from None
        except (ConnectError, QMPError, OSError) as exc:
            self._abandon()
            raise VMUnreachable(f"cannot speak QMP on {path}: {_describe(exc)}", hint="is this a QEMU QMP monitor socket (not HMP)?") from None

    def close(self) -> None:
        try:
            self._run(self._client.disconnect(), 10.0)
        except Exception as exc:  # closing must never mask the real error
            log.debug("QMP disconnect: %s", exc)
        finally:
            self._loop.close()

    def _abandon(self) -> None:
        try:
            self._run(self._client.disconnect(), 2.0)
        except Exception:
            pass

    def _run(self, coro: Any, timeout: float | None) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))

    # -- commands --------------------------------------------------------

    def execute(self, command: str, arguments: dict | None = None, *, timeout: float = COMMAND_TIMEOUT) -> Any:
        """Run one QMP command; QEMU's refusal becomes QEMUCommandFailed."""
        if self.lost:
            raise VMUnreachable(f"cannot send {command}: the QMP connection was lost", hint="did QEMU exit?")
        log.debug("QMP -> %s %s", command, arguments or "")
        try:
            result = self._run(self._client.execute(command, arguments), timeout)
        except ExecuteError as exc:
            description = exc.error.error.desc
            log.debug("QMP <- error %s: %s", exc.error_class, description)
            raise QEMUCommandFailed(command, exc.error_class, description) from None
        except TimeoutError:
            raise VMUnreachable(f"QEMU did not answer {command} within {timeout:g}s") from None
        except (QMPError, OSError, EOFError) as exc:
            self.lost = True
            raise VMUnreachable(f"lost the QMP connection during {command}: {_describe(exc)}", hint="did QEMU exit?") from None
        log.debug("QMP <- %s", result)
        return result

    def peer_user(self) -> tuple[int, int] | None:
        """(uid, gid) the QEMU process runs as now (SO_PEERCRED gives its pid; -runas may
        have changed its user after it created the socket), or None if unknown."""
        writer = getattr(self._client, "_writer", None)  # qemu.qmp keeps its stream here (0.0.x)
        sock = writer.get_extra_info("socket") if writer is not None else None
        if sock is None:
            return None
        try:
            pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
            return int(fields["Uid"].split()[1]), int(fields["Gid"].split()[1])  # effective ids
        except (OSError, KeyError, ValueError, IndexError):
            return None

    def alive(self) -> bool:
        """Whether QEMU still answers (used to explain a failure)."""
        try:
            self.execute("query-status", timeout=5)
            return True
        except VMUnreachable:
            return False

    def transaction(self, actions: Iterable[tuple[str, dict]]) -> None:
        """Run actions atomically: all of them or, on any error, none."""
        self.execute("transaction", {"actions": [{"type": t, "data": d} for t, d in actions]})

    # -- events ----------------------------------------------------------

    def wait_event(self, match: Callable[[dict], bool], timeout: float = COMMAND_TIMEOUT) -> dict:
        """Wait for (or find among those already received) an event that matches."""
        for i, event in enumerate(self._pending):
            if match(event):
                return self._pending.pop(i)

        async def next_match() -> dict:
            while True:
                msg = await self._events.get()
                event = {"event": msg["event"], "data": dict(msg.get("data", {}))}
                if match(event):
                    return event
                self._pending.append(event)

        try:
            return self._run(next_match(), timeout)
        except TimeoutError:
            raise VMUnreachable(f"QEMU did not send the expected event within {timeout:g}s") from None



def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]
