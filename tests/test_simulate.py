"""vramtrace simulate: fake-tensor predictions checked against real CPU runs and analytic counts."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from vramtrace.simulate import Recipe, simulate_recipe, simulate_step  # noqa: E402
from vramtrace.simulate.gpus import GPU, GPUS, fit  # noqa: E402
from vramtrace.simulate.search import find_max  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
REPO = Path(__file__).resolve().parents[1]

TINY_RECIPES = {
    "full-fp32-adamw": dict(dtype="fp32", seq_len=64, batch_size=2),
    "lora-int8-prepare-nonreentrant": dict(dtype="fp16", seq_len=64, batch_size=2, lora_r=8, quant="int8",
                                           prepare_kbit=True, checkpointing="non-reentrant"),
    "lora-nf4-dq-reentrant-fused": dict(dtype="bf16", seq_len=64, batch_size=2, lora_r=8, quant="nf4",
                                        double_quant=True, prepare_kbit=True, checkpointing="reentrant",
                                        optimizer="adamw-fused"),
    "lora-fp16-bf16-autocast-accum": dict(dtype="fp16", seq_len=64, batch_size=1, lora_r=4,
                                          lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                                          autocast="bf16", grad_accum=2, optimizer="adamw8bit"),
}


def live_bytes_by(snapshot: dict, key: str = "owner") -> dict[str, int]:
    """Requested bytes live at the end of the trace, by a user_metadata key (owner, dtype...)."""
    live: dict[int, tuple[str, int]] = {}
    for e in snapshot["device_traces"][0]:
        if e["action"] == "alloc":
            meta = json.loads(e["user_metadata"])
            live[e["addr"]] = (f"{meta['owner']} {meta['dtype']}" if key == "owner dtype" else meta[key], e["size"])
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    out: dict[str, int] = {}
    for k, size in live.values():
        out[k] = out.get(k, 0) + size
    return out


@pytest.mark.parametrize("name", sorted(TINY_RECIPES))
def test_fake_run_matches_real_cpu_run(name: str) -> None:
    """Same recipe on fake and on real CPU tensors: identical layout, peaks and owners."""
    recipe = Recipe(model="tiny-llama", **TINY_RECIPES[name])
    fake = simulate_recipe(recipe, fake=True)
    real = simulate_recipe(recipe, fake=False)
    assert fake.peak_allocated == real.peak_allocated
    assert fake.peak_reserved == real.peak_reserved
    assert fake.owners_at_peak == real.owners_at_peak
    assert live_bytes_by(fake.snapshot, "owner dtype") == live_bytes_by(real.snapshot, "owner dtype")
    assert fake.params == real.params


def test_tiny_full_finetune_bytes_are_analytic() -> None:
    """fp32 full fine-tune, one AdamW step: weights, Adam states and the peak add up exactly."""
    h, i, n, v = 64, 160, 2, 512
    numel = 2 * v * h + n * (4 * h * h + 3 * h * i + 2 * h) + h
    res = simulate_recipe(Recipe(model="tiny-llama", dtype="fp32", seq_len=32, batch_size=1))
    assert res.params == {"trainable": numel, "frozen": 0}
    end = live_bytes_by(res.snapshot)
    assert end["trainable"] == 4 * numel
    n_tensors = 2 + n * 9 + 1
    # exp_avg + exp_avg_sq per parameter, plus one fp32 step counter per parameter tensor
    assert end["optimizer"] == 2 * 4 * numel + 4 * n_tensors
    assert "gradient" not in end  # zero_grad(set_to_none=True)
    assert end["weight"] == 2 * 4 * (h // 4 // 2)  # rotary inv_freq and original_inv_freq buffers
    assert res.peak_allocated >= 4 * 4 * numel  # weights + grads + two Adam states coexist


def test_simulate_step_api_user_model() -> None:
    """A user's own model and step: weights, gradients and activations by their sizes."""
    def factory() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024))
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        x = torch.randn(64, 1024)
        model(x).square().mean().backward()
        opt.step()

    res = simulate_step(factory, step)
    numel = 1024 * 4096 + 4096 + 4096 * 1024 + 1024
    end = live_bytes_by(res.snapshot)
    assert end["trainable"] == 4 * numel
    assert end["gradient"] == 4 * numel
    saved = [e["size"] for e in res.snapshot["device_traces"][0]
             if e["action"] == "alloc" and e.get("category") == "activation"]
    assert 4 * 64 * 4096 in saved  # the first layer's output, saved by GELU for backward
    assert res.peak_allocated >= 8 * numel  # weights and gradients at the end of backward
    assert res.params["trainable"] == numel


def test_gpu_catalogue_and_fit() -> None:
    assert {"a100-40gb", "a100-80gb", "h100-80gb", "h200-141gb", "l4-24gb", "rtx4090-24gb", "rtx3090-24gb",
            "t4-16gb", "v100-16gb", "v100-32gb", "a10g-24gb"} <= set(GPUS)
    for g in GPUS.values():
        assert 15 << 30 <= g.total_bytes <= 141 << 30
        assert 256 << 20 <= g.context_bytes <= 1 << 30
        assert g.usable_bytes < g.total_bytes
    a100 = GPUS["a100-40gb"]
    ok = fit(a100, a100.usable_bytes)
    assert ok.fits and ok.headroom_bytes == 0
    short = fit(a100, a100.usable_bytes + (1 << 30))
    assert not short.fits and short.headroom_bytes == -(1 << 30)
    assert "short by 1.00 GiB" in short.verdict()


@pytest.mark.parametrize("knob, value, step", [("batch_size", 6, 1), ("seq_len", 96, 16)])
def test_find_max_is_the_largest_that_fits(knob: str, value: int, step: int) -> None:
    base = dict(model="tiny-llama", dtype="fp32", seq_len=32, batch_size=2, lora_r=4)
    ref = simulate_recipe(Recipe(**{**base, knob: value}))
    gpu = GPU("test", ref.peak_reserved, 0, 0, "test")  # ``value`` fits exactly
    res = find_max(Recipe(**base), gpu, knob, limit=64 * step, step=step)
    assert res.best >= value and res.best % step == 0
    assert res.tried[res.best].fits
    above = res.tried.get(res.best + step) or fit(gpu, simulate_recipe(
        Recipe(**{**base, knob: res.best + step})).peak_reserved)
    assert not above.fits


def test_cli_writes_viewer_safe_snapshot_and_json(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from vramtrace.commands.simulate import simulate_command
    out = tmp_path / "sim.pkl"
    r = CliRunner().invoke(simulate_command, ["-m", "tiny-llama", "-b", "2", "-s", "64", "--lora-r", "8",
                                              "--quant", "int8", "--prepare-kbit", "--checkpointing", "reentrant",
                                              "-g", "t4-16gb", "-o", str(out), "--format", "json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output[r.output.index("{"):])
    assert data["fit"]["fits"] and data["params"]["trainable"] == 4096
    assert data["owners_at_peak"]["weight"] > 0 and data["owners_at_peak"]["quant_state"] > 0
    raw = out.read_bytes()
    assert raw[:2] == b"\x80\x04"
    from vramtrace.snapshot.load import load_snapshot
    snap = load_snapshot(out)
    assert snap["vramtrace_backend"] == "simulate"
    from torch.cuda import _memory_viz as mv
    assert mv.segsum(snap) and mv.trace(snap)
    validator = SHARED / "tools" / "validate_memviz.py"
    if not validator.exists():
        pytest.skip("shared/tools/validate_memviz.py not available")
    v = subprocess.run([sys.executable, str(validator), str(out)], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr


_SEVEN_B = textwrap.dedent("""
    import json, resource, sys, time
    t0 = time.process_time()
    from vramtrace.simulate import Recipe, simulate_recipe
    recipe = Recipe(**json.loads(sys.argv[1]))
    res = simulate_recipe(recipe)
    end = {}
    live = {}
    for e in res.snapshot["device_traces"][0]:
        if e["action"] == "alloc":
            m = json.loads(e["user_metadata"])
            live[e["addr"]] = (m["owner"] + " " + m["dtype"], e["size"])
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    for k, s in live.values():
        end[k] = end.get(k, 0) + s
    print(json.dumps({"wall_s": res.wall_s, "cpu_s": time.process_time() - t0,
                      "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "peak_allocated": res.peak_allocated, "peak_reserved": res.peak_reserved,
                      "owners_at_peak": res.owners_at_peak, "end": end, "params": res.params}))
""")

LLAMA2_7B_PARAMS = 6_738_415_616
LINEAR_IN_LAYERS = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
NOT_LINEAR = LLAMA2_7B_PARAMS - LINEAR_IN_LAYERS          # embeddings, lm_head, RMSNorm weights
SCB_ROWS = 32 * (5 * 4096 + 2 * 11008)                    # one fp32 scale per output row of each int8 linear
LORA_QV_R8 = 32 * 2 * 2 * 4096 * 8
INV_FREQ = 2 * 64 * 4                                      # rotary inv_freq + original_inv_freq (fp32)


def _simulate_7b(recipe: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", _SEVEN_B, json.dumps(recipe)], capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_llama2_7b_int8_lora_checkpointing_fast_small_and_exact() -> None:
    """The llama-recipes int8 run: weights by dtype equal the analytic count."""
    r = _simulate_7b(dict(model="llama-2-7b", batch_size=2, seq_len=2048, dtype="fp16", quant="int8",
                          prepare_kbit=True, lora_r=8, lora_alpha=32, checkpointing="non-reentrant",
                          autocast="bf16", optimizer="adamw-fused"))
    assert r["params"] == {"trainable": 4_194_304, "frozen": LLAMA2_7B_PARAMS}
    end = r["end"]
    assert end["weight int8"] == LINEAR_IN_LAYERS
    assert end["weight fp32"] == 4 * NOT_LINEAR + INV_FREQ   # prepare_model_for_kbit_training upcast
    assert end["quant_state fp32"] == 4 * SCB_ROWS
    assert end["trainable fp32"] == 4 * LORA_QV_R8
    assert r["cpu_s"] < 30, r
    assert r["maxrss_kb"] < 2 * 1024 * 1024, r


@pytest.mark.slow
def test_llama2_7b_fp16_lora_bf16_autocast_fast_small_and_exact() -> None:
    """The llama-recipes fp16 run: fp16 weights equal 6.74 B x 2 bytes; autocast copies appear."""
    r = _simulate_7b(dict(model="llama-2-7b", batch_size=1, seq_len=2048, dtype="fp16", lora_r=8,
                          lora_alpha=32, autocast="bf16", optimizer="adamw-fused"))
    assert r["params"] == {"trainable": 4_194_304, "frozen": LLAMA2_7B_PARAMS}
    end = r["end"]
    assert end["weight fp16"] == 2 * LLAMA2_7B_PARAMS
    assert end["weight fp32"] == INV_FREQ
    assert end["trainable fp32"] == 4 * LORA_QV_R8
    assert r["owners_at_peak"]["autocast"] > 10 << 30   # a bf16 copy of (nearly) every frozen linear
    assert r["cpu_s"] < 30, r
    assert r["maxrss_kb"] < 2 * 1024 * 1024, r
