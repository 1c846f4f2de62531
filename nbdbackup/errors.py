"""The exception hierarchy of nbdbackup, and the one place exit codes live.

    NbdBackupError                 exit 1  unexpected failure
     +-- UsageError                exit 2  bad command line, names or files
     +-- VMError                   exit 3  VM unreachable or unsuitable
     |    +-- VMUnreachable                no socket, not QMP, monitor busy
     |    +-- VMUnsuitable                 no qcow2 disk, unknown disk
     +-- QEMUFailed                exit 33 QEMU, a QEMU tool or an NBD server failed at what we asked
     |    +-- QEMUCommandFailed        QEMU refused a command we sent
     |    +-- NbdIOError               an NBD request failed or the connection dropped
     +-- ChainError                exit 4  checkpoint unknown or chain broken
     |    +-- CheckpointUnknown
     |    +-- ChainBroken
     |    +-- ChainOfAnotherVM         QEMU holds another VM name's chain
     +-- LockHeld                  exit 5  another nbdbackup run holds the VM
     +-- RepositoryDamaged         exit 6  a chunk, index or manifest is bad
     |    +-- BackupDoesNotBoot            verify --boot: the restored point did not boot
     +-- RepositoryUnusable        exit 7  newer format, read-only, full
     |    +-- S3CredentialsRefused exit 9  the object store refused the credentials
     |    +-- S3BucketMissing      exit 10 the bucket does not exist
     |    +-- S3AccessDenied       exit 11 the bucket is not ours (access denied)
     |    +-- S3Unreachable        exit 12 endpoint unreachable or not S3
     +-- RestoreTargetError        exit 8  restore target cannot be written
     +-- ServeAddressError         exit 13 serve: socket or TCP address in use or unusable
     +-- MountPointError           exit 14 mount: DIR missing, not empty, not a mount of ours
     +-- ToolUnavailable           exit 15 nbdkit, FUSE or loop devices unavailable
     +-- KeyUnavailable            exit 18 encrypted repository: no key file, no passphrase
     +-- WrongPassphrase           exit 19 the passphrase opens none of the repository's keys
     +-- ForeignKey                exit 20 the key file belongs to another repository
     +-- KeyFileDamaged            exit 21 the key file or a stored key is unreadable
     +-- EncryptionMismatch        exit 22 encryption asked for, repository disagrees; key refused
     +-- RepositoryRolledBack      exit 27 encrypted repository: backups this host saw are gone unrecorded
     +-- SomeRunsFailed            the worst exit code of the VMs of `auto --all`
     +-- Interrupted               exit 130 (SIGINT) / 143 (SIGTERM)
 +-- ImageInUse                exit 16 rollback: the VM's images are in use (its QEMU runs)
 +-- RollbackIncomplete        exit 17 rollback stopped after writing began: run it again

EXIT_STATUS below is the one description of the exit codes: `--help` and the
man page's EXIT STATUS section are generated from it (scripts/manpage).

Every message is one line saying what is wrong and, where there is one,
what to do about it.  Only the CLI turns these into exit codes.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass


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


class QEMUFailed(NbdBackupError):
    """QEMU (a QMP command, a block job), a QEMU tool (qemu-img, qemu-storage-daemon) or an NBD
    server or connection failed at something nbdbackup asked of it: not a bug of nbdbackup's."""

    exit_code = 33


class QEMUCommandFailed(QEMUFailed):
    """QEMU answered a QMP command with an error."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"QEMU refused {command}: {description}")
        self.command = command
        self.error_class = error_class
        self.description = description


class NbdIOError(QEMUFailed):
    """An NBD request failed or the connection dropped."""


class ChainError(NbdBackupError):
    exit_code = 4


class CheckpointUnknown(ChainError):
    pass


class ChainBroken(ChainError):
    pass


class ChainOfAnotherVM(ChainError):
    """The QEMU's checkpoints (of this repository) belong to another VM name: never touched."""


class LockHeld(NbdBackupError):
    exit_code = 5


class RepositoryDamaged(NbdBackupError):
    exit_code = 6


class BackupDoesNotBoot(RepositoryDamaged):
    """verify --boot: the backup point, restored, shows no sign of life (or its check failed)."""


class RepositoryUnusable(NbdBackupError):
    exit_code = 7


class S3CredentialsRefused(RepositoryUnusable):
    exit_code = 9


class S3BucketMissing(RepositoryUnusable):
    exit_code = 10


class S3AccessDenied(RepositoryUnusable):
    exit_code = 11


class S3Unreachable(RepositoryUnusable):
    exit_code = 12


class RestoreTargetError(NbdBackupError):
    exit_code = 8


class KeyUnavailable(NbdBackupError):
    exit_code = 18


class WrongPassphrase(NbdBackupError):
    exit_code = 19


class ForeignKey(NbdBackupError):
    exit_code = 20


class KeyFileDamaged(NbdBackupError):
    exit_code = 21


class EncryptionMismatch(NbdBackupError):
    exit_code = 22


class RepositoryRolledBack(NbdBackupError):
    """An encrypted repository lacks backups this host saw in it, with no record of their deletion:
    the store serves an older state (rolled back, restored from an old copy) or withholds objects."""

    exit_code = 27


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


class ImageInUse(NbdBackupError):
    """The disks to roll back are open in a running QEMU (or another process)."""

    exit_code = 16


class RollbackIncomplete(NbdBackupError):
    """A rollback failed after it began writing: the disks are partly rolled back."""

    exit_code = 17


EXIT_CODES: dict[str, int] = {
    "success": 0,
    "unexpected": NbdBackupError.exit_code,
    "qemu": QEMUFailed.exit_code,
    "usage": UsageError.exit_code,
    "vm": VMError.exit_code,
    "chain": ChainError.exit_code,
    "locked": LockHeld.exit_code,
    "damaged": RepositoryDamaged.exit_code,
    "repository": RepositoryUnusable.exit_code,
    "restore-target": RestoreTargetError.exit_code,
    "s3-credentials": S3CredentialsRefused.exit_code,
    "s3-bucket-missing": S3BucketMissing.exit_code,
    "s3-access-denied": S3AccessDenied.exit_code,
    "s3-unreachable": S3Unreachable.exit_code,
    "image-in-use": ImageInUse.exit_code,
    "rollback-incomplete": RollbackIncomplete.exit_code,
    "no-key": KeyUnavailable.exit_code,
    "wrong-passphrase": WrongPassphrase.exit_code,
    "foreign-key": ForeignKey.exit_code,
    "key-damaged": KeyFileDamaged.exit_code,
    "encryption-mismatch": EncryptionMismatch.exit_code,
    "sigint": 128 + signal.SIGINT,
    "sigterm": 128 + signal.SIGTERM,
}


class ServeAddressError(NbdBackupError):
    """serve: the socket path or TCP address is in use or cannot be used."""

    exit_code = 13


class MountPointError(NbdBackupError):
    """mount/umount: the directory is missing, not empty, or not an nbdbackup mount."""

    exit_code = 14


class ToolUnavailable(NbdBackupError):
    """A program or kernel facility that serve/mount/recover need is missing (nbdkit, FUSE, loop devices)."""

    exit_code = 15


EXIT_CODES.update({"address": ServeAddressError.exit_code, "mount-point": MountPointError.exit_code,
                   "tool": ToolUnavailable.exit_code})
EXIT_CODES.update({"rolled-back": RepositoryRolledBack.exit_code})


@dataclass(frozen=True)
class ExitStatus:
    """One row of the exit-code table that `--help` and the man page show."""

    codes: tuple[int, ...]
    short: str  # for --help: a few words
    detail: str  # for the man page and README: sentences; `code` in backquotes


EXIT_STATUS: tuple[ExitStatus, ...] = (
    ExitStatus((0,), "success", "Success."),
    ExitStatus((NbdBackupError.exit_code,), "unexpected error",
               "Unexpected error: a failure without a code of its own below, or a bug in nbdbackup "
               "(`--debug` shows where it happened)."),
    ExitStatus((UsageError.exit_code,), "usage error",
               "Usage error: bad command line, name, configuration file or timeout in the environment; "
               "a log file that cannot be opened; no retention policy for `prune`; a checkpoint name that already exists."),
    ExitStatus((VMError.exit_code,), "VM unreachable or unsuitable",
               "The VM is unreachable (no socket, nothing listening on it, not QMP (the human monitor, a guest agent "
               "socket), monitor held by another client, no QMP socket configured, QMP connection lost, "
               "QEMU exited during the backup), unsuitable (no qcow2 disk, unknown disk, a device id that cannot name "
               "a disk in the repository, NBD server in use, for example by another repository's backup), or its guest "
               "could not be frozen with `--require-fsfreeze`."),
    ExitStatus((ChainError.exit_code,), "checkpoint unknown or chain broken",
               "A checkpoint or backup is unknown, or the chain from the checkpoint to now cannot be trusted "
               "(bitmaps missing, inconsistent, or changed by another tool); nothing was written. "
               "`auto` makes a full backup instead of failing. "
               "Also: the QEMU holds the checkpoint chain of another VM name of the repository; nothing was changed "
               "(`full --force-new-chain` takes it over)."),
    ExitStatus((LockHeld.exit_code,), "VM locked by another run",
               "Another `nbdbackup` run holds the VM's lock; or garbage collection held the repository lock for "
               "more than 10 minutes."),
    ExitStatus((RepositoryDamaged.exit_code,), "repository damaged",
               "The repository is damaged: a chunk, index, manifest, `checkpoints.json` or `config.json` is missing, "
               "truncated or fails its checksum. Also from `verify` when it found damage, from `verify --boot` and "
               "`auto --verify-boot` when the backup does not boot, from `prune` when damage stops "
               "garbage collection, and from `restore --to latest` while any manifest of the VM is damaged."),
    ExitStatus((RepositoryUnusable.exit_code,), "repository unusable (newer format, read-only, full)",
               "The repository is unusable: none at the path (for commands other than backups), not a repository, "
               "a newer format version, full, or not writable (on a read-only repository, `list`, `restore` and `verify` "
               "work; the commands that take the VM's lock exit with 7)."),
    ExitStatus((RestoreTargetError.exit_code,), "restore target cannot be written",
               "A restore target cannot be written (image exists without `--force`, image in use by a running process "
               "such as a VM, directory cannot be created, "
               "`qemu-img` or `qemu-storage-daemon` failed, write error)."),
    ExitStatus((S3CredentialsRefused.exit_code,), "S3 credentials refused",
               "S3: the object store refused the credentials, or none were found; nothing was created."),
    ExitStatus((S3BucketMissing.exit_code,), "S3 bucket missing",
               "S3: the bucket does not exist (nbdbackup never creates buckets); nothing was created."),
    ExitStatus((S3AccessDenied.exit_code,), "S3 access denied",
               "S3: access denied: the bucket belongs to another account, or these credentials may not use it; "
               "nothing was created."),
    ExitStatus((S3Unreachable.exit_code,), "S3 endpoint unreachable or not S3",
               "S3: the endpoint is unreachable or does not answer like S3, or it kept failing after the retries "
               "(for example, it died during a backup: nothing that looks like a backup is left)."),
    ExitStatus((ServeAddressError.exit_code,), "socket or address in use",
               "`serve` or `recover`: the socket path or TCP address is in use or cannot be used."),
    ExitStatus((MountPointError.exit_code,), "mount directory unusable",
               "`mount` or `umount`: the directory does not exist, is not a directory, is not empty or is already "
               "mounted; or it is not an nbdbackup mount; or a filesystem under it is busy."),
    ExitStatus((ToolUnavailable.exit_code,), "nbdkit, FUSE or loop devices missing",
               "A program or facility that `serve`, `mount` or `recover` needs is missing: nbdkit or its Python plugin, "
               "FUSE, loop devices, root, `fusefat`."),
    ExitStatus((ImageInUse.exit_code,), "rollback: the VM's disks are in use",
               "`rollback`: the VM's disks are in use and cannot be written: its guest runs (without `--pause`), "
               "or a QEMU holds an image open while its QMP socket is not known; nothing was written."),
    ExitStatus((RollbackIncomplete.exit_code,), "rollback stopped partway (run it again)",
               "`rollback` stopped after it began writing (the backup storage or an image failed): the disks are "
               "partly rolled back; running the same command again completes the rollback."),
    ExitStatus((KeyUnavailable.exit_code,), "no key for an encrypted repository",
               "The repository is encrypted and its key is not available: the key file is missing, or no passphrase "
               "was given (`NBDBACKUP_PASSWORD_FILE`, `NBDBACKUP_PASSWORD_COMMAND` or a terminal) or it could not be read. "
               "Nothing was changed."),
    ExitStatus((WrongPassphrase.exit_code,), "wrong passphrase",
               "The passphrase opens none of the repository's keys. Nothing was changed."),
    ExitStatus((ForeignKey.exit_code,), "key of another repository",
               "The key file belongs to another repository. Nothing was changed."),
    ExitStatus((KeyFileDamaged.exit_code,), "key file damaged",
               "The key file, or a key stored in the repository, is damaged or not a key. Nothing was changed."),
    ExitStatus((EncryptionMismatch.exit_code,), "encryption setting refused",
               "Encryption was asked for (configuration `encryption`, `init --encryption`) but the repository is not "
               "encrypted, or exists already; or a key change was refused (removing the last key). Nothing was changed."),
    ExitStatus((RepositoryRolledBack.exit_code,), "encrypted repository rolled back",
               "An encrypted repository no longer holds backups that this host saw in it, and holds no record of their "
               "deletion (which `prune` and `delete` write, on any host): the storage serves an older state of the "
               "repository (rolled back, restored from an old copy) or withholds objects. Nothing was changed. If you "
               "restored the storage from an older copy on purpose, remove the file the message names to accept it."),
    ExitStatus((QEMUFailed.exit_code,), "QEMU or NBD failed",
               "QEMU refused a QMP command or one of its block jobs failed; a QEMU tool (`qemu-img`, `qemu-storage-daemon`) "
               "or an NBD server (nbdkit, `nbdfuse`) failed, other than for a restore target (exit 8); or reading over NBD "
               "failed. The message says which."),
    ExitStatus((128 + signal.SIGINT, 128 + signal.SIGTERM), "interrupted",
               "Interrupted by SIGINT or SIGTERM. The run cleaned up after itself in QEMU, and no backup was recorded; "
               "the chunks it stored are removed too, unless another run holds the repository (then it says how much "
               "it left, and the next `prune` frees it)."),
)

EXIT_STATUS_NOTE = "`auto --all` and `prune --all` exit with the highest status of their VMs."


def exit_status_help() -> str:
    """The exit-code sentence of `nbdbackup --help`."""
    return "Exit codes: " + ", ".join(f"{'/'.join(map(str, s.codes))} {s.short}" for s in EXIT_STATUS) + ". " + EXIT_STATUS_NOTE.replace("`", "")
