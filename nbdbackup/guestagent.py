"""Guest filesystem freeze through qemu-guest-agent, around the freeze transaction.

    with fsfreeze(qga_socket, required=False):
        session.transaction(...)    # the point in time

Freeze right before, thaw right after, always (also when the transaction
fails).  An agent that does not answer within the timeout means a
crash-consistent backup with a warning, or an error when `required`.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from pathlib import Path

from .config import env_seconds
from .errors import NbdBackupError, VMUnreachable
from .qmp import QMPSession

log = logging.getLogger(__name__)

AGENT_TIMEOUT = 10.0


class GuestAgentError(VMUnreachable):
    """The guest agent is required but did not freeze the guest."""


@contextlib.contextmanager
def fsfreeze(socket: Path | None, *, required: bool, timeout: float | None = None) -> Iterator[bool]:
    """Yield True while the guest's filesystems are frozen, False if they could not be.
    timeout: per agent command; default $NBDBACKUP_AGENT_TIMEOUT or AGENT_TIMEOUT seconds."""
    timeout = timeout or env_seconds("NBDBACKUP_AGENT_TIMEOUT", AGENT_TIMEOUT)
    agent = _freeze(socket, required=required, timeout=timeout)
    try:
        yield agent is not None
    finally:
        if agent is not None:
            _thaw(agent, timeout)
            agent.close()


def _freeze(socket: Path | None, *, required: bool, timeout: float) -> QMPSession | None:
    """The agent session, with the guest frozen; None (or GuestAgentError) if that failed."""
    agent = None
    try:
        if socket is None:
            raise NbdBackupError("no guest agent socket is configured", hint='set qga = "PATH" for the VM or pass --qga')
        agent = QMPSession(socket, connect_timeout=timeout, guest_agent=True)
        agent.connect()
        token = random.randrange(1, 2**31)
        if agent.execute("guest-sync", {"id": token}, timeout=timeout) != token:
            raise NbdBackupError("the guest agent answered guest-sync with a stale reply")
        count = agent.execute("guest-fsfreeze-freeze", timeout=timeout)
        log.info("froze %s guest filesystems", count)
        return agent
    except NbdBackupError as exc:
        if agent is not None:
            _thaw(agent, timeout)  # a freeze that timed out may still have happened
            agent.close()
        if required:
            raise GuestAgentError(f"could not freeze the guest's filesystems: {exc}",
                                  hint="check qemu-guest-agent in the guest, or drop --require-fsfreeze") from None
        log.warning("could not freeze the guest's filesystems (%s): the backup is crash-consistent", exc)
        return None


def _thaw(agent: QMPSession, timeout: float) -> None:
    try:
        agent.execute("guest-fsfreeze-thaw", timeout=timeout)
    except NbdBackupError as exc:
        log.error("guest agent: THAW FAILED: %s; the guest's filesystems may still be frozen: "
                  "thaw them (guest-fsfreeze-thaw through the agent) now", exc)
