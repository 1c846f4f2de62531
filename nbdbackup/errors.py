"""The exception hierarchy of nbdbackup, and the one place exit codes live.

    NbdBackupError                 exit 1  unexpected failure
     +-- UsageError                exit 2  bad command line, names or files
     +-- VMError                   exit 3  VM unreachable or unsuitable
     |    +-- VMUnreachable                no socket, not QMP, monitor busy
     |    +-- VMUnsuitable                 no qcow2 disk, unknown disk
     +-- QEMUCommandFailed         exit 1  QEMU refused a command we sent
     +-- ChainError                exit 4  checkpoint unknown or chain broken
     |    +-- CheckpointUnknown
     |    +-- ChainBroken
     +-- LockHeld                  exit 5  another nbdbackup run holds the VM
     +-- RepositoryDamaged         exit 6  a chunk, index or manifest is bad
     |    +-- BackupDoesNotBoot            verify --boot: the restored point did not boot
     +-- RepositoryUnusable        exit 7  newer format, read-only, full
     +-- RestoreTargetError        exit 8  restore target cannot be written
     +-- SomeRunsFailed            the worst exit code of the VMs of `auto --all`
     +-- Interrupted               exit 130 (SIGINT) / 143 (SIGTERM)

Every message is one line saying what is wrong and, where there is one,
what to do about it.  Only the CLI turns these into exit codes.
"""

from __future__ import annotations

import signal


class NbdBackupError(Exception):
    """Root of every error nbdbackup reports on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}: {self.hint}" if self.hint else self.message


class UsageError(NbdBackupError):
    exit_code = 2


class VMError(NbdBackupError):
    exit_code = 3


class VMUnreachable(VMError):
    pass


class VMUnsuitable(VMError):
    pass


class QEMUCommandFailed(NbdBackupError):
    """QEMU answered a QMP command with an error."""

    exit_code = 1

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"QEMU refused {command}: {description}")
        self.command = command
        self.error_class = error_class
        self.description = description


class ChainError(NbdBackupError):
    exit_code = 4


class CheckpointUnknown(ChainError):
    pass


class ChainBroken(ChainError):
    pass


class LockHeld(NbdBackupError):
    exit_code = 5


class RepositoryDamaged(NbdBackupError):
    exit_code = 6


class BackupDoesNotBoot(RepositoryDamaged):
    """verify --boot: the backup point, restored, shows no sign of life (or its check failed)."""


class RepositoryUnusable(NbdBackupError):
    exit_code = 7


class RestoreTargetError(NbdBackupError):
    exit_code = 8


class SomeRunsFailed(NbdBackupError):
    """auto --all: at least one VM failed; the exit code is the worst of theirs."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(NbdBackupError):
    """A signal asked us to stop; raised at the next safe point."""

    def __init__(self, signum: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}; cleaned up, no backup was recorded")
        self.signum = signum
        self.exit_code = 128 + signum


EXIT_CODES: dict[str, int] = {
    "success": 0,
    "unexpected": NbdBackupError.exit_code,
    "usage": UsageError.exit_code,
    "vm": VMError.exit_code,
    "chain": ChainError.exit_code,
    "locked": LockHeld.exit_code,
    "damaged": RepositoryDamaged.exit_code,
    "repository": RepositoryUnusable.exit_code,
    "restore-target": RestoreTargetError.exit_code,
    "sigint": 128 + signal.SIGINT,
    "sigterm": 128 + signal.SIGTERM,
}
