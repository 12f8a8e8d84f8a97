"""Our Qwen3 against transformers' Qwen3ForCausalLM (fp32, CPU): logits within 1e-4 relative."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import assert_bit_exact, forward, hf_logits, hf_model, hf_tensors, rel_err, save_hf_model

from her_jax.convert.hf import load_hf, save_hf
from her_jax.model.config import ACTIVATIONS, ROPE_TYPES, Qwen3Config

TOL = 1e-4

# Odd shapes on purpose: query width != hidden, GQA ratios 1/2/4, tied and untied, biases,
# RoPE variants, sliding-window layers, theta and eps off their defaults.
CONFIGS = {
    "tied_gqa2": dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "untied_gqa4_wide_q": dict(hidden_size=48, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                               rope_theta=500000.0, rms_norm_eps=1e-5),
    "gqa1_bias_gelu": dict(hidden_size=40, num_attention_heads=3, num_key_value_heads=3, head_dim=8,
                           attention_bias=True, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                           rope_theta=12345.0, rms_norm_eps=3e-4),
    "yarn_sliding": dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=5, max_window_layers=1,
                         rope_parameters=dict(rope_type="yarn", rope_theta=20000.0, factor=4.0,
                                              original_max_position_embeddings=64)),
    "llama3_rope": dict(rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=16)),
    "linear_rope_tall": dict(num_hidden_layers=4, intermediate_size=32,
                             rope_parameters=dict(rope_type="linear", rope_theta=7000.0, factor=3.0)),
    # Sequences longer than max_position_embeddings / the original length exercise the growth paths.
    "dynamic_rope_grown": dict(max_position_embeddings=6, rope_parameters=dict(rope_type="dynamic", rope_theta=9000.0,
                                                                                factor=2.5)),
    "longrope_long": dict(head_dim=8, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=5, factor=4.0,
        short_factor=[1.0, 1.1, 1.3, 2.0], long_factor=[1.0, 2.0, 4.0, 8.0])),
    "proportional_partial": dict(hidden_act="quick_gelu", rope_parameters=dict(
        rope_type="proportional", rope_theta=10000.0, partial_rotary_factor=0.5, factor=2.0)),
}


def check_parity(tmp_path, rng, seed=0, batch=2, length=11, **overrides):
    hf = hf_model(seed, **overrides)
    model = load_hf(save_hf_model(hf, tmp_path / "hf"), progress=False)
    tokens = rng.integers(0, hf.config.vocab_size, (batch, length))
    ours, ref = forward(model, tokens), hf_logits(hf, tokens)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= TOL, f"{overrides}: relative error {rel_err(ours, ref):.2e}"
    return model, hf, ours


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(tmp_path, rng, name):
    check_parity(tmp_path, rng, **CONFIGS[name])


def random_hf_config(rng) -> dict:
    """A random tiny Qwen3 config of the kinds transformers accepts and we claim to support."""
    kv = int(rng.integers(1, 4))
    cfg = dict(
        vocab_size=int(rng.integers(50, 300)), hidden_size=int(rng.integers(8, 40)) * 2,
        intermediate_size=int(rng.integers(8, 120)), num_hidden_layers=int(rng.integers(1, 5)),
        num_key_value_heads=kv, num_attention_heads=kv * int(rng.choice([1, 2, 3, 4])),
        head_dim=int(rng.choice([4, 8, 12, 16, 32])), tie_word_embeddings=bool(rng.integers(2)),
        attention_bias=bool(rng.integers(2)), rms_norm_eps=float(10 ** rng.uniform(-7, -3)),
        hidden_act=str(rng.choice(ACTIVATIONS)),
    )
    theta = float(10 ** rng.uniform(3, 6.5))
    kind = rng.choice(ROPE_TYPES)
    half = cfg["head_dim"] // 2
    if kind == "default":
        cfg["rope_parameters"] = dict(rope_type="default", rope_theta=theta)
    elif kind == "proportional":
        cfg["rope_parameters"] = dict(rope_type="proportional", rope_theta=theta, factor=float(rng.uniform(1, 4)),
                                      partial_rotary_factor=float(rng.choice([0.25, 0.5, 1.0])))
    elif kind == "dynamic":
        cfg["max_position_embeddings"] = int(rng.integers(4, 20))
        cfg["rope_parameters"] = dict(rope_type="dynamic", rope_theta=theta, factor=float(rng.uniform(1, 8)))
    elif kind == "longrope":
        cfg["rope_parameters"] = dict(rope_type="longrope", rope_theta=theta, factor=float(rng.uniform(1, 8)),
                                      original_max_position_embeddings=int(rng.integers(4, 20)),
                                      short_factor=rng.uniform(1, 2, half).tolist(),
                                      long_factor=rng.uniform(1, 16, half).tolist())
    elif kind == "linear":
        cfg["rope_parameters"] = dict(rope_type="linear", rope_theta=theta, factor=float(rng.uniform(1, 8)))
    elif kind == "yarn":
        cfg["rope_parameters"] = dict(rope_type="yarn", rope_theta=theta, factor=float(rng.uniform(1, 8)),
                                      original_max_position_embeddings=int(rng.integers(16, 128)))
    else:
        cfg["rope_parameters"] = dict(rope_type="llama3", rope_theta=theta, factor=float(rng.uniform(2, 8)),
                                      low_freq_factor=1.0, high_freq_factor=float(rng.uniform(2, 6)),
                                      original_max_position_embeddings=int(rng.integers(8, 64)))
    if rng.integers(3) == 0:
        cfg.update(use_sliding_window=True, sliding_window=int(rng.integers(1, 8)),
                   max_window_layers=int(rng.integers(0, cfg["num_hidden_layers"] + 1)))
    return cfg


@pytest.mark.parametrize("draw", range(6))
def test_random_configs_match_transformers_and_round_trip(tmp_path, rng, draw):
    from transformers import Qwen3ForCausalLM

    cfg = random_hf_config(rng)
    print("config", cfg)
    model, hf, _ = check_parity(tmp_path, rng, seed=draw, length=int(rng.integers(3, 17)), **cfg)
    out = save_hf(model, tmp_path / "out", progress=False)
    assert_bit_exact(hf_tensors(tmp_path / "hf"), hf_tensors(out))
    tokens = rng.integers(0, cfg["vocab_size"], (1, 9))
    # A fresh copy of the source model: transformers' dynamic RoPE remembers the longest call it saw.
    np.testing.assert_array_equal(hf_logits(Qwen3ForCausalLM.from_pretrained(out).eval(), tokens),
                                  hf_logits(hf_model(draw, **cfg), tokens))


# Each field of Qwen3Config, perturbed: the HF config change that exercises it.
BASE = dict(num_hidden_layers=3, use_sliding_window=False,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0))
PERTURB = {
    "vocab_size": dict(vocab_size=200),
    "hidden_size": dict(hidden_size=48),
    "intermediate_size": dict(intermediate_size=50),
    "num_hidden_layers": dict(num_hidden_layers=2),
    "num_attention_heads": dict(num_attention_heads=8),
    "num_key_value_heads": dict(num_key_value_heads=1),
    "head_dim": dict(head_dim=8),
    "rms_norm_eps": dict(rms_norm_eps=0.3),
    "rope_theta": dict(rope_parameters=dict(rope_type="default", rope_theta=77.0)),
    "tie_word_embeddings": dict(tie_word_embeddings=True),
    "rope_type": dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    "rope_scaling": dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=2.0, attention_factor=0.5,
                                              beta_fast=8.0, beta_slow=2.0, original_max_position_embeddings=32)),
    "attention_bias": dict(attention_bias=True),
    "hidden_act": dict(hidden_act="gelu"),
    "sliding_window": dict(use_sliding_window=True, sliding_window=2, max_window_layers=0),
    "layer_types": dict(use_sliding_window=True, sliding_window=2, max_window_layers=2),
}
# Not part of the forward math: our run-time choices, init scale, and metadata kept for export
# (max_position_embeddings feeds no RoPE type we support; transformers ignores it there too).
NOT_MATH = {"param_dtype", "dtype", "remat", "attention_impl", "scan_layers", "initializer_range", "max_position_embeddings", "hf_extra",
            "generation_config"}


def test_every_read_field_changes_the_output(tmp_path, rng):
    """A field read and then ignored is a bug (a port once ignored rope_theta): each field, perturbed,
    must change our logits and still match transformers under the same perturbation."""
    fields = {f.name for f in dataclasses.fields(Qwen3Config)}
    assert fields - NOT_MATH == set(PERTURB), "every architecture field needs a perturbation here"
    tokens = rng.integers(0, 128, (2, 12))
    base = forward(load_hf(save_hf_model(hf_model(0, **BASE), tmp_path / "base"), progress=False), tokens)
    for field, change in PERTURB.items():
        hf = hf_model(0, **{**BASE, **change})
        model = load_hf(save_hf_model(hf, tmp_path / field), progress=False)
        toks = tokens % hf.config.vocab_size
        ours = forward(model, toks)
        assert rel_err(ours, hf_logits(hf, toks)) <= TOL, field
        assert ours.shape != base.shape or rel_err(ours, base) > 1e-3, f"{field} did not change the output"


def test_runtime_fields_take_effect(tmp_path, rng):
    hf = hf_model(0)
    folder = save_hf_model(hf, tmp_path / "hf")
    tokens = rng.integers(0, 128, (2, 9))
    ref = hf_logits(hf, tokens)
    f32 = load_hf(folder, progress=False)
    for kw in (dict(dtype="bfloat16"), dict(compute_dtype="bfloat16")):
        model = load_hf(folder, progress=False, **kw)
        out = forward(model, tokens)
        assert 1e-5 < rel_err(out, ref) < 5e-2, kw
    assert load_hf(folder, dtype="bfloat16", progress=False).layers.mlp.up_proj[...].dtype == jax.numpy.bfloat16

    # remat: same gradients, different programs (the policy is really applied).
    def grads(model):
        graphdef, state = nnx.split(model)
        loss = lambda s: nnx.merge(graphdef, s)(tokens).astype("float32").mean()
        return jax.make_jaxpr(jax.grad(loss))(state), jax.grad(loss)(state)

    jaxprs, values = {}, {}
    for policy in ("none", "full", "dots"):
        jaxprs[policy], values[policy] = grads(load_hf(folder, remat=policy, progress=False))
    assert "remat" not in str(jaxprs["none"]) and "remat" in str(jaxprs["full"])
    assert str(jaxprs["full"]) != str(jaxprs["dots"])
    for policy in ("full", "dots"):
        for a, b in zip(jax.tree.leaves(values["none"]), jax.tree.leaves(values[policy])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # scan_layers=False unrolls the layer loop (for FLOP counting): same logits, no while loop.
    unrolled = nnx.merge(*nnx.split(f32))
    unrolled.config = f32.config.replace(scan_layers=False)
    np.testing.assert_allclose(forward(unrolled, tokens), forward(f32, tokens), rtol=1e-6, atol=1e-6)
    hlo = lambda m: jax.jit(lambda s: nnx.merge(nnx.graphdef(m), s)(tokens)).lower(nnx.state(m)).as_text()
    assert "while" in hlo(f32) and "while" not in hlo(unrolled)


def test_initializer_range_sets_the_init_scale():
    from her_jax.model import init_model, preset

    stds = [float(np.std(np.asarray(init_model(preset("qwen3-test").replace(initializer_range=r))
                                    .layers.mlp.gate_proj[...]))) for r in (0.02, 0.5)]
    assert abs(stds[0] - 0.02) < 0.002 and abs(stds[1] - 0.5) < 0.05


def test_kv_cache_prefill_and_decode_equal_full_forward(tmp_path, rng):
    hf = hf_model(3, num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    model = load_hf(save_hf_model(hf, tmp_path / "hf"), progress=False)
    tokens = rng.integers(0, 128, (3, 14))
    full = forward(model, tokens)
    assert rel_err(full, hf_logits(hf, tokens)) <= TOL

    extend = nnx.jit(lambda m, t, c: m.extend(t, c))
    cache = model.init_cache(batch=3, capacity=20)
    logits, cache = extend(model, tokens[:, :6], cache)
    steps = [np.asarray(logits)]
    for t in range(6, 14):
        logits, cache = extend(model, tokens[:, t:t + 1], cache)
        steps.append(np.asarray(logits))
    assert int(cache.length) == 14
    assert rel_err(np.concatenate(steps, axis=1), full) <= TOL
    with pytest.raises(ValueError, match="KV cache overflow"):
        model.extend(tokens[:, :7], cache)

    # The decode loop's form: per-layer weight copies, with one cache array per layer (what the
    # sampler uses) and with the stacked cache.
    extend_layers = nnx.jit(lambda m, t, c: m.extend(t, c, layers=m.layer_states()))
    for unstacked in (True, False):
        cache = model.init_cache(batch=3, capacity=20)
        cache = cache.unstacked() if unstacked else cache
        assert isinstance(cache.k, tuple) == unstacked and cache.capacity == 20
        steps = []
        for lo, hi in [(0, 6)] + [(t, t + 1) for t in range(6, 14)]:
            logits, cache = extend_layers(model, tokens[:, lo:hi], cache)
            steps.append(np.asarray(logits))
        assert rel_err(np.concatenate(steps, axis=1), full) <= TOL, unstacked
        assert cache.stacked().k.shape == (3, 3, model.config.num_key_value_heads, 20, model.config.head_dim)


def test_packed_documents_are_independent(tmp_path, rng):
    """Two sequences packed in one row with doc ids and restarted positions give each sequence's
    own logits — the doc part of the dual-view predicate."""
    hf = hf_model(5)
    model = load_hf(save_hf_model(hf, tmp_path / "hf"), progress=False)
    a, b = rng.integers(0, 128, (1, 7)), rng.integers(0, 128, (1, 5))
    row = np.concatenate([a, b], axis=1)
    positions = np.concatenate([np.arange(7), np.arange(5)])[None]
    doc = np.array([[0] * 7 + [1] * 5])
    packed = forward(model, row, positions=positions, doc_ids=doc)
    assert rel_err(packed[:, :7], hf_logits(hf, a)) <= TOL
    assert rel_err(packed[:, 7:], hf_logits(hf, b)) <= TOL
    # Without doc ids the second sequence sees the first, and its logits change.
    assert rel_err(forward(model, row, positions=positions)[:, 7:], hf_logits(hf, b)) > 1e-2


def test_private_views_are_hidden_from_later_tokens(tmp_path, rng):
    """A token in view 1 is invisible to shared tokens after it: the row [x, p, y] with p in a
    private view gives y the logits of [x, y] at y's position."""
    hf = hf_model(6)
    model = load_hf(save_hf_model(hf, tmp_path / "hf"), progress=False)
    x, p, y = (rng.integers(0, 128, (1, n)) for n in (4, 3, 2))
    row = np.concatenate([x, p, y], axis=1)
    positions = np.concatenate([np.arange(4), 4 + np.arange(3), 4 + np.arange(2)])[None]
    view = np.array([[0] * 4 + [1] * 3 + [0] * 2])
    out = forward(model, row, positions=positions, view_ids=view)
    assert rel_err(out[:, 7:], hf_logits(hf, np.concatenate([x, y], axis=1))[:, 4:]) <= TOL
    assert rel_err(out[:, 4:7], hf_logits(hf, np.concatenate([x, p], axis=1))[:, 4:]) <= TOL


def test_bad_inputs_are_named():
    from her_jax.model import init_model, preset

    model = init_model(preset("qwen3-test"))
    with pytest.raises(ValueError, match=r"tokens: ids must lie in \[0, 512\)"):
        model(np.array([[1, 512]]))
    with pytest.raises(ValueError, match="tokens: expected int ids of shape"):
        model(np.zeros((3,), np.int32))
    with pytest.raises(ValueError, match="positions: expected int32 of shape"):
        model(np.zeros((1, 4), np.int32), positions=np.zeros((1, 3), np.int32))
