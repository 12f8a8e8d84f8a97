"""Dual-view flash attention: equal to the dense reference, a sound skip table, wired into the model,
and compiled for TPU generations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import TPU_SLICES, tpu_devices

from her_jax.kernels.dual_view_attention import block_table, dense_attention, flash_attention, visibility_mask


def layout(rng, b, t, docs=3, views=3):
    """Random packed rows like dual-view data: sorted doc ids, private branches as contiguous runs
    (view 1..views), positions restarting per doc (branch positions are not checked here)."""
    doc = np.sort(rng.integers(0, docs, (b, t)), axis=1)
    view = np.zeros((b, t), np.int64)
    for r in range(b):
        i = 0
        while i < t:
            n = int(rng.integers(1, 24))
            if rng.random() < 0.3:
                view[r, i:i + n] = rng.integers(1, views + 1)
            i += n
    pos = np.zeros((b, t), np.int64)
    for r in range(b):
        for d in np.unique(doc[r]):
            idx = np.flatnonzero(doc[r] == d)
            pos[r, idx] = np.arange(len(idx))
    return (jnp.asarray(a, jnp.int32) for a in (doc, view, pos))


def dense(q, k, v, doc, view, pos, window, scale):
    idx = jnp.arange(q.shape[1])
    mask = visibility_mask(idx, idx, doc, doc, view, view)
    if window:
        mask &= (pos[:, :, None] - pos[:, None, :]) < window
    return dense_attention(q, k, v, mask, scale)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("t,n,k,block,window", [(200, 4, 2, 64, 0), (96, 6, 6, 32, 0), (130, 8, 2, 64, 7), (40, 4, 1, 512, 0)])
def test_flash_matches_dense_f32(rng, t, n, k, block, window):
    b, h = 2, 16
    q, kk, v = (jnp.asarray(rng.standard_normal((b, t, heads, h)), jnp.float32) for heads in (n, k, k))
    doc, view, pos = layout(rng, b, t)
    scale = h ** -0.5
    g = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    ref_fn = lambda q, k, v: jnp.sum(dense(q, k, v, doc, view, pos, window, scale) * g)
    flash_fn = lambda q, k, v: jnp.sum(flash_attention(q, k, v, doc, view, pos, scale=scale, window=window,
                                                       block=block, interpret=True) * g)
    with jax.enable_x64(True):
        f64 = lambda a: np.asarray(a, np.float64)
        ref_out = dense(f64(q), f64(kk), f64(v), doc, view, pos, window, scale)
        ref_grads = jax.grad(ref_fn, argnums=(0, 1, 2))(f64(q), f64(kk), f64(v))
    out = flash_attention(q, kk, v, doc, view, pos, scale=scale, window=window, block=block, interpret=True)
    grads = jax.grad(flash_fn, argnums=(0, 1, 2))(q, kk, v)
    assert rel(out, ref_out) <= 1e-5
    for got, want in zip(grads, ref_grads):
        assert rel(got, want) <= 1e-4


def test_flash_bf16(rng):
    b, t, n, k, h = 1, 128, 4, 2, 32
    q, kk, v = (jnp.asarray(rng.standard_normal((b, t, heads, h)), jnp.bfloat16) for heads in (n, k, k))
    doc, view, pos = layout(rng, b, t)
    up = lambda a: np.asarray(a, np.float64)
    with jax.enable_x64(True):
        ref = dense(up(q), up(kk), up(v), doc, view, pos, 0, h ** -0.5)
    out = flash_attention(q, kk, v, doc, view, pos, scale=h ** -0.5, block=64, interpret=True)
    assert out.dtype == jnp.bfloat16 and rel(out, ref) <= 2e-2


def test_skip_table_is_sound(rng):
    """0 only where every pair is hidden, 2 only where every pair is visible — on random layouts."""
    block, t = 16, 128
    for window in (0, 5, 40):
        doc, view, pos = layout(rng, 3, t, docs=4, views=4)
        view = view.at[0].set(0)  # one row without private branches, where whole blocks are visible
        table = np.asarray(block_table(doc, view, pos, block, window))
        idx = jnp.arange(t)
        mask = np.array(visibility_mask(idx, idx, doc, doc, view, view))
        if window:
            mask &= np.asarray((pos[:, :, None] - pos[:, None, :]) < window)
        blocks = mask.reshape(3, t // block, block, t // block, block).transpose(0, 1, 3, 2, 4)
        assert np.all(~blocks[table == 0].any(axis=(-1, -2)))
        assert np.all(blocks[table == 2].all(axis=(-1, -2)))
        assert (table == 0).any() and (window == 5 or (table == 2).any())  # a 5-token window fills no 16x16 block


def test_model_flash_equals_dense(rng):
    from her_jax.model import init_model, preset

    cfg = preset("qwen3-test").replace(num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                                       layer_types=("full_attention", "sliding_attention"), sliding_window=5)
    tokens = rng.integers(0, 512, (2, 48))
    doc, view, pos = layout(rng, 2, 48)
    kw = dict(positions=pos, doc_ids=doc, view_ids=view)
    results = {}
    for impl in ("dense", "pallas_interpret"):
        model = init_model(cfg.replace(attention_impl=impl), seed=1)
        assert model.attention_impl() == impl
        logits = nnx.jit(lambda m, t: m(t, **kw))(model, tokens)
        grads = nnx.grad(lambda m: m(tokens, **kw).mean())(model)
        results[impl] = (np.asarray(logits), np.asarray(grads["layers"]["self_attn"]["k_proj"][...]))
    assert rel(results["pallas_interpret"][0], results["dense"][0]) <= 1e-5
    assert rel(results["pallas_interpret"][1], results["dense"][1]) <= 1e-4
    assert init_model(cfg).attention_impl() == "dense"  # "auto" on CPU


@pytest.mark.parametrize("generation", sorted(TPU_SLICES))
def test_flash_compiles_for_tpu(generation):
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(tpu_devices(generation)).reshape(2, -1), ("data", "tensor"))
    b, t, n, k, h = 2, 2048, 16, 8, 128  # Qwen3-0.6B attention shapes

    def loss(q, kk, v, doc, view, pos):
        def local(q, kk, v, doc, view, pos):
            return flash_attention(q, kk, v, doc, view, pos, scale=h ** -0.5, window=0)
        heads, meta = P("data", None, "tensor", None), P("data", None)
        out = jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads, meta, meta, meta), out_specs=heads,
                            check_vma=False)(q, kk, v, doc, view, pos)
        return jnp.sum(out.astype(jnp.float32))

    sds = lambda shape, dtype, spec: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
    heads, meta = P("data", None, "tensor", None), P("data", None)
    args = (sds((b, t, n, h), jnp.bfloat16, heads), sds((b, t, k, h), jnp.bfloat16, heads),
            sds((b, t, k, h), jnp.bfloat16, heads), *(sds((b, t), jnp.int32, meta) for _ in range(3)))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    assert compiled.as_text().count("tpu_custom_call") == 3  # forward, dQ, dK/dV
