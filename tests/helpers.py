"""Shared test helpers: tiny random transformers Qwen3 models and error measures."""

from __future__ import annotations

import os

import numpy as np

BASE_HF = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
               tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0)


def hf_model(seed: int = 0, **overrides):
    """A transformers Qwen3ForCausalLM (fp32, eval mode) whose every parameter is random —
    norms and biases included, so a swapped or skipped tensor changes the output."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**{**BASE_HF, **overrides})
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    return model


def save_hf_model(model, folder) -> str:
    model.save_pretrained(str(folder))
    return str(folder)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def forward(model, tokens, **kw) -> np.ndarray:
    from flax import nnx

    return np.asarray(nnx.jit(lambda m, t, kw: m(t, **kw))(model, np.asarray(tokens, np.int32), kw))


def hf_tensors(folder) -> dict[str, np.ndarray]:
    """Every tensor of an HF folder, read with the safetensors library itself."""
    import safetensors.numpy

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(safetensors.numpy.load_file(os.path.join(folder, name)))
    return out


def assert_bit_exact(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


# The smallest slice of each TPU generation the AOT tests compile for.
TPU_SLICES = {"v5e": "v5e-4", "v5p": "v5p-8", "v6e": "v6e-4"}


def tpu_devices(generation: str):
    """The chips of a small TPU slice for AOT compilation on this CPU host; skips the test when
    libtpu is not installed."""
    import pytest

    from her_jax.parallel.topology import parse_slice

    try:
        return parse_slice(TPU_SLICES[generation]).devices()
    except RuntimeError as e:
        if "needs libtpu" in str(e):
            pytest.skip("libtpu is not installed")
        raise
