"""her_jax: HER dual-layer-thinking role-play training for Qwen3 in JAX (Flax NNX)."""

__version__ = "0.1.0"
