"""In-process recorder: ``with vramtrace.record("run.pkl"): train()``.

``start``/``stop``/``dump`` are the stable entry points the ``vramtrace record -- CMD`` launcher
and its signal handlers build on. One recording per process at a time (the allocator history
and the global hooks are process-wide).
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any, Iterator, Protocol

from vramtrace.snapshot.save import write_snapshot

BACKENDS = ("auto", "cpu", "cuda")
DEFAULT_MAX_ENTRIES = 1_000_000   # ring buffer length, as torch's _record_memory_history


class Backend(Protocol):
    """What a capture backend provides to the recorder."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def snapshot(self) -> dict: ...


_lock = threading.Lock()
_current: "_Recording | None" = None


class _Recording:
    def __init__(self, path: str | os.PathLike, backend: Backend) -> None:
        self.path = Path(path)
        self.backend = backend


def _make_backend(backend: str, stacks: str | None, max_entries: int | None, **opts: Any) -> Backend:
    """Pick the backend: ``auto`` is CUDA when a device is usable, else the CPU tracker."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "auto":
        # not torch.cuda.is_available(): it initialises CUDA, and a later fork then fails
        from vramtrace.capture.cuda_backend import cuda_usable
        backend = "cuda" if cuda_usable() else "cpu"
    if backend == "cuda":
        try:
            from vramtrace.capture.cuda_backend import CudaBackend
        except ImportError as ex:
            raise RuntimeError("the CUDA capture backend is not available in this build") from ex
        return CudaBackend(stacks=stacks, max_entries=max_entries, **opts)
    from vramtrace.capture.cpu_backend import CpuBackend
    if opts:
        raise TypeError(f"unknown options for the cpu backend: {sorted(opts)}")
    # A recording of a real CPU run shows all it allocates, custom ops' scratch included.
    return CpuBackend(stacks=stacks, max_entries=max_entries, custom_op_internals=True)


def start(path: str | os.PathLike, *, backend: str = "auto", stacks: str | None = "python",
          max_entries: int | None = DEFAULT_MAX_ENTRIES, **opts: Any) -> None:
    """Start recording; ``stop()`` or ``dump()`` writes the snapshot to ``path``."""
    global _current
    with _lock:
        if _current is not None:
            raise RuntimeError(f"already recording to {_current.path}")
        rec = _Recording(path, _make_backend(backend, stacks, max_entries, **opts))
        rec.backend.start()
        _current = rec


def is_recording() -> bool:
    """Whether a recording is active in this process."""
    return _current is not None


def dump(path: str | os.PathLike | None = None) -> Path:
    """Write what has been recorded so far (recording continues); returns the file written."""
    rec = _current
    if rec is None:
        raise RuntimeError("not recording")
    return write_snapshot(rec.backend.snapshot(), path if path is not None else rec.path)


def stop() -> Path:
    """Stop recording and write the snapshot to the path given to ``start``; returns it."""
    global _current
    with _lock:
        rec = _current
        if rec is None:
            raise RuntimeError("not recording")
        _current = None
    rec.backend.stop()
    return write_snapshot(rec.backend.snapshot(), rec.path)


@contextlib.contextmanager
def record(path: str | os.PathLike, *, backend: str = "auto", stacks: str | None = "python",
           max_entries: int | None = DEFAULT_MAX_ENTRIES, **opts: Any) -> Iterator[None]:
    """Record GPU (or, on the CPU backend, tensor) memory with owner tags inside the block.

    The file is written when the block exits, also when it exits with an exception (that is
    when a snapshot is most wanted, e.g. after an out-of-memory error).
    """
    start(path, backend=backend, stacks=stacks, max_entries=max_entries, **opts)
    try:
        yield
    finally:
        stop()
