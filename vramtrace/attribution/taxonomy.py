"""The owner taxonomy: who a block of GPU memory belongs to.

At most 9 owners plus ``unknown`` so that PyTorch's memory visualizer, which colours the Active
Memory Timeline by event ``category`` with a 10-colour legend, shows each owner in its own colour.
Finer detail (dtype, module, phase, parameter name) travels in ``user_metadata`` as JSON with the
keys in ``METADATA_KEYS``; reports split owners by it (e.g. ``weight`` by dtype: int8, 4-bit
packed uint8, fp16/bf16, fp32 upcast).
"""
from __future__ import annotations

WEIGHT = "weight"            # frozen (requires_grad=False) parameters and buffers of the model
TRAINABLE = "trainable"      # trainable parameters: LoRA adapters, or every weight in a full fine-tune
QUANT_STATE = "quant_state"  # quantization state: int8 scales (SCB), 4-bit absmax/quant maps, outliers
GRADIENT = "gradient"        # .grad of trainable parameters (and gradient buffers)
OPTIMIZER = "optimizer"      # optimizer state (Adam exp_avg / exp_avg_sq, 8-bit states, step counters)
ACTIVATION = "activation"    # tensors saved for backward (including recomputed ones under checkpointing)
AUTOCAST = "autocast"        # autocast's cast copies of weights (e.g. bf16 copy of a fp16 weight)
TEMPORARY = "temporary"      # everything else made and freed by an op: workspaces, intermediates
INPUT = "input"              # batches, labels, attention masks moved to the device
UNKNOWN = "unknown"

OWNERS: tuple[str, ...] = (WEIGHT, TRAINABLE, QUANT_STATE, GRADIENT, OPTIMIZER, ACTIVATION,
                           AUTOCAST, TEMPORARY, INPUT, UNKNOWN)

PHASES: tuple[str, ...] = ("setup", "forward", "backward", "recompute", "optimizer")

# JSON keys of the user_metadata object stamped on each allocation.
METADATA_KEYS: tuple[str, ...] = ("owner", "module", "phase", "step", "dtype", "shape", "param")
