"""Where diagnostics go: stderr always; a log file when asked; syslog (journald)
when stderr is not a terminal, e.g. under cron or a systemd timer."""

from __future__ import annotations

import logging
import os
import sys

from ..errors import UsageError

SYSLOG_SOCKET = "/dev/log"


def setup(*, debug: bool, log_file: str | None) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.DEBUG if debug else logging.WARNING)
    stderr.setFormatter(logging.Formatter("nbdbackup: %(levelname)s: %(message)s"))
    root.addHandler(stderr)
    if log_file:
        try:
            handler = logging.FileHandler(log_file)
        except OSError as exc:
            raise UsageError(f"cannot open log file {log_file}: {exc.strerror}") from None
        handler.setLevel(logging.DEBUG if debug else logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s nbdbackup[%(process)d] %(levelname)s: %(message)s"))
        root.addHandler(handler)
    if not sys.stderr.isatty() and os.path.exists(SYSLOG_SOCKET) and not os.environ.get("NBDBACKUP_NO_SYSLOG"):
        from logging.handlers import SysLogHandler  # only here: it costs milliseconds at every start

        try:
            syslog = SysLogHandler(address=SYSLOG_SOCKET)
            syslog.setLevel(logging.INFO)
            syslog.setFormatter(logging.Formatter("nbdbackup[%(process)d]: %(levelname)s: %(message)s"))
            root.addHandler(syslog)
        except OSError:
            pass
    # qemu.qmp's own protocol chatter stays out of the way even with --debug.
    logging.getLogger("qemu").setLevel(logging.CRITICAL)


def summary(line: str) -> None:
    """The one line that ends every run: to the log file and syslog, and to a terminal."""
    logging.getLogger("nbdbackup.summary").info("%s", line)
    if sys.stderr.isatty():
        print(f"nbdbackup: {line}", file=sys.stderr)
