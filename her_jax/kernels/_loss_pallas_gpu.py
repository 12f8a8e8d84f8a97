"""Pallas GPU (Triton) forward for `token_stats`; the backward reuses `xla_chunked`'s (KERNELS.md
allows that until a GPU backward wins).

GPU programs of a grid run in parallel with no scratch that survives between them, so each program
takes one token block and sweeps the vocabulary in an in-kernel loop, carrying the online
log-sum-exp statistics in registers. Each [tokens x vocab] tile of logits is accumulated over
slices of `block_h` hidden units (an inner loop), so the tiles held at once stay small whatever the
hidden size (a whole 4,096-wide row block would not fit a GPU's shared memory). The last vocab tile
is shifted back to end at the last row (no out-of-bounds loads) and the columns it repeats are
masked. Triton wants power-of-two tile shapes: `block_h` is the largest power of two up to 64 that
divides the hidden size (Qwen3's 1,024 ... 5,120 all give 64); the dispatcher falls back to
`xla_chunked` when compilation fails.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from her_jax.kernels.dual_layer_loss import _NEG, TokenStats, _chunked_backward, custom_vjp_stats


def _forward_kernel(x_ref, w_ref, y_ref, lp_ref, lse_ref, ent_ref, *, bv, nv, bh, rows, vocab_size, scale):
    y = y_ref[...]
    bt = y.shape[0]
    nh = x_ref.shape[1] // bh

    def vocab_tile(j, carry):
        m, l, tgt, s = carry
        v0 = jnp.minimum(j * bv, rows - bv)

        def hidden_slice(k, acc):
            x = x_ref[:, pl.ds(k * bh, bh)]
            w = w_ref[pl.ds(v0, bv), pl.ds(k * bh, bh)]
            return acc + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

        z = jax.lax.fori_loop(0, nh, hidden_slice, jnp.zeros((bt, bv), jnp.float32)) * scale
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


def _block_h(h: int) -> int:
    return min(h & -h, 64)  # the largest power of two dividing h, at most 64


def _forward(x, w, y, vocab_size, scale, bt, bv, bh, num_warps, num_stages, interpret):
    t, h = x.shape
    rows = w.shape[0]
    nv = pl.cdiv(rows, bv)
    kernel = functools.partial(_forward_kernel, bv=bv, nv=nv, bh=bh, rows=rows, vocab_size=vocab_size, scale=scale)
    tok = pl.BlockSpec((bt,), lambda i: (i,))
    out = jax.ShapeDtypeStruct((t,), jnp.float32)
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        params["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(
        kernel, grid=(pl.cdiv(t, bt),),
        in_specs=[pl.BlockSpec((bt, h), lambda i: (i, 0)), pl.BlockSpec((rows, h), lambda i: (0, 0)), tok],
        out_specs=[tok, tok, tok], out_shape=[out, out, out], interpret=interpret, **params,
    )(x, w, y)


def _backward(x, w, y, lse, ent, g_lp, g_lse, g_ent, vocab_size, scale, *_tiles):
    return _chunked_backward(x, w, y, None, lse, ent, g_lp, g_lse, g_ent, vocab_size, scale, 512, 2048)


_stats = custom_vjp_stats(_forward, _backward)


def token_stats(hidden, weight, targets, *, vocab_size, scale, entropy, block_t=None, block_v=None,
                block_h=None, num_warps=8, num_stages=3, interpret=False) -> TokenStats:
    """Defaults: the fastest of 31 tile configurations timed on an H100 (`benchmarks/loss_gpu.py
    --sweep`, bf16, T = 8,192, V = 151,936): 64 tokens x 256 vocab rows x 64 hidden units, 8 warps,
    3 pipeline stages — 2.3x faster than 64 x 128 x 128 / 2 stages at H = 4,096 (26.9 vs 63.1 ms)."""
    t, h = hidden.shape
    bh = block_h or _block_h(h)
    if h % bh:
        raise ValueError(f"pallas_gpu: block_h {bh} does not divide the hidden size {h}")
    if not interpret and bh < 16:  # Triton's dot wants K >= 16
        raise NotImplementedError(f"pallas_gpu needs a hidden size divisible by 16, found {h}")
    bt = min(block_t or 64, t)
    bv = min(block_v or 256, weight.shape[0])
    if not interpret and (bt & (bt - 1) or bv & (bv - 1) or bh & (bh - 1)):
        raise NotImplementedError(f"pallas_gpu needs power-of-two tiles, found {bt} x {bv} x {bh}")
    return _stats(hidden, weight.astype(hidden.dtype), targets, bool(entropy),
                  (vocab_size, float(scale), bt, bv, bh, int(num_warps), int(num_stages), bool(interpret)))
