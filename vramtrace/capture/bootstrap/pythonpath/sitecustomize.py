"""vramtrace's bootstrap, put first on PYTHONPATH by ``vramtrace record``.

Python imports ``sitecustomize`` at start-up; this one arms recording for the process (see
``vramtrace.capture.bootstrap``) and then runs the ``sitecustomize`` it shadows, if any, so
distribution or user customisations keep working. It must never stop the program: any failure is
reported on one line and the program runs unrecorded.
"""
import importlib.machinery
import importlib.util
import os
import sys


def _chain_shadowed_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


if os.environ.get("VRAMTRACE_OUTPUT"):
    try:
        from vramtrace.capture.bootstrap import activate
        activate()
    except Exception as _exc:  # noqa: BLE001 - recording is optional, the user's program is not
        print(f"vramtrace: not recording this process: {_exc}", file=sys.stderr)

_chain_shadowed_sitecustomize()
