"""Guest filesystem freeze through qemu-guest-agent, around the freeze transaction.

    with fsfreeze(qga_socket, required=False):
        session.transaction(...)    # the point in time

Freeze right before, thaw right after (also when the transaction fails).
A thaw is sent only when a freeze may have reached the guest: after
`guest-fsfreeze-freeze` was sent, never when the agent did not even answer
`guest-sync`.  An agent that does not answer within the timeout means a
crash-consistent backup with ONE warning line, or ONE error when `required`.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import env_seconds
from .errors import NbdBackupError, QEMUCommandFailed, VMUnreachable
from .qmp import QMPSession

log = logging.getLogger(__name__)

AGENT_TIMEOUT = 10.0


class GuestAgentError(VMUnreachable):
    """The guest agent is required but did not freeze the guest."""


class _AgentFailed(NbdBackupError):
    """One agent request failed; the message says what the guest agent did (not QEMU)."""


@contextlib.contextmanager
def fsfreeze(socket: Path | None, *, required: bool, timeout: float | None = None) -> Iterator[bool]:
    """Yield True while the guest's filesystems are frozen, False if they could not be.
    timeout: per agent request; default $NBDBACKUP_AGENT_TIMEOUT or AGENT_TIMEOUT seconds."""
    timeout = timeout or env_seconds("NBDBACKUP_AGENT_TIMEOUT", AGENT_TIMEOUT)
    agent = _freeze(socket, required=required, timeout=timeout)
    try:
        yield agent is not None
    finally:
        if agent is not None:
            problem = _thaw(agent, timeout)
            agent.close()
            if problem:
                log.error("%s", problem)


def _ask(agent: QMPSession, command: str, timeout: float, arguments: dict | None = None) -> Any:
    """One agent request; its failure said in terms of the guest agent."""
    try:
        return agent.execute(command, arguments, timeout=timeout)
    except QEMUCommandFailed as exc:
        raise _AgentFailed(f"the guest agent refused {command}: {exc.description}") from None
    except NbdBackupError:
        if agent.lost:
            raise _AgentFailed(f"the guest agent closed the connection during {command}") from None
        raise _AgentFailed(f"the guest agent did not answer {command} within {timeout:g}s") from None


def _connect(socket: Path, timeout: float) -> QMPSession:
    if not socket.exists():
        raise _AgentFailed(f"the guest agent socket {socket} does not exist", hint="is the VM running with its guest agent channel?")
    agent = QMPSession(socket, connect_timeout=timeout, guest_agent=True)
    try:
        agent.connect()
    except NbdBackupError as exc:
        raise _AgentFailed(f"cannot connect to the guest agent socket {socket}: {exc.message}") from None
    return agent


def _freeze(socket: Path | None, *, required: bool, timeout: float) -> QMPSession | None:
    """The agent session, with the guest frozen; None (or GuestAgentError) if that failed."""
    agent = None
    try:
        if socket is None:
            raise _AgentFailed("no guest agent socket is configured", hint='set qga = "PATH" for the VM or pass --qga')
        agent = _connect(Path(socket), timeout)
        token = random.randrange(1, 2**31)
        if _ask(agent, "guest-sync", timeout, {"id": token}) != token:
            raise _AgentFailed("the guest agent answered guest-sync with a stale reply")
    except NbdBackupError as exc:  # no freeze was sent: nothing to thaw
        if agent is not None:
            agent.close()
        _give_up(str(exc), required=required, thaw_problem=None)
        return None
    try:
        count = _ask(agent, "guest-fsfreeze-freeze", timeout)
    except NbdBackupError as exc:  # the freeze may have reached the guest: thaw
        thaw_problem = _thaw(agent, timeout)
        agent.close()
        _give_up(str(exc), required=required, thaw_problem=thaw_problem)
        return None
    log.info("froze %s guest filesystems", count)
    return agent


def _give_up(reason: str, *, required: bool, thaw_problem: str | None) -> None:
    """One line for the whole failure: an error when required (raised) or when the guest may be
    left frozen, else a warning."""
    if required:
        raise GuestAgentError(f"could not freeze the guest's filesystems: {reason}" + (f"; {thaw_problem}" if thaw_problem else ""),
                              hint="check qemu-guest-agent in the guest, or drop --require-fsfreeze")
    if thaw_problem:
        log.error("could not freeze the guest's filesystems (%s), and then %s", reason, thaw_problem)
    else:
        log.warning("could not freeze the guest's filesystems (%s): the backup is crash-consistent", reason)


def _thaw(agent: QMPSession, timeout: float) -> str | None:
    """Thaw; None if that worked, else the one-line alarm (the guest may still be frozen)."""
    try:
        _ask(agent, "guest-fsfreeze-thaw", timeout)
        return None
    except NbdBackupError as exc:
        return (f"guest agent: THAW FAILED: {exc}; the guest's filesystems may still be frozen: "
                "check with guest-fsfreeze-status through the agent and thaw them (guest-fsfreeze-thaw)")
