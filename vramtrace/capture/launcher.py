"""Parent side of ``vramtrace record -- CMD``: run a command unmodified while every Python
process it starts records GPU memory.

The launcher never touches the command's Python processes directly: it puts
``bootstrap/pythonpath`` (a ``sitecustomize`` that chains to any existing one) on ``PYTHONPATH``
and describes the recording in ``VRAMTRACE_*`` environment variables, which every descendant
inherits (``torchrun`` and ``accelerate launch`` workers included). Each recording process writes
its own file and notes its path in a manifest directory, so the launcher can say at the end
which files the run produced. Stdio is inherited untouched; SIGINT/SIGTERM are forwarded and the
child's exit status is passed on as the launcher's own.
"""
from __future__ import annotations

import os
import re
import signal
import site
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import vramtrace
from vramtrace.capture.recorder import DEFAULT_MAX_ENTRIES

BOOTSTRAP_PATH = Path(__file__).resolve().parent / "bootstrap" / "pythonpath"
PACKAGE_ROOT = Path(vramtrace.__file__).resolve().parent.parent

STACKS = ("python", "all")

# Environment contract between this launcher and bootstrap (read in bootstrap/__init__.py).
ENV_OUTPUT = "VRAMTRACE_OUTPUT"          # absolute base path of the run's file(s)
ENV_BACKEND = "VRAMTRACE_BACKEND"
ENV_STACKS = "VRAMTRACE_STACKS"
ENV_MAX_ENTRIES = "VRAMTRACE_MAX_ENTRIES"
ENV_STEPS = "VRAMTRACE_STEPS"            # "A:B", "A:" or unset
ENV_MANIFEST = "VRAMTRACE_MANIFEST"      # directory: a claim file and one <pid>.path per file written

# Launchers whose own process only spawns workers: they pass the environment on but do not record.
LAUNCHER_SCRIPTS = frozenset({"torchrun", "accelerate", "deepspeed"})
LAUNCHER_MODULES = frozenset({"torch.distributed.run", "torch.distributed.launch",
                              "accelerate.commands.launch", "accelerate.commands.accelerate_cli",
                              "deepspeed.launcher.runner", "deepspeed.launcher.launch"})

# Signals after which dying the same way is the faithful pass-through (core-dumping ones are not).
_REDELIVER = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL,
                        signal.SIGPIPE, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM})
_FORWARD = (signal.SIGINT, signal.SIGTERM)


class LaunchError(Exception):
    """Bad input for ``record``: the CLI prints the message on one line and exits 2."""


@dataclass(frozen=True)
class RecordOptions:
    """What ``vramtrace record`` was asked to do (validated by ``parse_steps`` and the CLI)."""

    output: Path | None = None
    stacks: str = "python"
    max_entries: int = DEFAULT_MAX_ENTRIES
    steps: tuple[int, int | None] | None = None
    backend: str = "auto"
    force: bool = False


@dataclass(frozen=True)
class RunResult:
    """How the command ended and which snapshot files its processes wrote."""

    returncode: int          # os.waitstatus_to_exitcode(): negative for death by a signal
    files: list[Path]


def parse_steps(text: str) -> tuple[int, int | None]:
    """Parse ``A:B`` (optimizer steps A..B-1, counted from 0) or ``A:`` (from A to the end)."""
    m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", text)
    if not m or not (m.group(1) or m.group(2)):
        raise LaunchError(f"--steps {text!r}: expected A:B, A: or :B with whole numbers")
    start = int(m.group(1) or 0)
    stop = int(m.group(2)) if m.group(2) else None
    if stop is not None and stop <= start:
        raise LaunchError(f"--steps {text!r}: the end step must be after the start step")
    return start, stop


def format_steps(steps: tuple[int, int | None]) -> str:
    return f"{steps[0]}:{'' if steps[1] is None else steps[1]}"


def script_name(cmd: Sequence[str]) -> str:
    """Name of what the command runs, for the default file name: ``train`` for ``python
    train.py``, ``torchrun ... train.py`` and ``accelerate launch train.py``; the module's last
    part for ``-m pkg.mod`` (unless it is a launcher); else the program's name."""
    for arg in cmd:
        if arg.endswith(".py") and not arg.startswith("-"):
            return _safe(Path(arg).stem)
    for flag, value in zip(cmd, cmd[1:]):
        if flag == "-m" and value not in LAUNCHER_MODULES:
            return _safe(value.rsplit(".", 1)[-1])
    return _safe(Path(cmd[0]).name) if cmd else "run"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "run"


def output_base(opts: RecordOptions, cmd: Sequence[str], run_id: int) -> Path:
    """Absolute base path: ``-o FILE`` or ``vramtrace-<script>.<launcher pid>.pkl`` in the cwd.
    Ranks write ``<stem>.rank<N><suffix>`` beside it (see ``variant``)."""
    if opts.output is not None:
        return Path(os.path.abspath(opts.output))
    return Path.cwd() / f"vramtrace-{script_name(cmd)}.{run_id}.pkl"


def variant(base: Path, label: str) -> Path:
    """``out.pkl`` -> ``out.<label>.pkl``: the file of one rank or of an extra process."""
    return base.with_name(f"{base.stem}.{label}{base.suffix or '.pkl'}")


def check_overwrite(base: Path, force: bool) -> None:
    """Refuse to start when the run would replace an existing snapshot file."""
    if force:
        return
    taken = [base] if base.exists() else sorted(base.parent.glob(f"{glob_escape(base.stem)}.rank*{base.suffix}"))
    if taken:
        raise LaunchError(f"{taken[0]} already exists (use --force to overwrite it)")
    if not base.parent.is_dir():
        raise LaunchError(f"cannot write {base}: {base.parent} is not a directory")


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def child_environment(opts: RecordOptions, base: Path, manifest: Path,
                      environ: dict[str, str] | None = None) -> dict[str, str]:
    """The command's environment: the caller's plus the bootstrap on PYTHONPATH and the settings."""
    env = dict(os.environ if environ is None else environ)
    paths = [str(BOOTSTRAP_PATH)]
    if not _installed():   # a source checkout: the child must find vramtrace here too
        paths.append(str(PACKAGE_ROOT))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env[ENV_OUTPUT] = str(base)
    env[ENV_BACKEND] = opts.backend
    env[ENV_STACKS] = opts.stacks
    env[ENV_MAX_ENTRIES] = str(opts.max_entries)
    env[ENV_MANIFEST] = str(manifest)
    if opts.steps is not None:
        env[ENV_STEPS] = format_steps(opts.steps)
    else:
        env.pop(ENV_STEPS, None)
    return env


def _installed() -> bool:
    """Whether vramtrace lives in a site-packages directory (then never put that on PYTHONPATH:
    it would reorder every import of the child)."""
    roots = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    return PACKAGE_ROOT in roots


def written_files(manifest: Path) -> list[Path]:
    """Files the run's processes reported writing (each ``<pid>.path`` holds one path per line)."""
    found: set[Path] = set()
    for entry in manifest.glob("*.path"):
        found.update(Path(line) for line in entry.read_text().splitlines() if line)
    return sorted(p for p in found if p.exists())


def record(cmd: Sequence[str], opts: RecordOptions) -> RunResult:
    """Run ``cmd`` with recording on in every Python process it starts; wait for it to end."""
    if not cmd:
        raise LaunchError("no command given (usage: vramtrace record [OPTIONS] -- CMD [ARGS]...)")
    base = output_base(opts, cmd, os.getpid())
    check_overwrite(base, opts.force)
    with tempfile.TemporaryDirectory(prefix="vramtrace-") as tmp:
        manifest = Path(tmp)
        env = child_environment(opts, base, manifest)
        returncode = _run(list(cmd), env)
        return RunResult(returncode, written_files(manifest))


def _run(cmd: list[str], env: dict[str, str]) -> int:
    if hasattr(signal, "sigtimedwait") and hasattr(os, "posix_spawnp"):
        return _run_posix(cmd, env)
    return _run_portable(cmd, env)


def _spawn_error(cmd: list[str], exc: OSError) -> LaunchError:
    return LaunchError(f"cannot run {cmd[0]!r}: {exc.strerror or exc}")


def _run_posix(cmd: list[str], env: dict[str, str]) -> int:
    """Spawn with SIGINT/SIGTERM/SIGCHLD blocked here and collected with sigtimedwait, so each
    signal is looked at once: one the terminal sent to the whole foreground process group has
    already reached the child and is not sent twice (a second KeyboardInterrupt would cut the
    child's final dump short); any other is forwarded."""
    waited = {*_FORWARD, signal.SIGCHLD}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    try:
        try:
            # Python ignores SIGPIPE/SIGXFSZ for itself; the child gets them back (as Popen does).
            pid = os.posix_spawnp(cmd[0], cmd, env, setsigmask=(),
                                  setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        except OSError as exc:
            raise _spawn_error(cmd, exc) from None
        same_group = os.getpgid(pid) == os.getpgrp()
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            info = signal.sigtimedwait(waited, 0.5)
            if info is None or info.si_signo == signal.SIGCHLD:
                continue
            from_terminal = info.si_code == _SI_KERNEL and info.si_pid == 0
            if not (from_terminal and same_group):
                _kill_quietly(pid, info.si_signo)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


_SI_KERNEL = 0x80  # siginfo si_code of signals the kernel raised itself (e.g. the tty's ^C)


def _run_portable(cmd: list[str], env: dict[str, str]) -> int:
    """Fallback without sigtimedwait: forward SIGTERM; SIGINT reaches the child from the tty."""
    try:
        proc = subprocess.Popen(cmd, env=env)
    except OSError as exc:
        raise _spawn_error(cmd, exc) from None
    previous = signal.signal(signal.SIGTERM, lambda signo, _frame: _kill_quietly(proc.pid, signo))
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, old_int)


def _kill_quietly(pid: int, signo: int) -> None:
    try:
        os.kill(pid, signo)
    except ProcessLookupError:
        pass


def exit_like(returncode: int) -> int:
    """End the launcher the way the child ended: die by the same signal where that is faithful
    (so shells and supervisors see the same status); otherwise return the exit code to use."""
    if returncode >= 0:
        return returncode
    signo = -returncode
    if signo in _REDELIVER:
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signo, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signo})
        os.kill(os.getpid(), signo)
    return 128 + signo
