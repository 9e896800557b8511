"""Child side of ``vramtrace record``: recording inside each Python process of the command.

``activate()`` (called by ``pythonpath/sitecustomize.py``) reads the ``VRAMTRACE_*`` settings and
waits for ``torch`` to be imported: a process that never imports torch has no GPU memory to
record and pays nothing. Launcher processes (torchrun, accelerate launch) only pass the
environment on to their workers and do not record.

When torch has been imported, the process's file is chosen (``<base>.rank<N>.pkl`` under
RANK/LOCAL_RANK; the first other process gets ``<base>`` itself, any further one
``<base>.pid<PID>.pkl``), and the in-process recorder starts, at once or, with ``--steps A:B``,
after optimizer step A-1; it stops and writes the file after step B-1, at exit, or on SIGTERM
(then the process dies of SIGTERM as it would have). SIGINT needs no handler: Python turns it
into KeyboardInterrupt and exit handlers run. A forked child never writes its parent's file.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib.abc
import importlib.util
import os
import signal
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from vramtrace.capture import launcher as L
from vramtrace.capture.recorder import BACKENDS

CLAIM_FILE = "claimed"


@dataclass(frozen=True)
class Settings:
    """The recording asked for, as the launcher put it in the environment."""

    base: Path
    backend: str
    stacks: str
    max_entries: int
    steps: tuple[int, int | None] | None
    manifest: Path | None

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ) -> "Settings":
        """Parse the ``VRAMTRACE_*`` variables; ValueError names the first bad one."""
        backend = env.get(L.ENV_BACKEND, "auto")
        stacks = env.get(L.ENV_STACKS, "python")
        if backend not in BACKENDS:
            raise ValueError(f"{L.ENV_BACKEND}={backend!r} is not one of {', '.join(BACKENDS)}")
        if stacks not in L.STACKS:
            raise ValueError(f"{L.ENV_STACKS}={stacks!r} is not one of {', '.join(L.STACKS)}")
        raw_max = env.get(L.ENV_MAX_ENTRIES, str(L.DEFAULT_MAX_ENTRIES))
        if not raw_max.isdigit() or int(raw_max) < 1:
            raise ValueError(f"{L.ENV_MAX_ENTRIES}={raw_max!r} is not a positive whole number")
        try:
            steps = L.parse_steps(env[L.ENV_STEPS]) if env.get(L.ENV_STEPS) else None
        except L.LaunchError as exc:
            raise ValueError(str(exc)) from None
        manifest = env.get(L.ENV_MANIFEST)
        return cls(Path(env[L.ENV_OUTPUT]), backend, stacks, int(raw_max), steps,
                   Path(manifest) if manifest else None)


def is_launcher_process(argv: Sequence[str]) -> bool:
    """Whether ``argv`` (``sys.orig_argv``) runs a launcher such as torchrun, whose workers
    record but which itself holds no GPU memory worth a file."""
    args = list(argv[1:])
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-":
        arg = args[i]
        if arg.startswith("-m"):
            module = arg[2:] or (args[i + 1] if i + 1 < len(args) else "")
            return module in L.LAUNCHER_MODULES
        if arg.startswith("-c"):
            return False
        i += 2 if arg in ("-W", "-X") else 1
    return i < len(args) and Path(args[i]).name in L.LAUNCHER_SCRIPTS


def activate() -> None:
    """Arm recording for this process: it starts when torch is imported."""
    settings = Settings.from_env(os.environ)
    if is_launcher_process(getattr(sys, "orig_argv", sys.argv)):
        return
    on_import("torch", lambda: Session(settings).begin())


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback right after a top-level module finished importing (once)."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name = name
        self.callback = callback

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module
        callback = self.callback

        def exec_then_call(module: Any) -> None:
            exec_module(module)
            try:
                callback()
            except Exception as exc:  # noqa: BLE001 - never break the user's `import torch`
                print(f"vramtrace: not recording this process: {exc}", file=sys.stderr)

        spec.loader.exec_module = exec_then_call
        return spec


def on_import(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback`` once ``name`` is imported (now, if it already is)."""
    if name in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))


class Session:
    """One process's recording: its file, the step window, and the ways it ends."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self.path, self.extra = output_path(settings, self.pid)
        self.steps_done = 0
        self._optimizer: Any = None
        self._step_hook: Any = None
        self._forward_hook: Any = None
        self._pending: Callable[[], None] | None = None
        self._recording = False
        self._finished = False
        self._term_pending = False
        self._busy = False
        self._lock = threading.Lock()

    def begin(self) -> None:
        """Start (or, for a step window, wait for step A), and arrange the final dump."""
        if self.settings.manifest is not None:
            with open(self.settings.manifest / f"{self.pid}.path", "a") as fh:
                fh.write(f"{self.path}\n")
        steps = self.settings.steps
        if steps is None or steps[0] == 0:
            self._start()
        if steps is not None:
            from torch.optim.optimizer import register_optimizer_step_post_hook
            self._step_hook = register_optimizer_step_post_hook(self._after_step)
        atexit.register(self.finish)
        self._handle_sigterm()

    def _backend(self) -> str:
        if self.settings.backend != "auto":
            return self.settings.backend
        from vramtrace.capture.cuda_backend import cuda_usable
        return "cuda" if cuda_usable() else "cpu"

    def _start(self) -> None:
        from vramtrace.capture import recorder
        recorder.start(self.path, backend=self._backend(), stacks=self.settings.stacks,
                       max_entries=self.settings.max_entries)
        self._recording = True

    def _stop(self) -> None:
        from vramtrace.capture import recorder
        self._recording = False
        try:
            recorder.stop()
        except OSError as exc:
            print(f"vramtrace: could not write {self.path}: {exc.strerror or exc}", file=sys.stderr)
            return
        if self.extra and _empty(self.path):
            self.path.unlink()

    @contextlib.contextmanager
    def _critical(self) -> Iterator[None]:
        """Starting or writing: a SIGTERM arriving meanwhile is acted on right after."""
        with self._lock:
            self._busy = True
            try:
                yield
            finally:
                self._busy = False
        if self._term_pending and os.getpid() == self.pid:
            self._term_pending = False
            self.finish()
            _die_of(signal.SIGTERM)

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Optimizer step post-hook: counts the steps of the first optimizer that steps and
        schedules the window's start or end. They run at the next module forward, because
        starting or stopping (un)registers optimizer hooks, which torch forbids while it
        iterates them."""
        if self._optimizer is None:
            self._optimizer = weakref.ref(optimizer)
        elif self._optimizer() is not optimizer:
            return
        self.steps_done += 1
        start, stop = self.settings.steps
        if self.steps_done == start and not self._recording:
            self._pending = self._start
        elif stop is not None and self.steps_done == stop:
            self._pending = self._end_window
        if self._pending is not None and self._forward_hook is None:
            from torch.nn.modules.module import register_module_forward_pre_hook
            self._forward_hook = register_module_forward_pre_hook(self._run_pending)

    def _run_pending(self, module: Any, args: Any) -> None:
        self._forward_hook.remove()
        self._forward_hook = None
        action, self._pending = self._pending, None
        with self._critical():
            if not self._finished:
                action()

    def _end_window(self) -> None:
        self._step_hook.remove()
        self._finished = True
        if self._recording:
            self._stop()

    def finish(self) -> None:
        """Write the file (at exit / on SIGTERM); a no-op in forked children and when done."""
        if os.getpid() != self.pid:
            return
        with self._critical():
            if self._finished:
                return
            self._finished = True
            if self._recording:
                self._stop()
            elif self.settings.steps is not None:
                print(f"vramtrace: the --steps window {L.format_steps(self.settings.steps)} never began "
                      f"(the run made {self.steps_done} optimizer steps); nothing written for this process",
                      file=sys.stderr)

    def _handle_sigterm(self) -> None:
        """SIGTERM kills without exit handlers: dump first, then die of it all the same. A
        handler the program installed itself is left alone (its exit runs ``finish``)."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
            return
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signo: int, frame: Any) -> None:
        if self._busy and os.getpid() == self.pid:
            self._term_pending = True     # interrupted a start or a dump: finish it, then die
            return
        self.finish()
        _die_of(signo)


def _die_of(signo: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signo, signal.SIG_DFL)
    os.kill(os.getpid(), signo)


def output_path(settings: Settings, pid: int) -> tuple[Path, bool]:
    """This process's file: per rank, else the base for the first process, else per pid; and
    whether it is such an extra process (a DataLoader worker, say), whose file is kept only if
    it recorded something."""
    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK")
    if rank is not None and rank.isdigit():
        return L.variant(settings.base, f"rank{rank}"), False
    if settings.manifest is None or _claim(settings.manifest):
        return settings.base, False
    return L.variant(settings.base, f"pid{pid}"), True


def _empty(path: Path) -> bool:
    """A snapshot without segments or events (only small files are read to find out)."""
    if path.stat().st_size > 4096:
        return False
    from vramtrace.snapshot.load import load_snapshot
    snap = load_snapshot(path)
    return not snap["segments"] and not any(snap["device_traces"])


def _claim(manifest: Path) -> bool:
    try:
        os.close(os.open(manifest / CLAIM_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
