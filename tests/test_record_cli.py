"""`vramtrace record -- CMD` end to end: real child processes, real files, real signals.

Every file a run leaves must load and pass the PyTorch viewer's rules, whichever way the
command ended (normal exit, exception, sys.exit, SIGTERM sent to the launcher); the command's
stdout and exit status pass through. CUDA-only checks are marked ``cuda``.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, validate_memviz
from vramtrace.capture import recorder
from vramtrace.capture.bootstrap import Settings, is_launcher_process
from vramtrace.capture.cuda_backend import _Retag, finalize
from vramtrace.capture.launcher import LaunchError, parse_steps, script_name
from vramtrace.capture.nvml import NvmlSampler
from vramtrace.trace import load_trace

SCRIPTS = REPO / "tests" / "scripts"
TINY = SCRIPTS / "tiny_train.py"


def record(*args: object, cwd: Path, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "vramtrace", "record", *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=240, **kw)


def check_file(path: Path) -> dict:
    """The file loads (safely), passes the viewer rules, and has events; returns the raw dict."""
    validate_memviz(path)
    trace = load_trace(path)
    assert trace.n_events > 0
    with open(path, "rb") as fh:
        assert fh.read(2) == b"\x80\x04"          # pickle protocol 4
    return pickle.loads(path.read_bytes())


def only_file(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return found[0]


# -- end to end ---------------------------------------------------------------------------------

def test_stdout_passes_through_and_default_name(tmp_path):
    plain = subprocess.run([sys.executable, str(TINY)], capture_output=True, text=True, cwd=tmp_path)
    out = record("--", sys.executable, TINY, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == plain.stdout
    path = only_file(tmp_path, "vramtrace-tiny_train.*.pkl")
    assert re.fullmatch(r"vramtrace-tiny_train\.\d+\.pkl", path.name)
    snap = check_file(path)
    owners = {e.get("category") for e in snap["device_traces"][0]}
    assert {"optimizer", "gradient"} <= owners
    assert f"vramtrace: wrote {path.name}" in out.stderr
    assert "peak allocated" in out.stderr and "top owners at the peak" in out.stderr


@pytest.mark.parametrize("then, status", [("raise", 1), ("exit3", 3)])
def test_failing_script_leaves_complete_file(tmp_path, then, status):
    out = record("-o", tmp_path / "run.pkl", "--", sys.executable, TINY, "--then", then, cwd=tmp_path)
    assert out.returncode == status
    assert "step 2" in out.stdout
    check_file(tmp_path / "run.pkl")
    if then == "raise":
        assert "RuntimeError: planned failure" in out.stderr


def test_sigterm_to_launcher_is_forwarded_and_dumped(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "vramtrace", "record", "-o", str(tmp_path / "t.pkl"), "--",
                             sys.executable, str(TINY), "--then", "wait"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "READY" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM, err
    check_file(tmp_path / "t.pkl")


def test_refuses_to_overwrite_without_force(tmp_path):
    target = tmp_path / "run.pkl"
    target.write_bytes(b"precious")
    out = record("-o", target, "--", sys.executable, TINY, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"vramtrace: error: {target} already exists (use --force to overwrite it)"]
    assert out.stdout == "" and target.read_bytes() == b"precious"
    forced = record("-o", target, "--force", "--", sys.executable, TINY, "--steps", "1", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    check_file(target)


def test_refuses_when_a_rank_file_exists(tmp_path):
    (tmp_path / "run.rank0.pkl").write_bytes(b"x")
    out = record("-o", tmp_path / "run.pkl", "--", sys.executable, TINY, cwd=tmp_path)
    assert out.returncode == 2 and "run.rank0.pkl already exists" in out.stderr


def test_module_form(tmp_path):
    out = record("--", sys.executable, "-m", "tiny_train", "--steps", "1", cwd=tmp_path,
                 env={"PYTHONPATH": os.pathsep.join([str(REPO), str(SCRIPTS)])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("step 0")
    check_file(only_file(tmp_path, "vramtrace-tiny_train.*.pkl"))


def test_existing_sitecustomize_still_runs(tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    (own / "sitecustomize.py").write_text("print('users sitecustomize ran')\n")
    out = record("-o", tmp_path / "r.pkl", "--", sys.executable, TINY, "--steps", "1", cwd=tmp_path,
                 env={"PYTHONPATH": os.pathsep.join([str(REPO), str(own)])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "users sitecustomize ran"
    check_file(tmp_path / "r.pkl")


def test_steps_window_keeps_only_those_steps(tmp_path):
    full = record("-o", tmp_path / "full.pkl", "--", sys.executable, TINY, "--steps", "4", cwd=tmp_path)
    window = record("-o", tmp_path / "win.pkl", "--steps", "1:2", "--", sys.executable, TINY, "--steps", "4",
                    cwd=tmp_path)
    assert full.returncode == 0 and window.returncode == 0, window.stderr
    assert window.stdout == full.stdout
    n_full = sum(len(t) for t in check_file(tmp_path / "full.pkl")["device_traces"])
    n_win = sum(len(t) for t in check_file(tmp_path / "win.pkl")["device_traces"])
    assert 0 < n_win < n_full / 2
    late = record("-o", tmp_path / "late.pkl", "--steps", "9:", "--", sys.executable, TINY, cwd=tmp_path)
    assert late.returncode == 0
    assert "never began" in late.stderr and not (tmp_path / "late.pkl").exists()


def test_spawned_children_get_their_own_file_only_if_they_recorded(tmp_path):
    out = record("--backend", "cpu", "--", sys.executable, SCRIPTS / "spawn_children.py", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    names = sorted(re.sub(r"\d+", "N", p.name) for p in tmp_path.glob("*.pkl"))
    assert names == ["vramtrace-spawn_children.N.pidN.pkl", "vramtrace-spawn_children.N.pkl"]
    for p in tmp_path.glob("*.pkl"):
        check_file(p)


def test_command_without_torch_writes_nothing(tmp_path):
    out = record("--", sys.executable, "-c", "print('hi')", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == "hi\n"
    assert "no snapshot was written" in out.stderr
    assert not list(tmp_path.glob("*.pkl"))


@pytest.mark.parametrize("args, message", [
    (["--steps", "3:1", "--", "python", "x.py"], "--steps '3:1': the end step must be after the start step"),
    (["--steps", "a:b", "--", "python", "x.py"], "--steps 'a:b': expected A:B, A: or :B with whole numbers"),
    ([], "no command given"),
    (["--", "surely-no-such-program"], "cannot run 'surely-no-such-program'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    out = record(*args, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vramtrace: error: ") and message in lines[0]


@pytest.mark.slow
def test_torchrun_two_ranks_write_two_files(tmp_path):
    out = record("--", "torchrun", "--nproc-per-node", "2", SCRIPTS / "ddp_tiny.py", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert sorted(re.findall(r"rank \d done", out.stdout)) == ["rank 0 done", "rank 1 done"]
    files = sorted(tmp_path.glob("vramtrace-ddp_tiny.*.pkl"))
    assert [re.sub(r"\.\d+\.", ".N.", f.name) for f in files] == ["vramtrace-ddp_tiny.N.rank0.pkl",
                                                                  "vramtrace-ddp_tiny.N.rank1.pkl"]
    for f in files:
        check_file(f)


@pytest.mark.slow
def test_accelerate_launch_worker_records(tmp_path):
    """``accelerate launch`` runs the script in a child of its own: that worker records, named
    after the script, and the launcher process itself writes nothing."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate is not installed")
    out = record("--", "accelerate", "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", TINY, "--steps", "2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "step 1 loss" in out.stdout
    (path,) = tmp_path.glob("vramtrace-*.pkl")
    assert re.fullmatch(r"vramtrace-tiny_train\.\d+\.pkl", path.name), path.name
    cats = {e["category"] for t in check_file(path)["device_traces"] for e in t}
    assert {"trainable", "gradient", "optimizer"} <= cats   # every parameter of the script trains


# -- pieces -------------------------------------------------------------------------------------

def test_parse_steps():
    assert parse_steps("2:5") == (2, 5)
    assert parse_steps("3:") == (3, None)
    assert parse_steps(":4") == (0, 4)
    for bad in (":", "x", "5:5", "-1:3", "1:2:3"):
        with pytest.raises(LaunchError):
            parse_steps(bad)


def test_script_name():
    assert script_name(["python", "train.py", "--x"]) == "train"
    assert script_name(["python", "-m", "pkg.finetune"]) == "finetune"
    assert script_name(["torchrun", "--nproc-per-node", "2", "dir/train.py"]) == "train"
    assert script_name(["python", "-m", "torch.distributed.run", "--nnodes", "1", "t.py"]) == "t"
    assert script_name(["accelerate", "launch", "sft.py"]) == "sft"
    assert script_name(["bash", "run.sh"]) == "bash"


def test_is_launcher_process():
    assert is_launcher_process(["/usr/bin/python3", "/venv/bin/torchrun", "--nproc-per-node", "2", "t.py"])
    assert is_launcher_process(["python", "-u", "-m", "torch.distributed.run", "t.py"])
    assert is_launcher_process(["python", "-mtorch.distributed.launch", "t.py"])
    assert is_launcher_process(["python", "/venv/bin/accelerate", "launch", "t.py"])
    assert not is_launcher_process(["python", "-u", "train.py"])
    assert not is_launcher_process(["python", "-c", "import torch"])
    assert not is_launcher_process(["python", "-X", "dev", "-m", "train"])


def test_settings_reject_bad_environment(tmp_path):
    base = {"VRAMTRACE_OUTPUT": str(tmp_path / "x.pkl")}
    assert Settings.from_env(base).max_entries > 0
    for key, value in [("VRAMTRACE_BACKEND", "tpu"), ("VRAMTRACE_STACKS", "cpp"),
                       ("VRAMTRACE_MAX_ENTRIES", "0"), ("VRAMTRACE_STEPS", "4:2")]:
        with pytest.raises(ValueError):
            Settings.from_env({**base, key: value})


def _ev(action: str, addr: int, size: int, t: int, meta: str = "") -> dict:
    return {"action": action, "addr": addr, "size": size, "stream": 0, "time_us": t,
            "user_metadata": meta, "compile_context": "N/A", "frames": []}


def _tag(owner: str, **kw) -> str:
    return json.dumps({"owner": owner, "module": kw.get("module", "m.fc"), "phase": kw.get("phase", "forward"),
                       "step": kw.get("step", 0), "dtype": "fp32", "shape": [4], "param": kw.get("param", "")})


def test_finalize_joins_retags_to_the_allocation_live_at_the_time():
    a, b = 0x1000, 0x2000
    trace = [_ev("segment_alloc", a, 2 << 20, 1),
             _ev("alloc", a, 512, 2, _tag("temporary")),          # reused address: first life
             _ev("free_requested", a, 512, 5), _ev("free_completed", a, 512, 5),
             _ev("alloc", a, 512, 6, _tag("temporary")),          # second life, re-tagged at t=7
             _ev("alloc", b, 512, 8, _tag("temporary", phase="backward")),
             _ev("free_requested", a, 512, 20), _ev("free_completed", a, 512, 20),
             _ev("snapshot", 0, 0, 30)]
    retags = [_Retag(7, 0, a, _tag("activation", module="m.act")),
              _Retag(8, 0, a, _tag("input")),                    # made inside forward: not an input
              _Retag(9, 0, b, _tag("gradient", param="fc.weight", phase="backward")),
              _Retag(10, 0, b, _tag("activation")),              # lower priority: ignored
              _Retag(3, 1, a, _tag("weight"))]                   # another device: no trace there
    snap = finalize({"segments": [], "device_traces": [trace]}, retags)
    cats = [e["category"] for e in snap["device_traces"][0]]
    assert cats == ["unknown", "temporary", "temporary", "temporary", "activation", "gradient",
                    "activation", "activation", "unknown"]
    grad = json.loads(trace[5]["user_metadata"])
    assert grad["param"] == "fc.weight" and grad["phase"] == "backward"
    act = json.loads(trace[4]["user_metadata"])
    assert act["owner"] == "activation" and act["module"] == "m.fc"   # where it was allocated stays


def test_finalize_retag_slightly_before_its_alloc_on_the_allocator_clock():
    a = 0x1000
    trace = [_ev("alloc", a, 512, 100, _tag("temporary")),
             _ev("free_requested", a, 512, 150), _ev("free_completed", a, 512, 150),
             _ev("alloc", a, 512, 210, _tag("temporary")),      # clock says: after the re-tag
             _ev("alloc", 0x2000, 512, 5000, _tag("temporary"))]
    retags = [_Retag(200, 0, a, _tag("activation")),           # nothing live at a at t=200
              _Retag(300, 0, 0x2000, _tag("activation"))]      # too long before its alloc: dropped
    finalize({"segments": [], "device_traces": [trace]}, retags)
    assert [e["category"] for e in trace] == ["temporary"] * 3 + ["activation", "temporary"]


def test_finalize_applies_the_cpu_backends_lifetime_rules():
    """Phases as _set_memory_metadata stamps them: the loss and the frees after backward are
    "setup" on the main thread, backward and recompute run on the autograd thread."""
    fwd, bwd, rec, opt, setup = (_tag("temporary", phase=p) for p in
                                 ("forward", "backward", "recompute", "optimizer", "setup"))
    d, kept, loss, kept_rec, opt_tmp, opt_state = 0x100, 0x200, 0x300, 0x400, 0x500, 0x600
    trace = [_ev("alloc", d, 512, 1, fwd), _ev("free_requested", d, 512, 2, fwd),      # forward scratch
             _ev("alloc", kept, 512, 3, fwd),                  # on an autograd ctx: freed after backward
             _ev("alloc", loss, 512, 4, setup),                # the loss, outside the model
             _ev("alloc", 0x700, 512, 5, bwd),                 # backward begins: kept -> activation
             _ev("free_requested", 0x700, 512, 6, bwd),
             _ev("alloc", kept_rec, 512, 7, rec),              # recompute output, alive at the end
             _ev("alloc", 0x800, 512, 8, bwd),                 # back to backward: kept_rec kept
             _ev("free_requested", kept, 512, 9, setup), _ev("free_requested", loss, 512, 10, setup),
             _ev("alloc", opt_tmp, 512, 11, opt), _ev("free_requested", opt_tmp, 512, 12, opt),
             _ev("alloc", opt_state, 512, 13, opt),            # outlives the step: optimizer state
             _ev("alloc", 0x900, 512, 14, fwd),                # next forward
             _ev("free_requested", 0x900, 512, 15, _tag("temporary", phase="backward", step=1))]
    finalize({"segments": [], "device_traces": [trace]}, [])
    assert [(e["action"], e["category"]) for e in trace] == [
        ("alloc", "temporary"), ("free_requested", "temporary"),
        ("alloc", "activation"), ("alloc", "temporary"),
        ("alloc", "temporary"), ("free_requested", "temporary"),
        ("alloc", "activation"), ("alloc", "temporary"),
        ("free_requested", "activation"), ("free_requested", "temporary"),
        ("alloc", "temporary"), ("free_requested", "temporary"),
        ("alloc", "optimizer"), ("alloc", "activation"), ("free_requested", "activation")]
    assert json.loads(trace[2]["user_metadata"])["owner"] == "activation"
    assert json.loads(trace[12]["user_metadata"]) == {**json.loads(opt), "owner": "optimizer"}


def test_finalize_stamps_noted_contexts_where_torch_could_not():
    """Torch without _set_memory_metadata: events carry no metadata; each takes the context
    noted last at or before its time, and the lifetime rules then run on those phases as on stamped ones."""
    fwd, bwd, setup = (_tag("temporary", phase=p) for p in ("forward", "backward", "setup"))
    kept, scratch, grad = 0x100, 0x200, 0x300
    trace = [{k: v for k, v in _ev(action, addr, 512, t).items() if k != "user_metadata"}
             for action, addr, t in (("alloc", 0x50, 5),                 # before the first context
                                     ("alloc", kept, 10), ("alloc", scratch, 11),
                                     ("free_requested", scratch, 12),
                                     ("alloc", grad, 20),                # the exact time of a change
                                     ("free_requested", kept, 31))]
    contexts = [(7, fwd), (20, bwd), (30, setup)]
    finalize({"segments": [], "device_traces": [trace]}, [], contexts)
    assert "user_metadata" not in trace[0] and trace[0]["category"] == "unknown"
    assert [json.loads(e["user_metadata"])["phase"] for e in trace[1:]] == \
        ["forward", "forward", "forward", "backward", "setup"]
    assert [e["category"] for e in trace] == ["unknown", "activation", "temporary", "temporary",
                                              "temporary", "activation"]


def test_finalize_keeps_cublas_workspaces_out_of_the_activations(monkeypatch):
    """cuBLAS (and a separate cuBLASLt) workspace is made in the first forward matmul and never
    freed: by the lifetime rules alone it would be an activation. Known by its C++ frame, or
    with Python stacks only by its size, never freed and never re-tagged; a tensor of that size
    kept by autograd is still an activation. The engine thread's own, made in backward, is a
    temporary either way, and gets the mark too."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("CUBLASLT_WORKSPACE_SIZE", raising=False)
    fwd, bwd = _tag("temporary"), _tag("temporary", phase="backward")
    ws, ctx_saved, saved, odd, by_frame, lt, ws_bwd = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x7000, 0x8000
    hopper, older = 32 << 20, (8 << 20) + (128 << 10)
    cxx = {**_ev("alloc", by_frame, 4 << 20, 5, fwd),
           "frames": [{"name": "at::cuda::getNewWorkspace()", "filename": "??", "line": 0}]}
    trace = [_ev("alloc", ws, hopper, 1, fwd),             # the workspace: never freed
             _ev("alloc", ctx_saved, hopper, 2, fwd),      # same size, on an autograd ctx: freed
             _ev("alloc", saved, older, 3, fwd),           # a workspace's size, saved for backward
             _ev("alloc", odd, hopper + 512, 4, fwd),      # not a workspace's size
             cxx,                                          # CUBLAS_WORKSPACE_CONFIG's own size
             _ev("alloc", lt, 1 << 20, 6, fwd),            # cuBLASLt's, CUBLASLT_WORKSPACE_SIZE's default
             _ev("alloc", 0x6000, 512, 7, bwd),            # backward begins
             _ev("alloc", ws_bwd, hopper, 8, bwd),         # the autograd thread's handle
             _ev("free_requested", ctx_saved, hopper, 9, bwd)]
    finalize({"segments": [], "device_traces": [trace]}, [_Retag(3, 0, saved, _tag("activation"))])
    assert [e["category"] for e in trace] == ["temporary", "activation", "activation", "activation",
                                              "temporary", "temporary", "temporary", "temporary", "activation"]
    marks = [json.loads(e["user_metadata"]).get("workspace") for e in trace if e["action"] == "alloc"]
    assert marks == ["cuBLAS", None, None, None, "cuBLAS", "cuBLASLt", None, "cuBLAS"]
    meta = json.loads(trace[0]["user_metadata"])
    assert meta["phase"] == "forward" and meta["owner"] == "temporary"


def test_finalize_unknown_owner_names_become_unknown():
    trace = [_ev("alloc", 0x1000, 512, 1, _tag("my-own-owner")), _ev("alloc", 0x2000, 512, 2, "free text")]
    snap = finalize({"segments": [], "device_traces": [trace]}, [])
    assert [e["category"] for e in snap["device_traces"][0]] == ["unknown", "unknown"]
    assert trace[1]["user_metadata"] == "free text"


def test_cuda_backend_degrades_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only path")
    path = tmp_path / "empty.pkl"
    recorder.start(path, backend="cuda")
    torch.nn.Linear(4, 4)(torch.randn(2, 4)).sum().backward()
    assert recorder.stop() == path
    snap = pickle.loads(path.read_bytes())
    assert snap["segments"] == [] and snap["device_traces"] == []
    validate_memviz(path)


def test_auto_backend_asks_without_initialising_cuda(monkeypatch):
    def is_available() -> bool:
        raise AssertionError("torch.cuda.is_available() initialises CUDA and breaks a later fork")
    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    monkeypatch.setattr(torch.cuda, "_is_compiled", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: 0, raising=False)
    assert recorder._make_backend("auto", "python", 10).name == "cpu"
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: 2, raising=False)
    assert recorder._make_backend("auto", "python", 10).name == "cuda"


def test_nvml_sampler_without_a_driver_starts_nothing():
    sampler = NvmlSampler(0.01)
    started = sampler.start()
    sampler.stop()
    if not started:
        assert sampler.samples() == []
    else:
        assert all(set(s) >= {"time_us", "device", "used", "total"} for s in sampler.samples())


# -- CUDA -----------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_recording_end_to_end(tmp_path):
    out = record("-o", tmp_path / "g.pkl", "--backend", "cuda", "--", sys.executable, TINY, "--device", "cuda",
                 cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    snap = check_file(tmp_path / "g.pkl")
    events = [e for t in snap["device_traces"] for e in t]
    cats = {e["category"] for e in events}
    assert "unknown" in cats and {"weight", "optimizer", "gradient"} & cats
    assert len(cats) <= 10
    assert snap["vramtrace_nvml"] and {"time_us", "device", "used", "total"} <= set(snap["vramtrace_nvml"][0])
    assert snap["vramtrace_backend"] == "cuda"
    assert all(json.loads(e["user_metadata"])["owner"] for e in events if e["action"] == "alloc")
    # After the last step nothing is saved for backward: a block still alive as an "activation"
    # is a library's (the cuBLAS workspace, made in the first forward matmul, never freed).
    alive: dict[tuple[int, int], dict] = {}
    for device, trace in enumerate(snap["device_traces"]):
        for e in trace:
            if e["action"] == "alloc":
                alive[device, e["addr"]] = e
            elif e["action"] in ("free_requested", "free_completed"):
                alive.pop((device, e["addr"]), None)
    assert [(e["size"], e["user_metadata"]) for e in alive.values() if e["category"] == "activation"] == []
    workspaces = [e for e in alive.values() if json.loads(e["user_metadata"]).get("workspace") == "cuBLAS"]
    assert workspaces and {e["category"] for e in workspaces} == {"temporary"}


@pytest.mark.cuda
def test_cuda_oom_observer_dumps_before_the_error(tmp_path):
    path = tmp_path / "oom.pkl"
    recorder.start(path, backend="cuda")
    try:
        keep = torch.empty(1 << 20, device="cuda")
        free, _ = torch.cuda.mem_get_info()
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(free * 4, dtype=torch.uint8, device="cuda")
        written = pickle.loads(path.read_bytes())       # written by the observer, before stop()
        assert any(e["action"] == "oom" for t in written["device_traces"] for e in t)
        del keep
    finally:
        recorder.stop()
    check_file(path)
