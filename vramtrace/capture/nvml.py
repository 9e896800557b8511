"""Background sampler of device memory as NVML sees it (``pynvml``, from nvidia-ml-py).

The caching allocator only knows its own segments; NVML's "used" also counts the CUDA context,
NCCL and cuBLAS/cuDNN workspaces and managed memory (bitsandbytes' paged optimizers), so the gap
between the two is what lives outside PyTorch's allocator (DESIGN §4). Samples go into the
snapshot under ``vramtrace_nvml`` as ``{'time_us', 'device', 'used', 'total'}`` (plus
``'process'``: this process's bytes where NVML reports them), plain ints only.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from typing import Any

DEFAULT_INTERVAL_S = 0.1
DEFAULT_MAX_SAMPLES = 200_000   # bounded: ~5.5 h of one device at 10 Hz, the oldest dropped first


def _pynvml() -> Any | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def device_handles(pynvml: Any, cuda_uuids: list[str] | None) -> list[tuple[int, Any]]:
    """(CUDA device index, NVML handle) pairs. NVML numbers devices in PCI order and ignores
    CUDA_VISIBLE_DEVICES, so CUDA devices are matched by UUID; without UUIDs, NVML's order."""
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    if not cuda_uuids:
        return list(enumerate(handles))
    by_uuid = {_text(pynvml.nvmlDeviceGetUUID(h)).removeprefix("GPU-"): h for h in handles}
    return [(i, by_uuid[u.removeprefix("GPU-")]) for i, u in enumerate(cuda_uuids)
            if u.removeprefix("GPU-") in by_uuid]


class NvmlSampler:
    """Samples used/total memory of each device on a daemon thread until ``stop()``."""

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S,
                 max_samples: int = DEFAULT_MAX_SAMPLES) -> None:
        self.interval_s = interval_s
        self._samples: collections.deque[dict[str, int]] = collections.deque(maxlen=max_samples)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any | None = None
        self._handles: list[tuple[int, Any]] = []

    def start(self, cuda_uuids: list[str] | None = None) -> bool:
        """Begin sampling; False (and nothing started) where NVML or a GPU is missing."""
        pynvml = _pynvml()
        if pynvml is None or self._thread is not None:
            return False
        try:
            pynvml.nvmlInit()
            self._handles = device_handles(pynvml, cuda_uuids)
        except Exception:  # pynvml raises NVMLError subclasses; any failure means: no NVML here
            return False
        if not self._handles:
            pynvml.nvmlShutdown()
            return False
        self._nvml = pynvml
        self._stop.clear()
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="vramtrace-nvml", daemon=True)
        self._thread.start()
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        """Take one sample of every device now (also called at dump time for a last point)."""
        pynvml = self._nvml
        if pynvml is None:
            return
        now = time.time_ns() // 1000
        pid = os.getpid()
        for device, handle in self._handles:
            try:
                info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception:  # a device that stops answering ends its samples, not the run
                continue
            row = {"time_us": int(now), "device": int(device), "used": int(info.used),
                   "total": int(info.total)}
            mine = self._process_bytes(handle, pid)
            if mine is not None:
                row["process"] = mine
            self._samples.append(row)

    def _process_bytes(self, handle: Any, pid: int) -> int | None:
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception:  # not supported on every driver / in every container
            return None
        for proc in procs:
            if proc.pid == pid and isinstance(proc.usedGpuMemory, int):
                return int(proc.usedGpuMemory)
        return None

    def samples(self) -> list[dict[str, int]]:
        return list(self._samples)

    def stop(self) -> None:
        """Stop the thread and release NVML; the samples stay readable."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # shutting down a library that already failed is not an error
                pass
            self._nvml = None
