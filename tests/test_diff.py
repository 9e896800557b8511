"""`vramtrace diff`: alignment by meaning, the CI gate, flame output, and the quickstart recipes
(int8 vs fp16) against figures computed by hand from the model's dimensions."""
from __future__ import annotations

import json
import pickle
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO, real_snapshot_files
from vramtrace.cli import cli
from vramtrace.diff.compare import diff_runs, module_key, units_of
from vramtrace.diff.points import POINTS
from vramtrace.replay.allocator import CachingAllocatorModel
from vramtrace.snapshot.save import write_snapshot
from vramtrace.trace import load_trace

sys.path.insert(0, str(REPO / "tools"))
import quickstart_recipes as Q  # noqa: E402

MIB = 1 << 20
# anything a browser would fetch: src/href/action to a URL, CSS url()/@import, fetch/XHR in scripts
LOADED_URL = re.compile(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//|url\(|@import|fetch\(|XMLHttpRequest""",
                        re.I)


def run(*args):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)


def synthetic_run(path: Path, weight_dtype: str, weight_bytes: int, act_bytes: int) -> Path:
    """A tagged one-step run laid out by the allocator model: 4 layer weights, 4 saved
    activations, a forward temporary, backward temporaries, optimizer state, an input."""
    m = CachingAllocatorModel()

    def tag(owner: str, module: str, phase: str, dtype: str) -> dict:
        meta = {"owner": owner, "module": module, "phase": phase, "dtype": dtype, "step": 0}
        return {"category": owner, "user_metadata": json.dumps(meta), "time_us": 1}

    for layer in range(4):
        m.malloc(weight_bytes, **tag("weight", f"M.model.layers.{layer}.mlp.down_proj", "setup", weight_dtype))
    acts = [m.malloc(act_bytes, **tag("activation", f"M.model.layers.{layer}.mlp", "forward", "bf16"))
            for layer in range(4)]
    m.free(m.malloc(3 * MIB, **tag("temporary", "M.lm_head", "forward", "fp32")))
    for a in reversed(acts):
        m.free(m.malloc(MIB, **tag("temporary", "M.model.layers.0.mlp", "backward", "bf16")))
        m.free(a)
    m.malloc(2 * MIB, **tag("optimizer", "M", "optimizer", "fp32"))
    m.malloc(MIB, **tag("input", "", "setup", "int64"))
    return write_snapshot(m.snapshot(), path)


@pytest.fixture
def pair(tmp_path):
    """(A, B): B has fp16 instead of int8 weights (2x) and 1.5x the activations."""
    return (synthetic_run(tmp_path / "a.pkl", "int8", 8 * MIB, 4 * MIB),
            synthetic_run(tmp_path / "b.pkl", "fp16", 16 * MIB, 6 * MIB))


def _all_zero(diff: dict) -> bool:
    return all(r["delta"] == 0 and r["delta_requested"] == 0 for p in diff["points"] for r in p["cells"]) and \
        all(p["delta"] == 0 for p in diff["points"]) and diff["peak"]["delta"] == 0


def test_diff_of_a_file_with_itself_is_all_zeros(pair):
    result = run("diff", pair[0], pair[0], "--at", "phase", "--format", "json", "--fail-if-peak-grows", "0")
    assert result.exit_code == 0
    diff = json.loads(result.stdout)
    assert [p["point"] for p in diff["points"]] == list(POINTS)
    assert _all_zero(diff)
    assert all(not p["explanation"] for p in diff["points"])


@pytest.mark.parametrize("path", real_snapshot_files()[:6] or [pytest.param(None, marks=pytest.mark.skip(
    reason="../shared/fixtures/real-snapshots is absent"))])
def test_self_diff_of_real_untagged_snapshots(path):
    units = units_of(load_trace(path))
    if not units:
        pytest.skip("no device data")
    assert _all_zero(diff_runs(units, units_of(load_trace(path)), POINTS, "stack"))


def test_deltas_and_explanation(pair):
    diff = json.loads(run("diff", *pair, "--format", "json").stdout)
    peak = diff["points"][0]
    rows = {(r["owner"], r["module"], r["phase"]): r["delta"] for r in peak["rows"]}
    assert rows[("weight", "model.layers.*.mlp.down_proj", "setup")] == 4 * 8 * MIB
    assert rows[("activation", "model.layers.*.mlp", "forward")] == 4 * 2 * MIB
    assert peak["delta"] == diff["peak"]["delta"] == 40 * MIB
    assert peak["explanation"][0].startswith("+64.00 MiB frozen fp16 weights made in setup, in model.layers.*")
    assert any("activations saved for backward" in line for line in peak["explanation"])
    # the rows are sorted by |delta|
    deltas = [abs(r["delta"]) for r in peak["rows"]]
    assert deltas == sorted(deltas, reverse=True)


def test_phase_points_from_tags(pair):
    diff = json.loads(run("diff", *pair, "--at", "phase", "--format", "json", "--group", "owner").stdout)
    by_point = {p["point"]: p for p in diff["points"]}
    assert not any(p["a"]["fallback"] or p["b"]["fallback"] for p in diff["points"])
    owners = lambda p: {r["owner"] for r in by_point[p]["by_owner"] if r["b"]}  # noqa: E731
    assert owners("forward") == {"weight", "activation"}
    assert owners("backward") == {"weight"}
    assert owners("optimizer") == {"weight", "optimizer"}
    assert owners("end") == {"weight", "optimizer", "input"}


def test_untagged_files_fall_back_to_peak_and_end(tmp_path, pair):
    snap = pickle.loads(pair[0].read_bytes())
    for e in snap["device_traces"][0]:
        e.pop("category", None), e.pop("user_metadata", None)
    bare = tmp_path / "bare.pkl"
    bare.write_bytes(pickle.dumps(snap, protocol=4))
    diff = json.loads(run("diff", bare, bare, "--at", "phase", "--format", "json").stdout)
    p = {x["point"]: x for x in diff["points"]}
    assert p["forward"]["a"]["fallback"] and p["forward"]["a"]["units"][0]["index"] == p["peak"]["a"]["units"][0]["index"]
    assert p["optimizer"]["a"]["fallback"] and p["optimizer"]["a"]["units"][0]["index"] == p["end"]["a"]["units"][0]["index"]


def test_fail_if_peak_grows_gates_on_the_right_side(pair):
    a, b = pair                                       # B's peak is 78.4% above A's
    grown = run("diff", a, b, "--fail-if-peak-grows", "50")
    assert grown.exit_code == 1
    assert "more than the 50% allowed" in grown.stderr
    assert run("diff", a, b, "--fail-if-peak-grows", "100").exit_code == 0
    assert run("diff", b, a, "--fail-if-peak-grows", "0").exit_code == 0     # shrinking passes
    assert run("diff", a, a, "--fail-if-peak-grows", "0").exit_code == 0     # equal passes


def test_flame_outputs_are_offline_and_consistent(pair, tmp_path):
    html, svg, folded = tmp_path / "d.html", tmp_path / "d.svg", tmp_path / "d.folded"
    for out in (html, svg, folded):
        assert run("diff", *pair, "-o", out).exit_code == 0
    page = html.read_text()
    assert "<svg" in page and page.count('class="flame"') == 2
    assert not LOADED_URL.search(page), LOADED_URL.search(page)
    assert ET.fromstring(svg.read_text()).tag.endswith("svg")
    a_total = b_total = 0
    for line in folded.read_text().splitlines():
        stack, a, b = line.rsplit(" ", 2)
        a_total, b_total = a_total + int(a), b_total + int(b)
        assert stack.split(";")[0] in {"weight", "activation", "temporary", "optimizer", "input"}
    point = json.loads(run("diff", *pair, "--format", "json").stdout)["points"][0]
    assert (a_total, b_total) == (point["a"]["allocated"], point["b"]["allocated"])


def test_bad_input_is_a_one_line_error(pair, tmp_path):
    cases = [(["diff", pair[0]], "at least two runs"),
             (["diff", pair[0], tmp_path / "missing.pkl"], "missing.pkl"),
             (["diff", *pair, "-o", tmp_path / "x.png"], "x.png"),
             (["diff", pair[0], tmp_path / "empty"], "no .pkl/.pickle snapshot files")]
    (tmp_path / "empty").mkdir()
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"not a pickle")
    cases.append((["diff", pair[0], junk], "junk.pkl"))
    for args, needle in cases:
        result = run(*args)
        assert result.exit_code == 2, args
        assert result.stderr.startswith("vramtrace: error: ") and needle in result.stderr, result.stderr


def test_module_paths_align_across_wrappers():
    assert module_key("PeftModelForCausalLM.base_model.model.model.layers.31.mlp.down_proj") == \
        module_key("LlamaForCausalLM.model.layers.0.mlp.down_proj") == "model.layers.*.mlp.down_proj"


# -- the quickstart recipes, tiny, recorded for real on the CPU -------------------------------------

def tiny_truth() -> dict[str, dict[tuple[str, str], int]]:
    """Requested bytes by (owner, dtype) of both tiny runs after the optimizer step, by hand."""
    c = Q.TINY_CONFIG
    h, i, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    linear = layers * (4 * h * h + 3 * h * i)                 # q k v o, gate up down
    rest = 2 * vocab * h + (2 * layers + 1) * h               # embeddings, lm_head, norms
    rope = 2 * (h // c["num_attention_heads"] // 2) * 4       # inv_freq + original_inv_freq, fp32 buffers
    scb = layers * (4 * h + 2 * i + h) * 4                    # int8 row scales, one fp32 per output row
    r = Q.LORA["r"]
    lora_tensors = layers * len(Q.LORA["target_modules"]) * 2
    lora = layers * len(Q.LORA["target_modules"]) * (r * h + h * r) * 4     # fp32 adapters
    shared = {("trainable", "fp32"): lora, ("gradient", "fp32"): lora,
              ("optimizer", "fp32"): 2 * lora + 4 * lora_tensors}           # exp_avg, exp_avg_sq, step
    return {"int8": {("weight", "int8"): linear, ("weight", "fp32"): 4 * rest + rope,
                     ("quant_state", "fp32"): scb, **shared},
            "fp16": {("weight", "fp16"): 2 * (linear + rest), ("weight", "fp32"): rope, **shared}}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    return Q.make_runs("tiny", tmp_path_factory.mktemp("quickstart"))


def test_tiny_quickstart_diff_matches_hand_figures(tiny_runs):
    int8, fp16 = tiny_runs
    diff = diff_runs(units_of(load_trace(int8)), units_of(load_trace(fp16)), POINTS, "owner")
    truth = tiny_truth()
    points = {p["point"]: p for p in diff["points"]}
    assert not any(p["a"]["fallback"] or p["b"]["fallback"] for p in diff["points"])
    rows = {(r["owner"], r["dtype"]): r for r in points["optimizer"]["rows"]}
    for key in set(truth["int8"]) | set(truth["fp16"]):
        a, b = truth["int8"].get(key, 0), truth["fp16"].get(key, 0)
        row = rows[key]
        assert (row["a_requested"], row["b_requested"], row["delta_requested"]) == (a, b, b - a), key
        for side in "ab":   # blocks hold the request rounded up, less than 512 B more per tensor
            assert 0 <= row[side] - row[f"{side}_requested"] < 512 * max(row[f"{side}_count"], 1), key
    # weights and the frozen model's state are the same at each run's peak
    peak = {(r["owner"], r["dtype"]): r for r in points["peak"]["rows"]}
    for key in (("weight", "int8"), ("weight", "fp16"), ("quant_state", "fp32"), ("trainable", "fp32")):
        assert peak[key]["delta_requested"] == rows[key]["delta_requested"], key
    # bf16 autocast copies of fp16 frozen weights exist only in the fp16 run's layers
    by_module = diff_runs(units_of(load_trace(int8)), units_of(load_trace(fp16)), ("peak",), "module")
    autocast = [r for r in by_module["points"][0]["rows"] if r["owner"] == "autocast" and r["delta"] > 0]
    assert autocast and all(r["module"].startswith("model.layers.*") for r in autocast)


def test_tiny_quickstart_cli_round_trip(tiny_runs, tmp_path):
    int8, fp16 = tiny_runs
    out = tmp_path / "diff.html"
    result = run("diff", int8, fp16, "--at", "phase", "--group", "module", "-o", out)
    assert result.exit_code == 0
    assert "after the first optimizer step" in result.stdout
    assert not LOADED_URL.search(out.read_text())
    assert _all_zero(json.loads(run("diff", fp16, fp16, "--format", "json", "--group", "stack").stdout))


# -- Llama-2-7B, simulated ---------------------------------------------------------------------------

LINEAR_7B = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)       # 6,476,005,376 int8 bytes
REST_7B = 2 * 32000 * 4096 + 65 * 4096                       # embeddings, lm_head, norms


@pytest.mark.slow
def test_7b_quickstart_per_owner_at_each_training_peak(tmp_path):
    """The figures of docs/int8-vs-fp16.md: exact where the dimensions fix them."""
    int8, fp16 = Q.make_runs("7b", tmp_path)
    diff = diff_runs(units_of(load_trace(int8)), units_of(load_trace(fp16)), ("train-peak", "optimizer"), "owner")
    peak, after_step = ({(r["owner"], r["dtype"]): r for r in p["rows"]} for p in diff["points"])
    lora = 4_194_304
    assert peak[("weight", "int8")]["a_requested"] == LINEAR_7B
    assert peak[("quant_state", "fp32")]["a_requested"] == 32 * (4 * 4096 + 2 * 11008 + 4096) * 4
    assert peak[("weight", "fp32")]["a_requested"] - 4 * REST_7B < 1024            # + RoPE buffers
    assert peak[("weight", "fp16")]["b_requested"] == 2 * (LINEAR_7B + REST_7B)
    for owner in ("trainable", "gradient"):
        assert peak[(owner, "fp32")]["a_requested"] == peak[(owner, "fp32")]["b_requested"] == 4 * lora
    assert after_step[("optimizer", "fp32")]["delta_requested"] == 0
    assert after_step[("optimizer", "fp32")]["a_requested"] == 8 * lora + 4 * 128       # + 128 step scalars
    # fp16 run: a bf16 copy of every frozen linear weight but layer 0's q/k/v, of lm_head, and of LoRA
    copies = 2 * (LINEAR_7B - 3 * 4096 * 4096 + 32000 * 4096 + lora)
    assert peak[("autocast", "bf16")]["b_requested"] == copies
    assert peak[("autocast", "bf16")]["a_requested"] == 2 * 32000 * 4096                # int8 run: lm_head only
    assert diff["points"][0]["b"]["allocated"] > 3 * diff["points"][0]["a"]["allocated"]


def test_guessed_frame_labels_stay_one_flame_level():
    from vramtrace.diff.flame import cell_path
    tagged = {"owner": "activation", "dtype": "bf16", "phase": "forward", "module": "model.layers.*.mlp"}
    guessed = {"owner": "unknown", "dtype": "-", "phase": "forward", "module": "cs336_basics/transformer.py:22 forward"}
    assert cell_path(tagged) == ["activation", "bf16", "forward", "model", "layers", "*", "mlp"]
    assert cell_path(guessed) == ["unknown", "-", "forward", "cs336_basics/transformer.py:22 forward"]
