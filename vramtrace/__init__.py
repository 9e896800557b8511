"""vramtrace: where does my GPU memory go?

Pipeline: capture -> snapshot file -> Trace model -> replay -> attribution -> renderers.
"""
__version__ = "0.1.0"

__all__ = ["record"]


def __getattr__(name: str):
    """Lazy ``vramtrace.record``: importing the package must not import torch."""
    if name == "record":
        from vramtrace.capture.recorder import record
        return record
    raise AttributeError(f"module 'vramtrace' has no attribute {name!r}")
