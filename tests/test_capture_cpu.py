"""The in-process recorder on the CPU backend: API, file format, tags, and agreement with
torch.profiler (the tracker sees the same bytes and does not change them)."""
from __future__ import annotations

import itertools
import json
import pickle
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import REPO, tiny_llama_config, validate_memviz  # noqa: E402
from profiler_memory import profiled_memory  # noqa: E402

import vramtrace  # noqa: E402
from vramtrace.attribution import taxonomy as tx  # noqa: E402
from vramtrace.capture import recorder  # noqa: E402
from vramtrace.capture.tagging import Tag, TaggingContext, tagging_hooks  # noqa: E402
from vramtrace.snapshot.load import read_raw  # noqa: E402


def tiny_llama() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(tiny_llama_config())
    m.train()
    return m, torch.optim.AdamW(m.parameters()), torch.randint(0, 128, (2, 16))


def step(m: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    out = m(input_ids=x, labels=x)
    out.loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, dict]:
    """Two fp32 AdamW steps, model and optimizer built before recording."""
    m, opt, x = tiny_llama()
    path = tmp_path_factory.mktemp("rec") / "run.pkl"
    with vramtrace.record(path, backend="cpu"):
        for _ in range(2):
            step(m, opt, x)
    return path, read_raw(path)


def allocs(snap: dict) -> list[dict]:
    return [e for e in snap["device_traces"][0] if e["action"] == "alloc"]


def test_package_import_does_not_import_torch() -> None:
    code = "import sys, vramtrace; assert 'torch' not in sys.modules; vramtrace.record; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_file_is_viewer_safe_and_loads_in_memory_viz(recorded) -> None:
    path, snap = recorded
    raw = path.read_bytes()
    assert raw[:2] == b"\x80\x04"                      # pickle protocol 4
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # atomic write
    validate_memviz(path)
    from torch.cuda import _memory_viz
    with open(path, "rb") as fh:
        data = pickle.load(fh)
    assert "<html" in _memory_viz.trace_plot(data).lower()
    assert "<html" in _memory_viz.segment_plot(data).lower()
    segs = snap["segments"]
    assert segs and all(sum(b["size"] for b in s["blocks"]) == s["total_size"] for s in segs)


def test_file_says_it_was_recorded_by_the_cpu_shadow(recorded) -> None:
    """Addresses and segments of a CPU recording are the allocator model's: reports say so."""
    from vramtrace.attribution.breakdown import build_report
    from vramtrace.render.report_markdown import render_markdown
    from vramtrace.trace import load_trace
    path, snap = recorded
    assert snap["vramtrace_backend"] == "cpu"
    report = build_report(load_trace(path))
    assert report["recorded_by"] == "cpu"
    assert "Recorded by vramtrace's CPU shadow allocator." in render_markdown(report)


def test_every_alloc_carries_owner_and_metadata(recorded) -> None:
    _, snap = recorded
    owners = set()
    for e in allocs(snap):
        assert e["category"] in tx.OWNERS
        meta = json.loads(e["user_metadata"])
        assert tuple(meta) == tx.METADATA_KEYS
        assert meta["owner"] == e["category"]
        assert meta["phase"] in tx.PHASES
        owners.add(e["category"])
    assert {tx.TRAINABLE, tx.GRADIENT, tx.OPTIMIZER, tx.ACTIVATION, tx.TEMPORARY, tx.INPUT} <= owners
    assert any(e.get("category") == tx.UNKNOWN for e in snap["device_traces"][0])  # viewer rule


def test_preexisting_parameters_are_recorded_with_names(recorded) -> None:
    _, snap = recorded
    m, _, _ = tiny_llama()
    params = {json.loads(e["user_metadata"])["param"] for e in allocs(snap) if e["category"] == tx.TRAINABLE}
    assert params == {n for n, _ in m.named_parameters()}


def test_roles_and_phases_join_by_allocation_not_address(recorded) -> None:
    _, snap = recorded
    metas = [(e, json.loads(e["user_metadata"])) for e in allocs(snap)]
    grads = [m for e, m in metas if e["category"] == tx.GRADIENT]
    assert grads and all(m["phase"] == "backward" and m["param"] for m in grads)
    opt = [m for e, m in metas if e["category"] == tx.OPTIMIZER]
    assert opt and all(m["phase"] == "optimizer" and m["step"] == 0 for m in opt)  # lazy state, step 1
    acts = [m for e, m in metas if e["category"] == tx.ACTIVATION]
    assert all(m["phase"] == "forward" and m["module"].startswith("LlamaForCausalLM") for m in acts)
    assert {m["step"] for m in acts} == {0, 1}
    owners_at: dict[int, set] = {}
    for e, _ in metas:
        owners_at.setdefault(e["addr"], set()).add(e["category"])
    assert any(len(s) > 1 for s in owners_at.values())   # an address reused by different owners


def test_frames_are_python_innermost_first_without_tracker_frames(recorded) -> None:
    _, snap = recorded
    own = str(REPO / "vramtrace" / "capture")
    made_in_forward = [e for e in allocs(snap) if json.loads(e["user_metadata"])["phase"] == "forward"]
    assert made_in_forward
    for e in made_in_forward:
        fr = e["frames"]
        assert fr and all(isinstance(f["name"], str) and isinstance(f["filename"], str) and isinstance(f["line"], int)
                          for f in fr)
        assert not any(f["filename"].startswith(own) or f["filename"].endswith("_python_dispatch.py") for f in fr)
    files = [f["filename"] for f in made_in_forward[0]["frames"]]
    assert __file__ in files and files[0] != __file__          # innermost first: the test is outer


def _stack_read_now() -> list[tuple[str, str, int]]:
    """The caller's stack as (name, filename, f_lineno), read eagerly."""
    out, f = [], sys._getframe(1)
    while f is not None:
        out.append((f.f_code.co_name, f.f_code.co_filename, f.f_lineno))
        f = f.f_back
    return out


def test_captured_stacks_resolve_to_the_lines_f_lineno_gave() -> None:
    """Stacks are captured natively and resolved at dump: the lines f_lineno read at capture."""
    from vramtrace.capture import cpu_backend

    def gen():
        yield cpu_backend.capture_stack(), _stack_read_now()

    def nested(depth: int):
        if depth:
            return nested(depth - 1)
        return [cpu_backend.capture_stack(), _stack_read_now()] + [x for pair in gen() for x in pair]

    raws, eager, raws_gen, eager_gen = nested(3)
    resolved = cpu_backend.resolve_stacks([raws, raws_gen, None, raws])
    assert resolved[2] == []
    for frames, seen in ((resolved[0], eager), (resolved[1], eager_gen)):
        # none of these frames is vramtrace's or torch dispatch's, so none is left out
        assert [(f["name"], f["filename"], f["line"]) for f in frames] == seen
    assert resolved[3] == resolved[0] and resolved[3] is not resolved[0]   # a list of its own per event


def test_gradient_checkpointing_records_recompute(tmp_path: Path) -> None:
    m, opt, x = tiny_llama()
    m.gradient_checkpointing_enable()
    path = tmp_path / "ckpt.pkl"
    with vramtrace.record(path, backend="cpu"):
        step(m, opt, x)
    metas = [(e["category"], json.loads(e["user_metadata"])) for e in allocs(read_raw(path))]
    recomputed = [(c, m) for c, m in metas if m["phase"] == "recompute"]
    assert recomputed and any(c == tx.ACTIVATION for c, _ in recomputed)
    assert all(m["module"] for _, m in recomputed)
    validate_memviz(path)


def test_start_dump_stop_and_misuse(tmp_path: Path) -> None:
    m, opt, x = tiny_llama()
    final, mid = tmp_path / "final.pkl", tmp_path / "mid.pkl"
    recorder.start(final, backend="cpu", max_entries=200)
    try:
        with pytest.raises(RuntimeError):
            recorder.start(tmp_path / "other.pkl", backend="cpu")
        step(m, opt, x)
        assert recorder.dump(mid) == mid
        step(m, opt, x)
    finally:
        assert recorder.stop() == final
    with pytest.raises(RuntimeError):
        recorder.stop()
    validate_memviz(mid, final)
    snap = read_raw(final)
    assert len(snap["device_traces"][0]) <= 201       # ring buffer (+ the 'unknown' marker)
    assert len(read_raw(mid)["device_traces"][0]) <= 201
    with pytest.raises(ValueError):
        recorder.start(final, backend="tpu")


def test_tracker_keeps_nothing_alive(tmp_path: Path) -> None:
    with vramtrace.record(tmp_path / "t.pkl", backend="cpu"):
        t = torch.empty(1000)
        ref = weakref.ref(t)
        del t
        assert ref() is None
    trace = read_raw(tmp_path / "t.pkl")["device_traces"][0]
    assert [e["action"] for e in trace if e.get("size") == 4000] == ["alloc", "free_requested", "free_completed"]


def test_backward_keeps_nothing_alive(tmp_path: Path) -> None:
    """The stack shared by the engine's ops holds the engine's frame, whose locals hold the
    loss: it must be let go when the pass ends."""
    m, _, x = tiny_llama()
    with vramtrace.record(tmp_path / "b.pkl", backend="cpu"):
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        ref = weakref.ref(loss)
        del loss
        assert ref() is None


def test_stacks_shared_in_backward_are_the_ones_each_event_would_capture(tmp_path: Path,
                                                                          monkeypatch) -> None:
    """Backward events under the engine's frame reuse one captured stack: every event's
    frames are those capturing at each event gives (the reuse switched off by hiding the
    engine's code), with a checkpoint's recompute and a Python gradient hook that allocates
    between the engine's own ops."""
    from vramtrace.capture import cpu_backend

    def frames_of_a_step(path: Path) -> list[list[tuple]]:
        m, opt, x = tiny_llama()
        m.gradient_checkpointing_enable()
        w = torch.randn(64, 64, requires_grad=True)
        with vramtrace.record(path, backend="cpu"):
            step(m, opt, x)
            h = w * 2
            h.register_hook(lambda g: g * 3)
            (h * h).sum().backward()
        # up to this function: the callers' lines differ between the two calls
        return [list(itertools.takewhile(lambda fr: fr[2] != "frames_of_a_step",
                                         ((f["filename"], f["line"], f["name"]) for f in e["frames"])))
                for e in read_raw(path)["device_traces"][0] if "frames" in e]

    shared = frames_of_a_step(tmp_path / "shared.pkl")
    monkeypatch.setattr(cpu_backend, "_ENGINE_CODE", None)
    each = frames_of_a_step(tmp_path / "each.pkl")
    engine = [fr for fr in each if fr and fr[0][2] == "_engine_run_backward"]
    assert len(engine) > len(each) // 4     # the case is there to share
    assert any(fr and fr[0][2] == "<lambda>" for fr in each)
    assert shared == each


def test_recording_sees_inside_custom_op_kernels(tmp_path: Path) -> None:
    """bitsandbytes' CPU gemm_4bit dequantizes the weight inside its kernel: a real transient."""
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(256, 256, dtype=torch.bfloat16)
    q, state = bnb.functional.quantize_4bit(w, quant_type="nf4")
    x = torch.randn(4, 256, dtype=torch.bfloat16, requires_grad=True)
    path = tmp_path / "gemm4.pkl"
    with vramtrace.record(path, backend="cpu"):
        bnb.matmul_4bit(x, q.t(), quant_state=state).sum().backward()
    made = [(e["size"], json.loads(e["user_metadata"])["phase"]) for e in allocs(read_raw(path))]
    assert (256 * 256 * 2, "setup") in made and (256 * 256 * 2, "backward") in made
    validate_memviz(path)


class _Listener:
    """A backend that keeps nothing: the context is what is under test here."""

    def retag(self, tensor: torch.Tensor, tag: Tag) -> None:
        pass

    def context_changed(self, ctx: TaggingContext) -> None:
        pass


class _StampingListener(_Listener):
    """Keeps, per thread, the last context string: what the CUDA backend stamps as the
    allocator's thread-local metadata."""

    def __init__(self) -> None:
        self.stamps: dict[int, dict] = {}

    def context_changed(self, ctx: TaggingContext) -> None:
        self.stamps[threading.get_ident()] = json.loads(ctx.context_json())


@pytest.mark.parametrize("run", ["backward", "autograd.grad"])
def test_backward_of_a_loss_outside_modules_is_stamped_backward(run: str) -> None:
    """The first backward ops belong to a loss computed outside any module; the engine's thread
    must carry a backward stamp before them, not the forward's (nor a previous step's module)."""
    seen: list[dict | None] = []

    class Loss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            ctx.shape = y.shape
            return y.sum()

        @staticmethod
        def backward(ctx, g):
            seen.append(listener.stamps.get(threading.get_ident()))
            return g.expand(ctx.shape)

    listener = _StampingListener()
    engine = torch.autograd._engine_run_backward
    with tagging_hooks(listener):
        seq = torch.nn.Sequential(torch.nn.Linear(4, 4))
        x = torch.randn(2, 4)
        for _ in range(2):                      # the second step starts after a module's backward
            loss = Loss.apply(seq(x))
            if run == "backward":
                loss.backward()
            else:
                torch.autograd.grad(loss, list(seq.parameters()))
    assert [(s["phase"], s["module"]) for s in seen] == [("backward", "")] * 2
    assert torch.autograd._engine_run_backward is engine     # put back on uninstall


def test_a_backward_pass_inside_another_gives_the_outer_module_back() -> None:
    """Reentrant checkpointing runs a backward pass inside a node of the outer one; after it,
    the outer pass's module (and its stamp on the thread) must be restored."""
    listener = _StampingListener()
    seen: list[tuple[str, str]] = []

    class Reentrant(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, g):
            z = torch.ones(3, requires_grad=True)
            with torch.enable_grad():                 # as checkpoint's backward does
                torch.autograd.backward((z * 2).sum())
            stamp = listener.stamps[threading.get_ident()]
            seen.append((tagging.module, stamp["module"]))
            return g

    class Block(torch.nn.Module):
        def forward(self, y):
            return Reentrant.apply(y)

    with tagging_hooks(listener) as tagging:
        Block()(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert seen == [("Block", "Block")]


def test_context_knows_backward_on_another_thread() -> None:
    """The autograd engine runs CUDA backward on its own threads: phase and module must come
    from the graph task and backward hooks, not from thread-locals set during forward."""
    with tagging_hooks(_Listener()) as ctx:
        x = torch.randn(2, 4, requires_grad=True)
        seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        inside: list[str] = []
        seq[0].register_forward_pre_hook(lambda m, a: inside.append(ctx.module))
        y = seq(x)
        seen = []
        x.register_hook(lambda g: seen.append((ctx.phase, ctx.module, threading.get_ident())))
        assert ctx.phase == "setup"
        worker = threading.Thread(target=lambda: y.sum().backward())
        worker.start()
        worker.join()
    seq(x)
    assert inside == ["Sequential.0", ""]                 # the hooks went with the block
    assert seen == [("backward", "Sequential.0", worker.ident)]


# ---- agreement with torch.profiler ------------------------------------------------------------
def test_agrees_with_profiler_and_does_not_change_memory(tmp_path: Path) -> None:
    m, opt, x = tiny_llama()
    step(m, opt, x)                     # optimizer state exists: the profiled steps are alike
    path = tmp_path / "p.pkl"

    def recorded_step() -> None:
        with vramtrace.record(path, backend="cpu"):
            step(m, opt, x)

    plain = profiled_memory(lambda: step(m, opt, x))
    prof = profiled_memory(recorded_step)
    trace = read_raw(path)["device_traces"][0]
    # Allocations made during the step have stacks; pre-existing ones (weights, state) do not.
    ours_alloc = sum(e["size"] for e in trace if e["action"] == "alloc" and e["frames"])
    ours_free = sum(e["size"] for e in trace if e["action"] == "free_completed")
    print("profiler", prof, "plain", plain, "ours", ours_alloc, ours_free)
    # Same step, same process: the tracker sees every tensor storage the profiler sees except
    # kernel-internal scratch buffers that never become an op output.
    assert abs(ours_alloc - prof.alloc) <= 0.01 * prof.alloc
    assert abs(ours_free - prof.free) <= 0.01 * prof.free
    # The tracker does not change the peak it measures.
    assert abs(prof.peak - plain.peak) <= 0.01 * plain.peak


def test_compiled_code_runs_and_is_recorded_without_dynamo_tracing_the_tracker(tmp_path: Path) -> None:
    """The mode switches torch.compile's frame hook off itself (not through torch's wrapper):
    a compiled function still runs under recording, its output is recorded, and no frame of
    the tracker was compiled (a compiled tracker frame would report nothing)."""
    compiled = torch.compile(lambda a: (a * 2).sin() + 1, backend="eager")
    x = torch.ones(1000)
    path = tmp_path / "compiled.pkl"
    with vramtrace.record(path, backend="cpu"):
        y = compiled(x)
        z = compiled(y)
    sizes = [e["size"] for e in allocs(read_raw(path)) if e["frames"]]
    # each call makes a*2, sin, +1: three 4,000-byte storages, all seen by the tracker
    assert sizes.count(4000) == 6
    assert torch.equal(z, ((y * 2).sin() + 1))
    validate_memviz(path)


@pytest.mark.parametrize("tag", [
    Tag(),
    Tag(tx.WEIGHT, 'A.b"c\\d\u00e9\n', "forward", 3, "fp32", (2, 3, 4), "p.q"),
    Tag(tx.ACTIVATION, "m", "recompute", 12345, "bf16", (7,), "\U0001f600"),
])
def test_tag_json_is_what_json_dumps_writes(tag: Tag) -> None:
    """Tags are formatted by hand for speed; the text must be json.dumps' compact form."""
    fields = {"owner": tag.owner, "module": tag.module, "phase": tag.phase, "step": tag.step,
              "dtype": tag.dtype, "shape": list(tag.shape), "param": tag.param}
    assert tag.to_json() == json.dumps(fields, separators=(",", ":"))


def test_a_backward_pass_nobody_announces_is_still_backward(tmp_path: Path) -> None:
    """A pass that does not go through torch.autograd's entry (as one started from C++) is not
    announced to the backend: its allocations still read the engine, not the last context."""
    w = torch.randn(128, 128, requires_grad=True)
    path = tmp_path / "unannounced.pkl"
    with vramtrace.record(path, backend="cpu"):
        loss = (w * 2).sin().sum()
        torch.autograd.graph._engine_run_backward(      # the original, not the wrapped entry
            (loss,), (torch.ones(()),), False, False, (), True, True)
    phases = [json.loads(e["user_metadata"])["phase"] for e in allocs(read_raw(path))
              if e["size"] == 128 * 128 * 4]
    # w * 2 and its sin outside any module, then the gradients of sin and of the product
    assert phases[:2] == ["setup", "setup"] and len(phases) > 2 and set(phases[2:]) == {"backward"}


class _SavedRoles:
    """A listener that, like the CUDA backend, does not see autocast's cast op."""

    def __init__(self) -> None:
        self.saved: list[tuple[str, str, tuple, bool]] = []   # owner, param, shape, is the weight's copy

    def retag(self, tensor: torch.Tensor, tag: Tag) -> None:
        if tag.owner in (tx.ACTIVATION, tx.AUTOCAST):
            self.saved.append((tag.owner, tag.param, tuple(tensor.shape), tensor.stride()[0] == 1))

    def context_changed(self, ctx: TaggingContext) -> None:
        pass


def test_saved_autocast_weight_copies_are_named_where_the_cast_is_not_seen() -> None:
    """Where the backend cannot see the cast (CUDA), the saved-tensor hook names autocast's
    weight copy a linear saves (its transposed view), not an input of the very same shape.
    Layer 0 is frozen fp16 (its input needs the copy), layer 1 trainable fp32."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    m[0].requires_grad_(False).half()
    listener = _SavedRoles()
    with tagging_hooks(listener) as ctx:
        ctx.track_model(m)
        x = torch.randn(16, 16, requires_grad=True)   # the same shape as layer 0's weight
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().sum().backward()
    assert sorted(listener.saved) == [(tx.ACTIVATION, "", (16, 16), False),        # layer 1's input
                                      (tx.AUTOCAST, "0.weight", (16, 16), True),
                                      (tx.AUTOCAST, "1.weight", (16, 4), True)]
