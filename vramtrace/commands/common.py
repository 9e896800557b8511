"""What every CLI verb shares: clean one-line errors and loading a trace with progress."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import click
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from vramtrace.snapshot.load import SnapshotError
from vramtrace.replay.timeline import DeviceTimeline, build_timeline
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


@contextmanager
def analysis_steps(path: str | os.PathLike, steps: int, quiet: bool) -> Iterator[Callable[[str], None]]:
    """The work after loading: yields ``step(description)``, which advances a transient bar on
    stderr, and turns malformed frames (found only when first read) into a one-line error.

    The bar shows for inputs as large as the ones open_trace shows a bar for (smaller ones
    finish in well under a second) unless ``quiet``."""
    try:
        big = Path(path).stat().st_size >= PROGRESS_MIN_BYTES
    except OSError:
        big = False
    with reading(path):
        if quiet or not big:
            yield lambda description: None
            return
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("", total=steps)
            started = False

            def step(description: str) -> None:
                nonlocal started
                bar.update(task, description=description, advance=1 if started else 0)
                started = True

            yield step


def choose_device(trace: Trace, device: int | None, file: str) -> DeviceTimeline:
    """The timeline of ``device``, or of the device whose allocated bytes peak highest."""
    if device is not None:
        if not 0 <= device < trace.n_devices:
            raise UserError(f"{file}: no device {device} (the file has {trace.n_devices})")
        return build_timeline(trace, device)
    if not trace.n_devices:
        raise UserError(f"{file}: the snapshot holds no device")
    timelines = [build_timeline(trace, d) for d in range(trace.n_devices)]
    return max(timelines, key=lambda tl: (tl.peak_allocated, -tl.device))


def resolve_point(tl: DeviceTimeline, at: str, file: str) -> int:
    try:
        return tl.resolve_point(parse_point(at))
    except ValueError as exc:
        raise UserError(f"{file}: {exc}") from None
