"""The `vramtrace` command: a click group, one thin verb per module in vramtrace.commands."""
from __future__ import annotations

import importlib

import click

from vramtrace import __version__
from vramtrace.gcpause import gc_paused

# verb module -> click command attribute; each verb lives in vramtrace/commands/<verb>.py
VERBS = {
    "report": "report_command",
    "record": "record_command",
    "simulate": "simulate_command",
    "demo": "demo_command",
    "diff": "diff_command",
    "flame": "flame_command",
    "html": "html_command",
    "viz": "viz_command",
    "export": "export_command",
    "whatif": "whatif_command",
}
# Verbs that only read snapshot files: they run with the cyclic GC paused (see gcpause). A
# collection after loading would walk every frame list of the trace (~5 ms, a tenth of a
# report, on a 3 MB file) to find no garbage. Verbs that run training code keep it.
READING_VERBS = frozenset(("report", "diff", "flame", "html", "viz", "export", "whatif"))


class LazyGroup(click.Group):
    """Imports a verb only when it runs, so `vramtrace report` never pays for importing torch."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [v for v in VERBS if importlib.util.find_spec(f"vramtrace.commands.{v}")]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in VERBS or not importlib.util.find_spec(f"vramtrace.commands.{name}"):
            return None
        return getattr(importlib.import_module(f"vramtrace.commands.{name}"), VERBS[name])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vramtrace")
def cli() -> None:
    """Where does my GPU memory go? Record PyTorch's CUDA allocator (or a CPU shadow of it),
    attribute every byte to its owner, and compare runs.

    \b
      vramtrace demo                         record a tiny training run and report it
      vramtrace record -- python train.py    record an unmodified script
      vramtrace report run.pkl               who owned the memory at the peak
      vramtrace diff a.pkl b.pkl             what changed between two runs
    """
    ctx = click.get_current_context()
    if ctx.invoked_subcommand in READING_VERBS:
        ctx.with_resource(gc_paused())


def main() -> None:
    cli(prog_name="vramtrace")
