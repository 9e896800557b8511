"""Predict a GPU's memory for a training step without the GPU (fake tensors + allocator model)."""
from vramtrace.simulate.core import SimulationResult, paused, simulate_step
from vramtrace.simulate.models import BUILTIN_CONFIGS, Recipe, simulate_recipe

__all__ = ["BUILTIN_CONFIGS", "Recipe", "SimulationResult", "paused", "simulate_recipe", "simulate_step"]
