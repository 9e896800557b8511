"""A corpus of bad and malicious files: each gets one clean error line, exit 2, and runs nothing."""
from __future__ import annotations

import json
import pickle
import pickletools
import random
import subprocess
import sys

import pytest
from click.testing import CliRunner

import snapshots as S
from vramtrace.cli import cli

MARKER = "vramtrace-pwned-marker"


def _malicious(marker_path: str) -> dict[str, bytes]:
    """Pickles that would run code (each creates ``marker_path``) if globals were resolved."""
    cmd = f"touch {marker_path}"

    class Reduce:
        def __reduce__(self):
            import os
            return (os.system, (cmd,))

    class Eval:
        def __reduce__(self):
            return (eval, (f"open({marker_path!r}, 'w')",))

    class Popen:
        def __reduce__(self):
            import subprocess
            return (subprocess.Popen, (["touch", marker_path],))

    proto0 = f"cos\nsystem\n(S'{cmd}'\ntR.".encode()
    posix = f"cposix\nsystem\n(S'{cmd}'\ntR.".encode()
    inst = f"(S'{cmd}'\nios\nsystem\n.".encode()
    nested = pickle.dumps({"segments": [Reduce()], "device_traces": []}, protocol=4)
    persistent = b"\x80\x04P0\n."
    build = b"\x80\x02cbuiltins\nobject\n)\x81}b."
    return {
        "reduce-os-system-p4": pickle.dumps(Reduce(), protocol=4),
        "reduce-os-system-p2": pickle.dumps(Reduce(), protocol=2),
        "reduce-eval": pickle.dumps(Eval(), protocol=4),
        "reduce-popen": pickle.dumps(Popen(), protocol=3),
        "protocol0-global": proto0,
        "posix-system": posix,
        "inst-opcode": inst,
        "nested-in-snapshot": nested,
        "persistent-id": persistent,
        "newobj-build": build,
    }


def _structural() -> dict[str, object]:
    bad_state = S.modern()
    bad_state["segments"][0]["blocks"][0]["state"] = "freed"
    no_size = S.modern()
    del no_size["segments"][0]["blocks"][1]["size"]
    no_action = S.modern()
    del no_action["device_traces"][0][1]["action"]
    odd_action = S.modern()
    odd_action["device_traces"][0][1]["action"] = "teleport"
    no_addr = S.modern()
    del no_addr["device_traces"][0][1]["addr"]
    bad_frame = S.modern()
    bad_frame["device_traces"][0][1]["frames"] = [{"name": 3, "filename": None, "line": "x"}]
    frame_missing = S.modern()
    frame_missing["device_traces"][0][2]["frames"] = [{"name": "f"}]
    unhashable_frame = S.modern()   # a list as a frame's name: cannot be a lookup key
    for row in unhashable_frame["device_traces"][0] + unhashable_frame["segments"][0]["blocks"]:
        row["frames"] = [{"name": ["f"], "filename": "a.py", "line": 1}]
    str_size = S.modern()
    str_size["device_traces"][0][1]["size"] = "big"
    huge_device = S.modern()
    huge_device["segments"][0]["device"] = 10**9
    return {
        "int": 42, "str": "hello", "none": None, "tuple": (1, 2), "list-of-ints": [1, 2, 3],
        "empty-dict": {}, "segments-not-list": {"segments": 5},
        "segment-not-dict": {"segments": ["x"]},
        "segment-no-blocks": {"segments": [{"address": 0, "total_size": 10}]},
        "traces-not-lists": {"segments": [], "device_traces": [5]},
        "event-not-dict": {"segments": [], "device_traces": [[7]]},
        "bad-block-state": bad_state, "block-no-size": no_size, "event-no-action": no_action,
        "unknown-action": odd_action, "alloc-no-addr": no_addr, "bad-frame-types": bad_frame,
        "frame-missing-keys": frame_missing, "frame-unhashable-name": unhashable_frame,
        "size-is-text": str_size, "absurd-device": huge_device,
        "settings-not-dict": dict(S.modern(), allocator_settings=[1]),
    }


def _corpus(tmp_path) -> dict[str, bytes]:
    rng = random.Random(1234)
    real = pickle.dumps(S.modern(), protocol=4)
    corpus: dict[str, bytes] = {"empty": b""}
    for cut in (1, 2, 10, len(real) // 2, len(real) - 1):
        corpus[f"truncated-{cut}"] = real[:cut]
    for n in (1, 17, 512, 4096):
        corpus[f"random-{n}"] = bytes(rng.getrandbits(8) for _ in range(n))
    for n in (3, 64, 1000):
        corpus[f"random-with-pickle-header-{n}"] = b"\x80\x04" + bytes(rng.getrandbits(8) for _ in range(n))
    corpus["deep-nesting"] = b"\x80\x04" + b"]" * 200_000 + b"a" * 199_999 + b"."
    corpus["huge-string-claim"] = b"\x80\x04X\xff\xff\xff\x7fabc."
    corpus["gzip"] = b"\x1f\x8b\x08\x00" + real[:50]
    corpus["bad-json"] = b'{"segments": [1, 2'
    corpus["json-list-of-ints"] = b"[1, 2, 3]"
    corpus["json-nan-sizes"] = json.dumps({"segments": [{"address": 0, "total_size": 1.5, "blocks": []}]}).encode()
    for name, obj in _structural().items():
        corpus[name] = pickle.dumps(obj, protocol=4)
    corpus.update(_malicious(str(tmp_path / MARKER)))
    return corpus


def test_corpus_is_large_enough(tmp_path):
    assert len(_corpus(tmp_path)) >= 30


def test_every_bad_file_gets_one_clean_line_and_exit_2(tmp_path):
    runner = CliRunner()
    failures = []
    for name, data in _corpus(tmp_path).items():
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(data)
        result = runner.invoke(cli, ["report", str(path)], catch_exceptions=False)
        lines = result.stderr.strip().splitlines()
        if not (result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"vramtrace: error: {path}: ")
                and "Traceback" not in result.output):
            failures.append((name, result.exit_code, result.stderr[-300:], result.stdout[-300:]))
    assert not failures, failures
    assert not (tmp_path / MARKER).exists(), "a crafted pickle ran code"


def test_malicious_pickles_would_really_run_code(tmp_path):
    """The corpus is meaningful: plain pickle.loads of one of them does create the marker."""
    marker = tmp_path / MARKER
    payload = _malicious(str(marker))["reduce-os-system-p4"]
    assert "system" in "".join(str(arg) for _, arg, _ in pickletools.genops(payload))
    subprocess.run([sys.executable, "-c", "import pickle,sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=payload, check=True)
    assert marker.exists()


@pytest.mark.parametrize("args", [["report", "/nonexistent/x.pkl"], ["report", "."]])
def test_missing_or_directory(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 2
    assert result.stderr.startswith("vramtrace: error:") or "Error:" in result.stderr


def test_cli_in_a_real_process_prints_no_traceback(tmp_path):
    path = tmp_path / "bad.pkl"
    path.write_bytes(_malicious(str(tmp_path / MARKER))["reduce-os-system-p4"])
    out = subprocess.run([sys.executable, "-m", "vramtrace", "report", str(path)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == f"vramtrace: error: {path}: corrupt or truncated file " \
                                 f"(refused to load posix.system: snapshots hold plain data only)" or \
        out.stderr.startswith(f"vramtrace: error: {path}: ")
    assert "Traceback" not in out.stderr and not (tmp_path / MARKER).exists()
