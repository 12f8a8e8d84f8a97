"""Pallas TPU (Mosaic) kernels for `token_stats` (see dual_layer_loss.py for the contract).

Forward: grid (token blocks "parallel", vocab blocks "arbitrary"); the running max, sum of
exponentials, target logit and sum of p*z live in VMEM scratch across the vocab sweep; the target
is found with an iota compare (no gather). Backward: two kernels that each recompute the logits
tile — dX with the token block resident (vocab sweep), dW with the vocab block resident (token
sweep), each accumulating in f32 VMEM and writing once. Ragged edges: blocks past the end of an
array hold garbage (NaN in interpret mode), so invalid rows are zeroed before every product and
columns at or past `vocab_size` are masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from her_jax.kernels.dual_layer_loss import _NEG, TokenStats, custom_vjp_stats

VMEM_LIMIT = 48 * 2**20  # v5e/v6e: 128 MiB per core, v5p: 64 MiB; leave room for Mosaic's own use
_VMEM_BUDGET = 40 * 2**20


def _vmem_bytes(bt: int, bv: int, h: int, itemsize: int) -> int:
    """VMEM of the hungriest kernel (dW): double-buffered x and w input tiles, the f32 [bv, h]
    accumulator, the double-buffered [bv, h] output tile and ~4 f32 [bt, bv] temporaries."""
    return 2 * (bt + bv) * h * itemsize + bv * h * (4 + 2 * itemsize) + 16 * bt * bv


def _blocks(t: int, v: int, h: int, itemsize: int, block_t, block_v) -> tuple[int, int]:
    """Token and vocab tiles: multiples of 128 that fit the VMEM budget (or the full dimension)."""
    bt = block_t or 256
    bv = block_v
    if bv is None:
        bv = 2048
        while bv > 128 and _vmem_bytes(bt, bv, h, itemsize) > _VMEM_BUDGET:
            bv //= 2
    bt = t if t <= bt else bt
    bv = v if v <= bv else bv
    return bt, bv


def _params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT)


def _logits(x, w, j, bv, vocab_size, scale, y=None):
    z = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    col = j * bv + jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)
    valid = col < vocab_size
    return z, valid, None if y is None else valid & (col == y)


def _forward_kernel(x_ref, w_ref, y_ref, lp_ref, lse_ref, ent_ref, m_ref, l_ref, t_ref, s_ref, *, bv, nv,
                    vocab_size, scale):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        t_ref[...] = jnp.zeros(t_ref.shape, jnp.float32)
        s_ref[...] = jnp.zeros(s_ref.shape, jnp.float32)

    z, valid, hit = _logits(x_ref[...], w_ref[...], j, bv, vocab_size, scale, y_ref[...])
    z = jnp.where(valid, z, _NEG)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(z, axis=1, keepdims=True))
    e = jnp.where(valid, jnp.exp(z - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(e, axis=1, keepdims=True)
    s_ref[...] = alpha * s_ref[...] + jnp.sum(jnp.where(valid, e * z, 0.0), axis=1, keepdims=True)
    t_ref[...] = t_ref[...] + jnp.sum(jnp.where(hit, z, 0.0), axis=1, keepdims=True)
    m_ref[...] = m_new

    @pl.when(j == nv - 1)
    def _():
        lse = m_ref[...] + jnp.log(l_ref[...])
        lse_ref[...] = lse
        lp_ref[...] = t_ref[...] - lse
        ent_ref[...] = lse - s_ref[...] / l_ref[...]


def _cost(x, w, matmuls: int) -> pl.CostEstimate:
    """`matmuls` [T, H] x [H, V] products, one exp per logit, x and w read once."""
    t, h = x.shape
    return pl.CostEstimate(flops=2 * matmuls * t * h * w.shape[0], transcendentals=t * w.shape[0],
                           bytes_accessed=x.size * x.dtype.itemsize + w.size * w.dtype.itemsize + 16 * t)


def _forward(x, w, y, vocab_size, scale, bt, bv, interpret):
    t, h = x.shape
    nt, nv = pl.cdiv(t, bt), pl.cdiv(w.shape[0], bv)
    col = jax.ShapeDtypeStruct((t, 1), jnp.float32)
    kernel = functools.partial(_forward_kernel, bv=bv, nv=nv, vocab_size=vocab_size, scale=scale)
    tok = pl.BlockSpec((bt, 1), lambda i, j: (i, 0))
    lp, lse, ent = pl.pallas_call(
        kernel,
        grid=(nt, nv),
        in_specs=[pl.BlockSpec((bt, h), lambda i, j: (i, 0)), pl.BlockSpec((bv, h), lambda i, j: (j, 0)), tok],
        out_specs=[tok, tok, tok],
        out_shape=[col, col, col],
        scratch_shapes=[pltpu.VMEM((bt, 1), jnp.float32) for _ in range(4)],
        compiler_params=_params(("parallel", "arbitrary")),
        cost_estimate=_cost(x, w, 1),
        interpret=interpret,
    )(x, w, y[:, None])
    return lp[:, 0], lse[:, 0], ent[:, 0]


def _dz(z, valid, hit, stats_ref, scale):
    """d(objective)/d(logits tile) from the per-token stats [lse, entropy, g_logprob, g_lse, g_entropy]."""
    st = stats_ref[...]
    lse, ent, glp, glse, gent = (st[:, k:k + 1] for k in range(5))
    p = jnp.where(valid, jnp.exp(z - lse), 0.0)
    dz = jnp.where(hit, glp, 0.0) + p * (glse - glp - gent * (z - lse + ent))
    return dz * scale


def _dx_kernel(x_ref, w_ref, y_ref, st_ref, dx_ref, acc_ref, *, bv, nv, rows, vocab_size, scale):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    w = w_ref[...]
    row = j * bv + jax.lax.broadcasted_iota(jnp.int32, (w.shape[0], 1), 0)
    w = jnp.where(row < rows, w, jnp.zeros_like(w))  # rows past the array end hold garbage
    x = x_ref[...]
    z, valid, hit = _logits(x, w, j, bv, vocab_size, scale, y_ref[...])
    dz = _dz(z, valid, hit, st_ref, scale).astype(x.dtype)
    acc_ref[...] += jax.lax.dot_general(dz, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    @pl.when(j == nv - 1)
    def _():
        dx_ref[...] = acc_ref[...].astype(dx_ref.dtype)


def _dw_kernel(w_ref, x_ref, y_ref, st_ref, dw_ref, acc_ref, *, bt, bv, nt, tokens, vocab_size, scale):
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    x = x_ref[...]
    row = i * bt + jax.lax.broadcasted_iota(jnp.int32, (x.shape[0], 1), 0)
    x = jnp.where(row < tokens, x, jnp.zeros_like(x))  # token rows past the end hold garbage
    z, valid, hit = _logits(x, w_ref[...], j, bv, vocab_size, scale, y_ref[...])
    dz = jnp.where(row < tokens, _dz(z, valid, hit, st_ref, scale), 0.0).astype(x.dtype)
    acc_ref[...] += jax.lax.dot_general(dz, x, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    @pl.when(i == nt - 1)
    def _():
        dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)


def _backward(x, w, y, stats, vocab_size, scale, bt, bv, interpret):
    t, h = x.shape
    rows = w.shape[0]
    nt, nv = pl.cdiv(t, bt), pl.cdiv(rows, bv)
    y2 = y[:, None]
    dx = pl.pallas_call(
        functools.partial(_dx_kernel, bv=bv, nv=nv, rows=rows, vocab_size=vocab_size, scale=scale),
        grid=(nt, nv),
        in_specs=[pl.BlockSpec((bt, h), lambda i, j: (i, 0)), pl.BlockSpec((bv, h), lambda i, j: (j, 0)),
                  pl.BlockSpec((bt, 1), lambda i, j: (i, 0)), pl.BlockSpec((bt, 5), lambda i, j: (i, 0))],
        out_specs=pl.BlockSpec((bt, h), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        scratch_shapes=[pltpu.VMEM((bt, h), jnp.float32)],
        compiler_params=_params(("parallel", "arbitrary")),
        cost_estimate=_cost(x, w, 2),
        interpret=interpret,
    )(x, w, y2, stats)
    dw = pl.pallas_call(
        functools.partial(_dw_kernel, bt=bt, bv=bv, nt=nt, tokens=t, vocab_size=vocab_size, scale=scale),
        grid=(nv, nt),
        in_specs=[pl.BlockSpec((bv, h), lambda j, i: (j, 0)), pl.BlockSpec((bt, h), lambda j, i: (i, 0)),
                  pl.BlockSpec((bt, 1), lambda j, i: (i, 0)), pl.BlockSpec((bt, 5), lambda j, i: (i, 0))],
        out_specs=pl.BlockSpec((bv, h), lambda j, i: (j, 0)),
        out_shape=jax.ShapeDtypeStruct(w.shape, w.dtype),
        scratch_shapes=[pltpu.VMEM((bv, h), jnp.float32)],
        compiler_params=_params(("parallel", "arbitrary")),
        cost_estimate=_cost(x, w, 2),
        interpret=interpret,
    )(w, x, y2, stats)
    return dx, dw


def _backward_from_stats(x, w, y, lse, ent, g_lp, g_lse, g_ent, vocab_size, scale, bt, bv, interpret):
    stats = jnp.stack([lse, ent, g_lp, g_lse, g_ent], axis=1).astype(jnp.float32)
    return _backward(x, w, y, stats, vocab_size, scale, bt, bv, interpret)


_stats = custom_vjp_stats(_forward, _backward_from_stats)


def token_stats(hidden, weight, targets, *, vocab_size, scale, entropy, block_t=None, block_v=None,
                interpret=False) -> TokenStats:
    if jnp.dtype(hidden.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise NotImplementedError(f"pallas_tpu takes float32 or bfloat16 inputs, not {hidden.dtype}")
    bt, bv = _blocks(hidden.shape[0], weight.shape[0], hidden.shape[1], jnp.dtype(hidden.dtype).itemsize,
                     block_t, block_v)
    weight = weight.astype(hidden.dtype)  # no-op when the head already has the compute dtype
    return _stats(hidden, weight, targets, bool(entropy), (vocab_size, float(scale), bt, bv, bool(interpret)))

