"""vramtrace: where does my GPU memory go?

Pipeline: capture -> snapshot file -> Trace model -> replay -> attribution -> renderers.
"""
__version__ = "0.1.0"
