"""A synchronous QMP session: the only module that imports qemu.qmp.

qemu.qmp is asyncio and alpha (pinned in pyproject.toml); this adapter runs it
on a private event loop and turns its errors into nbdbackup's.  Raw QMP dicts
stay inside the adapter modules (qmp, vm, pointintime) that speak QMP.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import socket
import stat
import struct
import time
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
# A free QMP monitor greets within milliseconds of accepting a connection: after this
# long without a greeting, find out why (held by another client, or not a monitor).
PROBE_SECONDS = 1.0


class _Client(QMPClient):
    """QMPClient whose message hooks pretty-print a message for the debug log only when that
    log is on: qemu.qmp 0.0.x formats every message it sends and receives (json.dumps with
    indent, milliseconds for a query-named-block-nodes answer) even when nothing logs it.
    These hooks are there to be overridden (qemu.qmp.protocol.AsyncProtocol)."""

    def _cb_outbound(self, msg: Any) -> Any:
        return super()._cb_outbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    def _cb_inbound(self, msg: Any) -> Any:
        return super()._cb_inbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg


class QMPSession:
    """One connection to a VM's QMP monitor.  Use as a context manager."""

    def __init__(self, socket_path: Path, *, connect_timeout: float | None = None, guest_agent: bool = False) -> None:
        """guest_agent: the peer is qemu-guest-agent, which speaks QMP without greeting or negotiation.
        connect_timeout: default $NBDBACKUP_CONNECT_TIMEOUT or CONNECT_TIMEOUT seconds."""
        self.socket_path = Path(socket_path)
        self.connect_timeout = connect_timeout or env_seconds("NBDBACKUP_CONNECT_TIMEOUT", CONNECT_TIMEOUT)
        self._loop = asyncio.new_event_loop()
        self._client = _Client("nbdbackup")
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
        target: str | socket.socket = str(path)
        if not self._client.await_greeting:  # the guest agent says nothing until asked
            timeout = self.connect_timeout
        else:
            started = time.monotonic()
            target = open_monitor(path, self.connect_timeout)  # greeted: the monitor is ours
            timeout = max(1.0, self.connect_timeout - (time.monotonic() - started))
        try:
            self._run(self._client.connect(target), timeout)
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
                data: Any = msg.get("data", {})  # qemu.qmp's Message: values typed object
                event = {"event": msg["event"], "data": dict(data)}
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


# -- Opening a monitor socket: say what it is when it is not a free QMP monitor ----------

HELD_HINT = "wait until it is done, or give nbdbackup a QMP monitor of its own (QEMU accepts several -qmp options)"


def open_monitor(path: Path, timeout: float) -> socket.socket:
    """A connected socket on which QEMU's QMP greeting is waiting to be read (not consumed).

    VMUnreachable, saying which, when the socket is held by another client (QEMU
    serves one client per monitor; others wait in the listen queue), is the human
    monitor (HMP), is a guest agent's socket, or does not speak QMP at all."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _connect(sock, path)
        deadline = time.monotonic() + timeout
        if not _readable(sock, min(PROBE_SECONDS, timeout)):
            queue = _listen_queue(path, sock)
            if queue == "accepted" and not _readable(sock, 0.2):
                raise _silent_peer(sock, path)
            if not _readable(sock, deadline - time.monotonic()):
                if queue == "queued":
                    raise VMUnreachable(f"QMP socket {path} is in use by another client (QEMU serves one client per monitor)",
                                        hint=HELD_HINT)
                raise VMUnreachable(f"QMP socket {path} did not answer within {timeout:g}s",
                                    hint="another client probably holds this monitor; give nbdbackup a -qmp socket of its own")
        _check_greeting(sock, path)
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


def _connect(sock: socket.socket, path: Path) -> None:
    sock.setblocking(False)  # a full listen queue fails at once (EAGAIN) instead of blocking
    try:
        sock.connect(str(path))
    except BlockingIOError:
        raise VMUnreachable(f"QMP socket {path} is in use by another client, and more connections are queued behind it",
                            hint=HELD_HINT) from None
    except ConnectionRefusedError:
        raise VMUnreachable(f"nothing listens on QMP socket {path}", hint="is the VM running? (the socket file stays when QEMU exits)") from None
    except OSError as exc:
        raise VMUnreachable(f"cannot connect to QMP socket {path}: {exc.strerror or exc}") from None


def _readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], max(0.0, timeout))[0])


def _check_greeting(sock: socket.socket, path: Path) -> None:
    try:
        first = sock.recv(256, socket.MSG_PEEK)
    except OSError as exc:  # reset between connect and greeting: the peer died or refused us
        raise VMUnreachable(f"{path} closed the connection: {exc.strerror or exc}", hint="is the VM (still) running?") from None
    if first.startswith(b'{"QMP"'):
        return
    if not first:
        raise VMUnreachable(f"{path} closed the connection at once: it is not a QMP monitor",
                            hint="give the socket of the VM's -qmp unix:PATH,server=on,wait=off option")
    if first.startswith(b"QEMU ") and b"monitor" in first:
        raise VMUnreachable(f"{path} is QEMU's human monitor (HMP), not QMP",
                            hint="give the socket of a -qmp unix:PATH,server=on,wait=off option (or -mon mode=control), not -monitor")
    shown = first.split(b"\n", 1)[0].strip()[:40].decode(errors="replace")
    raise VMUnreachable(f"{path} does not speak QMP (it said {shown!r})", hint="give the path of the VM's QMP monitor socket")


def _silent_peer(sock: socket.socket, path: Path) -> VMUnreachable:
    """QEMU accepted the connection but sent no greeting: no monitor. A guest agent answers guest-sync."""
    token = int.from_bytes(os.urandom(3), "big")
    try:
        sock.sendall(json.dumps({"execute": "guest-sync", "arguments": {"id": token}}).encode() + b"\n")
        reply = sock.recv(4096) if _readable(sock, 1.0) else b""
    except OSError:
        reply = b""
    if str(token).encode() in reply:
        return VMUnreachable(f"{path} is the socket of the VM's guest agent, not of its QMP monitor",
                             hint="give it as --qga (or qga = in the config file), and the -qmp socket as --qmp")
    return VMUnreachable(f"{path} accepted the connection but sent no QMP greeting: it is not a QMP monitor "
                         "(a guest agent or serial port socket?)",
                         hint="give the socket of the VM's -qmp unix:PATH,server=on,wait=off option")


def _listen_queue(path: Path, sock: socket.socket) -> str | None:
    """Where our connection stands, from /proc/net/unix: "queued" (a connection waits in the
    socket's listen queue: another client holds it), "accepted" (the server took it), or None
    (cannot tell).  QEMU's side of a connection shows the socket's path: state 02 while it
    waits to be accepted, 03 once accepted."""
    wanted = {str(path), os.path.realpath(path)}
    cwd = _peer_cwd(sock)
    states = []
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        name = fields[7]
        if name not in wanted and not (cwd and not name.startswith("/") and os.path.normpath(os.path.join(cwd, name)) in wanted):
            continue
        if fields[3] != "00010000":  # not the listening socket itself
            states.append(fields[5])
    if "02" in states:
        return "queued"
    return "accepted" if "03" in states else None


def _peer_cwd(sock: socket.socket) -> str | None:
    """The working directory of the process listening on sock (to resolve a relative socket path)."""
    try:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None
