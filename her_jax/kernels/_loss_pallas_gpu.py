"""Pallas GPU (Triton) forward for `token_stats`; the backward reuses `xla_chunked`'s (KERNELS.md
allows that until a GPU backward wins).

GPU programs of a grid run in parallel with no scratch that survives between them, so each program
takes one token block and sweeps the vocabulary in an in-kernel loop, carrying the online
log-sum-exp statistics in registers. The last vocab tile is shifted back to end at the last row
(no out-of-bounds loads) and the columns it repeats are masked. Triton wants power-of-two tile
shapes: the hidden size must be a power of two (the dispatcher falls back to `xla_chunked` when it
is not, or when compilation fails).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from her_jax.kernels.dual_layer_loss import _NEG, TokenStats, _chunked_backward, custom_vjp_stats


def _forward_kernel(x_ref, w_ref, y_ref, lp_ref, lse_ref, ent_ref, *, bv, nv, rows, vocab_size, scale):
    x = x_ref[...]
    y = y_ref[...]
    bt = x.shape[0]

    def vocab_tile(j, carry):
        m, l, tgt, s = carry
        v0 = jnp.minimum(j * bv, rows - bv)
        w = w_ref[pl.ds(v0, bv), :]
        z = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        col = v0 + jax.lax.broadcasted_iota(jnp.int32, (bt, bv), 1)
        fresh = (col >= j * bv) & (col < vocab_size)
        z = jnp.where(fresh, z, _NEG)
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        alpha = jnp.exp(m - m_new)
        e = jnp.where(fresh, jnp.exp(z - m_new[:, None]), 0.0)
        l = alpha * l + jnp.sum(e, axis=1)
        s = alpha * s + jnp.sum(jnp.where(fresh, e * z, 0.0), axis=1)
        tgt = tgt + jnp.sum(jnp.where(fresh & (col == y[:, None]), z, 0.0), axis=1)
        return m_new, l, tgt, s

    zeros = jnp.zeros((bt,), jnp.float32)
    m, l, tgt, s = jax.lax.fori_loop(0, nv, vocab_tile, (jnp.full((bt,), _NEG, jnp.float32), zeros, zeros, zeros))
    lse = m + jnp.log(l)
    lse_ref[...] = lse
    lp_ref[...] = tgt - lse
    ent_ref[...] = lse - s / l


def _forward(x, w, y, vocab_size, scale, bt, bv, interpret):
    t, h = x.shape
    rows = w.shape[0]
    nv = pl.cdiv(rows, bv)
    kernel = functools.partial(_forward_kernel, bv=bv, nv=nv, rows=rows, vocab_size=vocab_size, scale=scale)
    tok = pl.BlockSpec((bt,), lambda i: (i,))
    out = jax.ShapeDtypeStruct((t,), jnp.float32)
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        params["compiler_params"] = pltriton.CompilerParams(num_warps=8, num_stages=2)
    return pl.pallas_call(
        kernel, grid=(pl.cdiv(t, bt),),
        in_specs=[pl.BlockSpec((bt, h), lambda i: (i, 0)), pl.BlockSpec((rows, h), lambda i: (0, 0)), tok],
        out_specs=[tok, tok, tok], out_shape=[out, out, out], interpret=interpret, **params,
    )(x, w, y)


def _backward(x, w, y, lse, ent, g_lp, g_lse, g_ent, vocab_size, scale, bt, bv, interpret):
    return _chunked_backward(x, w, y, None, lse, ent, g_lp, g_lse, g_ent, vocab_size, scale, 512, 2048)


_stats = custom_vjp_stats(_forward, _backward)


def token_stats(hidden, weight, targets, *, vocab_size, scale, entropy, block_t=None, block_v=None,
                interpret=False) -> TokenStats:
    t, h = hidden.shape
    if not interpret and h & (h - 1):
        raise NotImplementedError(f"pallas_gpu needs a power-of-two hidden size, found {h}")
    bt = min(block_t or 64, t)
    bv = min(block_v or 128, weight.shape[0])
    if not interpret and (bt & (bt - 1) or bv & (bv - 1)):
        raise NotImplementedError(f"pallas_gpu needs power-of-two tiles, found {bt} x {bv}")
    return _stats(hidden, weight.astype(hidden.dtype), targets, bool(entropy),
                  (vocab_size, float(scale), bt, bv, bool(interpret)))
