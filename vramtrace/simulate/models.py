"""Built-in model configs and the training recipe (model build + one training step).

Configs hold only the numbers from each model's published config.json, so nothing is downloaded.
The build mirrors ``from_pretrained``: a skeleton is built unrecorded, then each weight is
"loaded" (copied) under the tracker, and quantized layer by layer as bitsandbytes does on load,
so the setup peak is the GPU's (one fp16 layer weight in flight), not a full fp16 model.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

if TYPE_CHECKING:  # core imports this module
    from vramtrace.simulate.core import SimulationResult

BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-2-7b-hf config.json
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, use_cache=True, tie_word_embeddings=False),
    # meta-llama/Meta-Llama-3-8B config.json
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, use_cache=True,
                       tie_word_embeddings=False),
    # mistralai/Mistral-7B-v0.1 config.json
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096, use_cache=True,
                       tie_word_embeddings=False),
    # openai-community/gpt2 config.json (124 M, dropout 0.1 everywhere, tied embeddings)
    "gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024,
                 n_inner=None, use_cache=True),
    # a tiny Llama for tests: every layer type of llama-2-7b, 0.1 M parameters
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=512, max_position_embeddings=256,
                       rms_norm_eps=1e-5, use_cache=True, tie_word_embeddings=False),
}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPTIMIZERS = ("adamw", "adamw-fused", "adamw8bit", "paged-adamw8bit", "sgd")
QUANTS = (None, "int8", "nf4", "fp4")
CHECKPOINTING = (None, "reentrant", "non-reentrant")


@dataclass
class Recipe:
    """One fine-tuning setup: what the user would write in a training script."""
    model: str = "tiny-llama"
    batch_size: int = 1
    seq_len: int = 512
    dtype: str = "fp16"                     # weight dtype at load (torch_dtype)
    autocast: str | None = None             # None, "fp16", "bf16"
    quant: str | None = None                # None, "int8", "nf4", "fp4"
    double_quant: bool = False              # 4-bit: bnb_4bit_use_double_quant
    prepare_kbit: bool = False              # peft.prepare_model_for_kbit_training (fp32 upcast + checkpointing)
    lora_r: int = 0                         # 0: full fine-tune
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    checkpointing: str | None = None        # None, "reentrant", "non-reentrant"
    optimizer: str = "adamw"
    grad_accum: int = 1
    steps: int = 1
    use_cache: bool | None = None           # None: the config's value (Llama-2 ships True)
    lr: float = 1e-4

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not in {sorted(DTYPES)}")
        if self.autocast is not None and self.autocast not in ("fp16", "bf16"):
            raise ValueError(f"autocast {self.autocast!r} not in fp16/bf16")
        if self.quant not in QUANTS:
            raise ValueError(f"quant {self.quant!r} not in {QUANTS}")
        if self.checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing {self.checkpointing!r} not in {CHECKPOINTING}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} not in {OPTIMIZERS}")
        self.lora_targets = tuple(self.lora_targets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_config(model: str) -> Any:
    """A transformers config from a built-in name or a local config.json (file or directory)."""
    from transformers import AutoConfig
    if model in BUILTIN_CONFIGS:
        spec = dict(BUILTIN_CONFIGS[model])
    else:
        path = Path(model)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"unknown model {model!r}: not one of {sorted(BUILTIN_CONFIGS)} nor a config.json")
        spec = json.loads(path.read_text())
    model_type = spec.pop("model_type")
    for k in ("architectures", "transformers_version", "auto_map", "quantization_config"):
        spec.pop(k, None)
    return AutoConfig.for_model(model_type, **spec)


def _new_param(data: torch.Tensor, requires_grad: bool, **attrs: Any) -> nn.Parameter:
    p = nn.Parameter(data, requires_grad=requires_grad)
    for k, v in attrs.items():
        setattr(p, k, v)
    return p


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


def _quantize_linear(lin: nn.Linear, quant: str, double_quant: bool, compute_dtype: torch.dtype) -> nn.Module:
    """Replace a Linear of the skeleton by its bitsandbytes layer, as loading a checkpoint does:
    the 16-bit weight arrives on the device (a transient copy), is quantized, and is dropped.

    Same ops for real and fake tensors; only the Parameter wrapper differs, because bitsandbytes'
    Int8Params/Params4bit cannot wrap a FakeTensor (their attributes are set on a plain Parameter).
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF
    w = _copy(lin.weight)
    fake = _is_fake(w)
    with torch._subclasses.fake_tensor.unset_fake_temporarily(), torch.device("meta"):
        # the layer's own empty weight must not count (and bitsandbytes cannot wrap a FakeTensor)
        if quant == "int8":
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      has_fp16_weights=False, threshold=6.0)
        else:
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant)
    if quant == "int8":
        CB, SCB, _ = BF.int8_vectorwise_quant(w.to(torch.float16))
        if fake:
            new._parameters["weight"] = _new_param(CB, False, CB=CB, SCB=SCB, has_fp16_weights=False)
        else:
            new._parameters["weight"] = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False,
                                                          CB=CB, SCB=SCB)
    else:
        packed, qs = BF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant)
        if fake:
            new._parameters["weight"] = _new_param(packed, False, quant_state=qs, quant_type=quant,
                                                   blocksize=64, compress_statistics=double_quant,
                                                   bnb_quantized=True, module=new)
        else:
            new._parameters["weight"] = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=qs,
                                                          blocksize=64, compress_statistics=double_quant,
                                                          quant_type=quant, bnb_quantized=True, module=new)
    if lin.bias is not None:
        new._parameters["bias"] = lin.bias  # loaded with the rest by _load
    return new


def prime_bitsandbytes() -> None:
    """Build bitsandbytes' lookup tables on real tensors (they read values, impossible when fake)."""
    import bitsandbytes.functional as BF
    from vramtrace.simulate.core import paused
    with torch._subclasses.fake_tensor.unset_fake_temporarily(), paused():
        if "dynamic" not in BF.name2qmap:
            BF.name2qmap["dynamic"] = BF.create_dynamic_map()
        if "udynamic" not in BF.name2qmap:
            BF.name2qmap["udynamic"] = BF.create_dynamic_map(signed=False)


def build_model(recipe: Recipe, paused: Callable[[], contextlib.AbstractContextManager]) -> nn.Module:
    """Build the recipe's model in the current mode (fake or real), recording only what a GPU keeps.

    ``paused`` is the tracker's no-recording context, used for the skeleton build.
    """
    from transformers import AutoModelForCausalLM
    config = load_config(recipe.model)
    if recipe.use_cache is not None:
        config.use_cache = recipe.use_cache
    dtype = DTYPES[recipe.dtype]
    with paused():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.train()  # from_pretrained returns eval mode; Trainer switches to train
    if recipe.quant:  # quantized layer by layer while loading: one 16-bit weight in flight at a time
        prime_bitsandbytes()
        compute = DTYPES[recipe.autocast] if recipe.autocast else dtype
        _replace_linears(model, recipe.quant, recipe.double_quant, compute)
        setattr(model, "is_loaded_in_8bit" if recipe.quant == "int8" else "is_loaded_in_4bit", True)
    _load(model)
    gc_kwargs = {"use_reentrant": recipe.checkpointing == "reentrant"}
    if recipe.prepare_kbit:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.checkpointing is not None,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    elif recipe.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if recipe.lora_r:
        from peft import LoraConfig, get_peft_model
        if not recipe.prepare_kbit:
            for p in model.parameters():
                p.requires_grad_(False)
        cfg = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                         target_modules=list(recipe.lora_targets), task_type="CAUSAL_LM", bias="none")
        model = get_peft_model(model, cfg)
    return model


def _load(model: nn.Module) -> None:
    """Copy every parameter and buffer once, as loading a checkpoint onto the GPU would
    (quantized weights were already made, and recorded, by ``_quantize_linear``)."""
    seen: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        quantized = type(mod).__module__.startswith("bitsandbytes")
        for name, p in list(mod._parameters.items()):
            if p is None or (quantized and name == "weight"):
                continue
            if id(p) not in seen:
                seen[id(p)] = nn.Parameter(_copy(p), requires_grad=p.requires_grad)
            mod._parameters[name] = seen[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = _copy(b)


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A recorded copy of an unrecorded skeleton tensor. Not ``detach().clone()``: the detached
    view would itself be an op output sharing the skeleton's storage, and count as memory."""
    out = torch.empty_like(t, requires_grad=False)
    with torch.no_grad():
        out.copy_(t)
    return out


def _replace_linears(model: nn.Module, quant: str, double_quant: bool, compute: torch.dtype) -> None:
    """Quantize every Linear except the output head, as transformers' bitsandbytes quantizer does."""
    out_emb = model.get_output_embeddings()
    replaced = 0
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is nn.Linear and child is not out_emb:
                setattr(mod, child_name, _quantize_linear(child, quant, double_quant, compute))
                replaced += 1
                del child
    if not replaced:
        raise ValueError(f"{type(model).__name__} has no nn.Linear to quantize (e.g. GPT-2 uses Conv1D)")


def make_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    """The recipe's optimizer, with CUDA defaults (foreach AdamW) rather than CPU ones."""
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, foreach=True)
    if recipe.optimizer == "adamw-fused":
        return torch.optim.AdamW(params, lr=recipe.lr, fused=True)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, foreach=True)
    import bitsandbytes as bnb
    prime_bitsandbytes()
    cls = bnb.optim.PagedAdamW8bit if recipe.optimizer == "paged-adamw8bit" else bnb.optim.AdamW8bit
    with torch._subclasses.fake_tensor.unset_fake_temporarily():  # its constructor reads values
        opt = cls(params, lr=recipe.lr)
    if recipe.optimizer == "paged-adamw8bit":
        _page_states(opt)
    return opt


def _page_states(opt: torch.optim.Optimizer) -> None:
    """Paged states as on CUDA: tensors of >= 1e5 elements live in managed memory
    (cudaMallocManaged), outside the caching allocator; bitsandbytes on CPU would not page."""
    from vramtrace.simulate.core import managed, paused

    def get_state_buffer(p: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if p.numel() < 1e5:
            return torch.zeros_like(p, dtype=dtype)
        with paused():
            return managed(torch.zeros_like(p, dtype=dtype))

    opt.get_state_buffer = get_state_buffer


def training_step(recipe: Recipe, vocab_size: int,
                  device: str | torch.device = "cpu") -> Callable[[nn.Module, torch.optim.Optimizer], None]:
    """One optimizer step of ``grad_accum`` micro-batches, as HF Trainer runs it, with the
    inputs made on ``device`` (the simulation's is the CPU; a real run's, e.g. ``"cuda"``)."""
    ac_dtype = DTYPES[recipe.autocast] if recipe.autocast else None
    device = torch.device(device)

    def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for _ in range(recipe.grad_accum):
            ids = torch.randint(0, vocab_size, (recipe.batch_size, recipe.seq_len), device=device)
            labels = ids.clone()
            ctx = torch.autocast(device.type, dtype=ac_dtype) if ac_dtype else contextlib.nullcontext()
            with ctx:
                out = model(input_ids=ids, labels=labels)
            loss = out.loss / recipe.grad_accum
            del out
            loss.backward()
            del loss, ids, labels
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def simulate_recipe(recipe: Recipe, *, fake: bool = True, stacks: bool = False) -> SimulationResult:
    """Simulate (or, with ``fake=False``, really run on CPU) ``recipe.steps`` training steps."""
    from vramtrace.simulate.core import paused, simulate_step
    vocab = load_config(recipe.model).vocab_size
    if recipe.lora_r or recipe.prepare_kbit:
        import peft.tuners  # noqa: F401  (import-time constants must not count as step memory)

    def factory() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = build_model(recipe, paused)
        return model, make_optimizer(recipe, model)

    return simulate_step(factory, training_step(recipe, vocab), steps=recipe.steps, fake=fake,
                         stacks=stacks, recipe=recipe.to_dict())
