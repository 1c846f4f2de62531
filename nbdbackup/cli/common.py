"""What every command shares: global options, VM options, signals, progress, sizes."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import click

from ..units import human_size, plural  # noqa: F401  (the commands import them from here)


@dataclass(frozen=True)
class Globals:
    repo: str | None
    config: str | None
    debug: bool
    log_file: str | None = None
    metrics_file: str | None = None

    def settings(self, *, needs_config: bool = True):
        """needs_config=False for commands that need only the repository (list, restore,
        verify): with --repo given, a broken config file does not stop them."""
        import dataclasses
        from pathlib import Path

        from ..config import load

        settings = load(self.config, self.repo, needs_config=needs_config)
        return dataclasses.replace(settings, metrics_file=Path(self.metrics_file)) if self.metrics_file else settings


pass_globals = click.make_pass_decorator(Globals)


qmp_option = click.option("--qmp", metavar="SOCKET", help="The VM's QMP socket (default: [vm.NAME] qmp in the config file).")



@contextlib.contextmanager
def interruptible() -> Iterator[Any]:
    """SIGINT/SIGTERM set a token the engine checks at safe points, so cleanup always runs."""
    from ..capture import CancelToken
    from ..errors import Interrupted, NbdBackupError

    cancel = CancelToken()

    def handler(signum: int, frame: Any) -> None:
        if cancel.signum is None:
            click.echo(f"nbdbackup: {signal.Signals(signum).name} received, stopping and cleaning up...", err=True)
        cancel.set(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield cancel
    except NbdBackupError as exc:
        # Whatever failed while we were stopping failed because we were asked to stop.
        if cancel.signum is not None and not isinstance(exc, Interrupted):
            raise Interrupted(cancel.signum) from exc
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def progress_bar(what: str) -> Iterator[Any]:
    from ..engine import Observer

    if not sys.stderr.isatty():
        yield Observer()
        return
    from tqdm import tqdm

    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=what, file=sys.stderr, leave=False)

    def start(total: int) -> None:
        bar.total = total
        bar.refresh()

    def stage(what: str) -> None:
        bar.set_description(what)
        bar.reset(total=0)

    try:
        yield Observer(on_start=start, progress=bar.update, on_stage=stage)
    finally:
        bar.close()


