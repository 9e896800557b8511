"""Human-readable byte counts and times, shared by every renderer."""
from __future__ import annotations


def fmt_bytes(n: int | float | None) -> str:
    """1536 -> '1.5 KiB'; binary units, as nvidia-smi's MiB and PyTorch's own printouts."""
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_signed_bytes(n: int) -> str:
    return ("+" if n > 0 else "") + fmt_bytes(n)


def fmt_share(share: float) -> str:
    return f"{100 * share:.1f}%"


def fmt_seconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f} s"


def fmt_point(point: dict, start_us: int | None) -> str:
    """A peak of a report: its bytes, after which event, and how far into the trace (torch's
    time_us are wall-clock epoch microseconds, meaningless to a reader as they stand)."""
    where = "before the first event" if point["index"] < 0 else f"after event {point['index']}"
    timed = point["time_us"] is not None and start_us is not None and point["index"] >= 0
    return f"{fmt_bytes(point['bytes'])} {where}" + (
        f", {fmt_seconds((point['time_us'] - start_us) / 1e6)} into the trace" if timed else "")


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'24GiB', '24 GB', '1.5g', '4096' -> bytes (GB is 10^9, GiB and bare G are 2^30)."""
    import re
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size like 24GiB, 80GB or 1048576")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
