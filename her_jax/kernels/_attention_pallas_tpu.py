"""Pallas TPU flash attention under the dual-view visibility predicate (KERNELS.md §2).

Layout inside the kernels: q [B, K, G, T, D] (the G query heads of kv head k together, so K/V are
never repeated), k and v [B, K, S, D], per-token metadata q_meta [B, T, 3] and kv_meta [B, 3, S]
holding (doc, view, position). A scalar-prefetched table [B, nq, nk] marks each (q block, kv block)
pair 0 = fully hidden (skipped: no compute), 1 = partial, 2 = fully visible. Forward keeps the
running max / sum / accumulator in VMEM across the kv sweep; the backward is two kernels (dQ over
kv blocks, dK/dV over q blocks) that recompute the probabilities from the saved log-sum-exp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)
VMEM_LIMIT = 48 * 2**20
SQ = pl.squeezed


def _mask(qm, km, i, j, bq, bk, window):
    """[bq, bk] visibility from q metadata (bq, 3) and kv metadata (3, bk)."""
    q_idx = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_idx = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    q_doc, q_view, q_pos = qm[:, 0:1], qm[:, 1:2], qm[:, 2:3]
    k_doc, k_view, k_pos = km[0:1, :], km[1:2, :], km[2:3, :]
    visible = (k_idx <= q_idx) & (k_doc == q_doc) & ((k_view == 0) | (k_view == q_view))
    return visible & ((window <= 0) | (q_pos - k_pos < window))


def _scores(q_ref, k_ref, qm_ref, km_ref, i, j, bq, bk, window, scale):
    """Masked scores (G*bq, bk) f32 and the mask broadcast to it."""
    g, _, d = q_ref.shape
    q = q_ref[...].reshape(g * bq, d)
    s = jax.lax.dot_general(q, k_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    mask = _mask(qm_ref[...], km_ref[...], i, j, bq, bk, window)
    mask = jnp.broadcast_to(mask[None], (g, bq, bk)).reshape(g * bq, bk)
    return jnp.where(mask, s, _NEG), mask, q


def _fwd_kernel(table_ref, window_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref,
                *, bq, bk, nk, scale):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(table_ref[b, i, j] != 0)
    def _():
        s, mask, _ = _scores(q_ref, k_ref, qm_ref, km_ref, i, j, bq, bk, window_ref[0], scale)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_ref[...] = alpha * acc_ref[...] + jax.lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        m_ref[...] = m_new

    @pl.when(j == nk - 1)
    def _():
        g, _, d = o_ref.shape
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / l).reshape(g, bq, d).astype(o_ref.dtype)
        lse_ref[...] = (m_ref[...] + jnp.log(l)).reshape(g, bq, 1)


def _specs(g, bq, bk, d, kv_outer=False):
    """BlockSpecs for q-like [B, K, G, T, *], kv-like [B, K, S, D] and the two metadata arrays,
    for a grid (b, kv head, q block, kv block) — or (b, kv head, kv block, q block) when kv_outer."""
    def ij(fn):
        return (lambda b, h, a, c, *_: fn(b, h, c, a)) if kv_outer else (lambda b, h, a, c, *_: fn(b, h, a, c))

    q_like = lambda last: pl.BlockSpec((SQ, SQ, g, bq, last), ij(lambda b, h, i, j: (b, h, 0, i, 0)))
    kv = pl.BlockSpec((SQ, SQ, bk, d), ij(lambda b, h, i, j: (b, h, j, 0)))
    qm = pl.BlockSpec((SQ, bq, 3), ij(lambda b, h, i, j: (b, i, 0)))
    km = pl.BlockSpec((SQ, 3, bk), ij(lambda b, h, i, j: (b, 0, j)))
    return q_like, kv, qm, km


def _cost(q, k, matmuls: int, arrays) -> pl.CostEstimate:
    """What XLA's scheduler and cost analysis should assume of a kernel: `matmuls` [T, S] x D
    products per head over the causal half of the block pairs (dual-view rows skip more, so this
    bounds the real work from above), one exp per score, and every array read or written once."""
    bsz, nkv, g, t, d = q.shape
    scores = bsz * nkv * g * t * k.shape[2] // 2
    return pl.CostEstimate(flops=2 * matmuls * scores * d, transcendentals=scores,
                           bytes_accessed=sum(a.size * a.dtype.itemsize for a in arrays))


def _params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT)


def forward(q, k, v, q_meta, kv_meta, table, window, scale, bq, bk, interpret):
    bsz, nkv, g, t, d = q.shape
    nq, nk = t // bq, k.shape[2] // bk
    q_like, kv, qm, km = _specs(g, bq, bk, d)
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(bsz, nkv, nq, nk),
        in_specs=[smem, q_like(d), kv, kv, qm, km],
        out_specs=[q_like(d), q_like(1)],
        scratch_shapes=[pltpu.VMEM((g * bq, 1), jnp.float32), pltpu.VMEM((g * bq, 1), jnp.float32),
                        pltpu.VMEM((g * bq, d), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_fwd_kernel, bq=bq, bk=bk, nk=nk, scale=scale),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((*q.shape[:4], 1), jnp.float32)],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(q, k, 2, (q, k, v, q)),
        interpret=interpret,
    )(table, window, q, k, v, q_meta, kv_meta)


def _probs(q_ref, k_ref, qm_ref, km_ref, lse_ref, i, j, bq, bk, window, scale):
    s, mask, q = _scores(q_ref, k_ref, qm_ref, km_ref, i, j, bq, bk, window, scale)
    g = q_ref.shape[0]
    p = jnp.where(mask, jnp.exp(s - lse_ref[...].reshape(g * bq, 1)), 0.0)
    return p, q


def _dq_kernel(table_ref, window_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, lse_ref, do_ref, delta_ref, dq_ref,
               acc_ref, *, bq, bk, nk, scale):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(table_ref[b, i, j] != 0)
    def _():
        g, _, d = q_ref.shape
        p, _ = _probs(q_ref, k_ref, qm_ref, km_ref, lse_ref, i, j, bq, bk, window_ref[0], scale)
        do = do_ref[...].reshape(g * bq, d)
        v, k = v_ref[...], k_ref[...]
        dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = (p * (dp - delta_ref[...].reshape(g * bq, 1)) * scale).astype(k.dtype)
        acc_ref[...] += jax.lax.dot_general(ds, k, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    @pl.when(j == nk - 1)
    def _():
        g, _, d = dq_ref.shape
        dq_ref[...] = acc_ref[...].reshape(g, bq, d).astype(dq_ref.dtype)


def _dkv_kernel(table_ref, window_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, lse_ref, do_ref, delta_ref, dk_ref,
                dv_ref, dk_acc, dv_acc, *, bq, bk, nq, scale):
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(table_ref[b, i, j] != 0)
    def _():
        g, _, d = q_ref.shape
        p, q = _probs(q_ref, k_ref, qm_ref, km_ref, lse_ref, i, j, bq, bk, window_ref[0], scale)
        do = do_ref[...].reshape(g * bq, d)
        v = v_ref[...]
        dv_acc[...] += jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = (p * (dp - delta_ref[...].reshape(g * bq, 1)) * scale).astype(q.dtype)
        dk_acc[...] += jax.lax.dot_general(ds, q, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    @pl.when(i == nq - 1)
    def _():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def backward(q, k, v, q_meta, kv_meta, table, window, scale, bq, bk, interpret, o, lse, do):
    bsz, nkv, g, t, d = q.shape
    nq, nk = t // bq, k.shape[2] // bk
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    q_like, kv, qm, km = _specs(g, bq, bk, d)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, bq=bq, bk=bk, nk=nk, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(bsz, nkv, nq, nk),
            in_specs=[smem, q_like(d), kv, kv, qm, km, q_like(1), q_like(d), q_like(1)],
            out_specs=q_like(d), scratch_shapes=[pltpu.VMEM((g * bq, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(q, k, 3, (q, k, v, do, q)),
        interpret=interpret,
    )(table, window, q, k, v, q_meta, kv_meta, lse, do, delta)
    q_like, kv, qm, km = _specs(g, bq, bk, d, kv_outer=True)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, bq=bq, bk=bk, nq=nq, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(bsz, nkv, nk, nq),
            in_specs=[smem, q_like(d), kv, kv, qm, km, q_like(1), q_like(d), q_like(1)],
            out_specs=[kv, kv], scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(q, k, 4, (q, k, v, do, k, v)),
        interpret=interpret,
    )(table, window, q, k, v, q_meta, kv_meta, lse, do, delta)
    return dq, dk, dv
