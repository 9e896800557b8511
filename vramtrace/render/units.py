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
