"""Qwen3Config: presets against the published facts, HF config reading and writing, errors."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from her_jax.model.config import ConfigError, HF_PRESETS, Qwen3Config, preset, rope_params
from her_jax.model.qwen3 import abstract_model

# QWEN3.md: layers, hidden, q heads, kv heads, head_dim, intermediate, tied, params total / non-embedding
# (billions, as printed there).
QWEN3_FACTS = {
    "qwen3-0.6b": (28, 1024, 16, 8, 128, 3072, True, "0.60", "0.44"),
    "qwen3-1.7b": (28, 2048, 16, 8, 128, 6144, True, "1.72", "1.41"),
    "qwen3-4b": (36, 2560, 32, 8, 128, 9728, True, "4.02", "3.63"),
    "qwen3-8b": (36, 4096, 32, 8, 128, 12288, False, "8.19", "6.95"),
    "qwen3-14b": (40, 5120, 40, 8, 128, 17408, False, "14.8", "13.2"),
    "qwen3-32b": (64, 5120, 64, 8, 128, 25600, False, "32.8", "31.2"),
}


def _round_like(value: float, printed: str) -> str:
    decimals = len(printed.split(".")[1])
    return f"{value:.{decimals}f}"


@pytest.mark.parametrize("name", sorted(QWEN3_FACTS))
def test_presets_equal_published_configs(name):
    layers, hidden, heads, kv, head_dim, inter, tied, total, non_emb = QWEN3_FACTS[name]
    c = preset(name)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.tie_word_embeddings) == (layers, hidden, heads, kv, head_dim, inter, tied)
    assert (c.vocab_size, c.rms_norm_eps, c.rope_theta, c.rope_type, c.max_position_embeddings) == \
        (151936, 1e-6, 1e6, "default", 40960)
    assert not c.attention_bias and c.hidden_act == "silu" and not any(c.layer_windows)

    # Parameter counts from the model's own (abstract) parameters, not from a formula.
    params = nnx.state(abstract_model(c), nnx.Param)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    embeddings = c.vocab_size * c.hidden_size * (1 if tied else 2)
    assert _round_like(n / 1e9, total) == total
    assert _round_like((n - embeddings) / 1e9, non_emb) == non_emb


def test_qwen3_4b_2507_has_its_own_rope_theta():
    assert preset("qwen3-4b-2507").rope_theta == 5e6
    assert preset("qwen3-4b-2507").arch_dict() != preset("qwen3-4b").arch_dict()


def test_presets_load_in_transformers():
    from transformers import Qwen3Config as HFConfig

    for name in HF_PRESETS:
        ours = preset(name)
        theirs = HFConfig(**ours.to_hf())
        assert Qwen3Config.from_hf(theirs.to_dict()) == ours, name


def test_rope_theta_from_either_place():
    d = dict(HF_PRESETS["qwen3-test"])
    top = Qwen3Config.from_hf({**d, "rope_theta": 1234.0})
    nested = Qwen3Config.from_hf({**{k: v for k, v in d.items() if k != "rope_theta"},
                                  "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}})
    assert top.rope_theta == nested.rope_theta == 1234.0
    assert top == nested


@pytest.mark.parametrize("field", ["head_dim", "tie_word_embeddings", "rms_norm_eps", "rope_theta",
                                   "num_key_value_heads", "vocab_size", "max_position_embeddings"])
def test_required_fields_are_required(field):
    d = {k: v for k, v in HF_PRESETS["qwen3-test"].items() if k != field}
    with pytest.raises(ConfigError, match=field):
        Qwen3Config.from_hf(d)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type"),
    ({"num_key_value_heads": 3}, "must divide num_attention_heads"),
    ({"head_dim": 7}, "even head_dim"),
    ({"hidden_act": "swiglu_unknown"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "su", "factor": 2.0}}, "rope_type"),
    ({"rope_scaling": {"rope_type": "linear"}}, "needs 'factor'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}, "longrope short_factor"),
    ({"hidden_act": "prelu"}, "hidden_act"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"hidden_size": 64.5}, "hidden_size"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "sliding_window"),
])
def test_bad_configs_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        Qwen3Config.from_hf({**HF_PRESETS["qwen3-test"], **change})


def test_from_file_and_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_PRESETS["qwen3-test"]))
    assert Qwen3Config.from_hf(tmp_path) == Qwen3Config.from_hf(tmp_path / "config.json") == preset("qwen3-test")
    with pytest.raises(ConfigError, match="no such file"):
        Qwen3Config.from_hf(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen3Config.from_hf(tmp_path / "bad.json")


def test_json_round_trip_keeps_everything():
    c = Qwen3Config.from_hf({**HF_PRESETS["qwen3-test"], "use_sliding_window": True, "sliding_window": 3,
                             "max_window_layers": 1, "rope_scaling": {"rope_type": "yarn", "factor": 2.0,
                                                                     "original_max_position_embeddings": 64}},
                            dtype="bfloat16", remat="dots")
    back = Qwen3Config.from_json_dict(json.loads(json.dumps(c.to_json_dict())))
    assert back == c and back.hf_extra == c.hf_extra and back.remat == "dots"
    assert back.layer_windows == (0, 3)
    longrope = Qwen3Config.from_hf({**HF_PRESETS["qwen3-test"], "head_dim": 8, "rope_scaling": {
        "rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [1.0, 2.0, 4.0, 8.0]}})
    assert hash(longrope) == hash(Qwen3Config.from_json_dict(json.loads(json.dumps(longrope.to_json_dict()))))
    assert longrope.to_hf()["rope_parameters"]["long_factor"] == [1.0, 2.0, 4.0, 8.0]
    with pytest.raises(ConfigError, match="unknown Qwen3Config fields"):
        Qwen3Config.from_json_dict({**c.to_json_dict(), "rope_thetaa": 1.0})


def test_rope_matches_transformers_inverse_frequencies():
    import torch
    from transformers import Qwen3Config as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for rope in ({"rope_type": "linear", "factor": 3.0}, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                 {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 16}):
        hf = HFConfig(**{**HF_PRESETS["qwen3-test"], "rope_parameters": {**rope, "rope_theta": 10000.0}})
        inv, scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, torch.device("cpu"))
        ours, our_scale = rope_params(Qwen3Config.from_hf(hf.to_dict()))
        np.testing.assert_allclose(ours, inv.numpy(), rtol=1e-6)
        assert our_scale == pytest.approx(scale)
