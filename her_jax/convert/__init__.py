"""Hugging Face <-> her_jax conversion (streaming safetensors) and Hub export."""

from her_jax.convert.hf import ConversionError, load_hf, save_hf

__all__ = ["ConversionError", "load_hf", "save_hf"]
