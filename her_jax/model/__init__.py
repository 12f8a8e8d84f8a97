"""The Qwen3 model: config (HF <-> ours, presets) and the Flax NNX modules."""

from her_jax.model.config import ConfigError, Qwen3Config, preset
from her_jax.model.qwen3 import KVCache, Qwen3, abstract_model, init_model

__all__ = ["ConfigError", "KVCache", "Qwen3", "Qwen3Config", "abstract_model", "init_model", "preset"]
