"""Where diagnostics go: stderr always; a log file when asked; syslog (journald)
when stderr is not a terminal, e.g. under cron or a systemd timer.

Levels follow the outcome, and syslog priorities follow the levels: a failure
is ERROR (syslog `err`), a fallback or anything the user should look at is
WARNING (`warning`), a success is INFO (`info`).  stderr shows WARNING and
above (everything with --debug), and the summary line of a run on a terminal.
"""

from __future__ import annotations

import logging
import os
import sys

from ..errors import UsageError

SYSLOG_SOCKET = "/dev/log"
SUMMARY = "nbdbackup.summary"


class _ToStderr(logging.Filter):
    """A record's `stderr` attribute (True/False), when set, overrides the level threshold."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        forced = getattr(record, "stderr", None)
        return forced if forced is not None else record.levelno >= self.threshold


class _StderrFormatter(logging.Formatter):
    """`nbdbackup: WARNING: text` for problems, plain `nbdbackup: text` for the summary of a good run."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno == logging.INFO and record.name == SUMMARY:
            return f"nbdbackup: {text}"
        return f"nbdbackup: {record.levelname}: {text}"


def setup(*, debug: bool, log_file: str | None) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG)
    stderr = logging.StreamHandler(sys.stderr)
    # The level lets through only what the filter may pass: INFO only for a terminal's summary line.
    stderr.setLevel(logging.DEBUG if debug else logging.INFO if sys.stderr.isatty() else logging.WARNING)
    stderr.addFilter(_ToStderr(logging.DEBUG if debug else logging.WARNING))
    stderr.setFormatter(_StderrFormatter())
    root.addHandler(stderr)
    if log_file:
        try:
            handler = logging.FileHandler(log_file)
        except OSError as exc:
            raise UsageError(f"cannot open log file {log_file}: {exc.strerror}") from None
        handler.setLevel(logging.DEBUG if debug else logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s nbdbackup[%(process)d] %(levelname)s: %(message)s"))
        root.addHandler(handler)
    # NBDBACKUP_SYSLOG_SOCKET: another syslog socket than /dev/log (the tests read one of their own).
    address = os.environ.get("NBDBACKUP_SYSLOG_SOCKET") or SYSLOG_SOCKET
    if not sys.stderr.isatty() and os.path.exists(address) and not os.environ.get("NBDBACKUP_NO_SYSLOG"):
        from logging.handlers import SysLogHandler  # only here: it costs milliseconds at every start

        try:
            # The level decides the priority: ERROR -> err, WARNING -> warning, INFO -> info.
            syslog = SysLogHandler(address=address)
            syslog.setLevel(logging.INFO)
            syslog.setFormatter(logging.Formatter("nbdbackup[%(process)d]: %(levelname)s: %(message)s"))
            root.addHandler(syslog)
        except OSError:
            pass
    # qemu.qmp's own protocol chatter stays out of the way even with --debug.
    logging.getLogger("qemu").setLevel(logging.CRITICAL)


def summary(line: str, *, level: int = logging.INFO, stderr: bool | None = None) -> None:
    """The one line that ends a run: to the log file and syslog at `level`, and to stderr
    when it is a problem (WARNING or worse), stderr is a terminal, or with --debug;
    `stderr` True/False overrides that (False: the line is already on stdout or stderr)."""
    if stderr is None and sys.stderr.isatty():
        stderr = True
    logging.getLogger(SUMMARY).log(level, "%s", line, extra={"stderr": stderr})


def failure(line: str) -> None:
    """A failure the user has already seen on stderr (the final error line): log file and syslog only."""
    logging.getLogger(SUMMARY).error("%s", line, extra={"stderr": False})


def warning(line: str) -> None:
    """A fallback or a problem worth a look, once: stderr, the log file and syslog."""
    logging.getLogger("nbdbackup").warning("%s", line)


def mark_logged(exc: BaseException) -> None:
    """This error's line is already in the log file and syslog: the final error report skips them."""
    exc.nbdbackup_logged = True  # type: ignore[attr-defined]


def final_error(exc: BaseException, line: str) -> None:
    """The error that ends the run, already printed on stderr: to the log file and syslog, once."""
    if getattr(exc, "nbdbackup_logged", False) or not logging.getLogger().handlers:
        return  # before setup() no handler exists, and logging's last resort would print it a second time
    failure(line)
