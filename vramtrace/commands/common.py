"""What every CLI verb shares: clean one-line errors and loading a trace with progress."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from vramtrace.snapshot.load import SnapshotError
from vramtrace.trace import Trace, load_trace

PROGRESS_MIN_BYTES = 16 << 20   # smaller files load in well under a second


class UserError(click.ClickException):
    """A problem with the user's input: one line on stderr, exit status 2, no traceback."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"vramtrace: error: {self.format_message()}", err=True, file=file)


@contextmanager
def reading(path: str | os.PathLike) -> Iterator[None]:
    """Turn problems found in a file (also those found late, e.g. a malformed stack frame met
    while rendering) into the one-line error that names the file."""
    try:
        yield
    except SnapshotError as exc:
        raise UserError(f"{path}: {exc}") from None
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None


def open_trace(path: str | os.PathLike, quiet: bool = False) -> Trace:
    """Load a trace, with a progress bar for large files unless ``quiet``."""
    path = Path(path)
    with reading(path):
        size = path.stat().st_size if path.exists() else 0
        if quiet or size < PROGRESS_MIN_BYTES:
            return load_trace(path)
        with Progress(TextColumn("loading {task.description}"), BarColumn(), DownloadColumn(),
                      TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(path.name, total=size)
            return load_trace(path, progress=lambda done, total: bar.update(task, completed=done))


def stdout_console() -> Console:
    return Console(file=sys.stdout, soft_wrap=False)


POINT_HELP = "Where to look: 'peak' (most allocated bytes), 'end', or an event index (negative from the end)."


def parse_point(value: str) -> str | int:
    if value in ("peak", "end"):
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not 'peak', 'end' or an event index") from None
