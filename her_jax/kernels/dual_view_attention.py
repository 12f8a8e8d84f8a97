"""Attention under the dual-view visibility predicate (DESIGN.md §4).

Query i may attend key j iff `j <= i` (packed order) and `doc_j == doc_i` and
(`view_j == 0` or `view_j == view_i`).
This module holds the dense XLA reference; the flash kernels build on the same predicate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def visibility_mask(q_idx, k_idx, q_doc, k_doc, q_view, k_view):
    """Boolean [B, T, S]: which key each query may see.

    q_idx: [T] or [B, T] packed index of each query; k_idx: [S] or [B, S];
    q_doc, q_view: [B, T] int32; k_doc, k_view: [B, S] int32.
    """
    q_idx = jnp.broadcast_to(q_idx, q_doc.shape)[:, :, None]
    k_idx = jnp.broadcast_to(k_idx, k_doc.shape)[:, None, :]
    k_view = k_view[:, None, :]
    return (k_idx <= q_idx) & (k_doc[:, None, :] == q_doc[:, :, None]) & (
        (k_view == 0) | (k_view == q_view[:, :, None]))


def dense_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_bts: jax.Array,
                    scale: float, kv_layout: str = "bskh") -> jax.Array:
    """Softmax attention with grouped KV heads (no K/V repetition) and a dense boolean mask.

    q: [B, T, N, H]; k, v: [B, S, K, H] with N a multiple of K (or [B, K, S, H] with
    kv_layout="bksh", the KV cache's layout); mask: [B, T, S] -> [B, T, N, H].
    Scores and softmax in float32; the weights are cast to v's dtype before the value product.
    """
    if kv_layout not in ("bskh", "bksh"):
        raise ValueError(f"kv_layout: expected 'bskh' or 'bksh', found {kv_layout!r}")
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2 if kv_layout == "bskh" else 1]
    kv = kv_layout
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    scores = jnp.einsum(f"btkgh,{kv}->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask_bts[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    # Heads-major product, then one transpose: asking the einsum for [B, T, K, G, H] directly makes
    # XLA:CPU pick a batched dot ~15x slower at decode shapes (T = 1).
    out = jnp.einsum(f"bkgts,{kv}->bkgth", probs, v_bskh)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, h)


# ------------------------------------------------------------------------------------------------
# Flash attention: Pallas TPU kernels behind a dispatcher, with a per-block skip table.

IMPLS = ("dense", "pallas_tpu")


def block_table(doc_ids, view_ids, positions, block: int, window=0):
    """int32 [B, n, n] for square blocks of `block` tokens: 0 = every pair hidden (skipped),
    1 = partial, 2 = every pair visible. Conservative: a block pair is only skipped when the
    predicate is false for all its pairs, judged from per-block ranges of doc, view and position."""
    b, t = doc_ids.shape
    n = t // block
    ranges = lambda a: (a.reshape(b, n, block).min(-1), a.reshape(b, n, block).max(-1))
    (dmin, dmax), (vmin, vmax), (pmin, pmax) = ranges(doc_ids), ranges(view_ids), ranges(positions)
    q, k = (lambda a: a[:, :, None]), (lambda a: a[:, None, :])
    blocks = jnp.arange(n)
    causal_hidden = (blocks[None, :] > blocks[:, None])[None]  # kv block entirely after the q block
    causal_full = (blocks[None, :] < blocks[:, None])[None]  # kv block entirely before it
    docs_apart = (q(dmax) < k(dmin)) | (k(dmax) < q(dmin))
    private_kv = (k(vmin) > 0) & (k(vmin) == k(vmax))  # one private view in the kv block ...
    view_absent = (k(vmin) < q(vmin)) | (k(vmin) > q(vmax))  # ... that no query of the q block has
    window = jnp.asarray(window, jnp.int32)
    out_of_window = (window > 0) & (q(pmin) - k(pmax) >= window)
    hidden = causal_hidden | docs_apart | (private_kv & view_absent) | out_of_window
    one_doc = (q(dmin) == q(dmax)) & (k(dmin) == k(dmax)) & (q(dmin) == k(dmin))
    full = causal_full & one_doc & (k(vmax) == 0) & ((window <= 0) | (q(pmax) - k(pmin) < window))
    return jnp.where(hidden, 0, jnp.where(full, 2, 1)).astype(jnp.int32)


def _block_size(t: int, block: int) -> int:
    return block if t > block else -(-t // 8) * 8


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _flash(q, k, v, q_meta, kv_meta, table, window, scale, block, interpret):
    from her_jax.kernels import _attention_pallas_tpu as kernel

    return kernel.forward(q, k, v, q_meta, kv_meta, table, window, scale, block, block, interpret)[0]


def _flash_fwd(q, k, v, q_meta, kv_meta, table, window, scale, block, interpret):
    from her_jax.kernels import _attention_pallas_tpu as kernel

    o, lse = kernel.forward(q, k, v, q_meta, kv_meta, table, window, scale, block, block, interpret)
    return o, (q, k, v, q_meta, kv_meta, table, window, o, lse)


def _flash_bwd(scale, block, interpret, res, do):
    from her_jax.kernels import _attention_pallas_tpu as kernel

    q, k, v, q_meta, kv_meta, table, window, o, lse = res
    dq, dk, dv = kernel.backward(q, k, v, q_meta, kv_meta, table, window, scale, block, block, interpret, o, lse, do)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_btnh, k_bskh, v_bskh, doc_ids, view_ids, positions, *, scale: float, window=0,
                    block: int = 512, interpret: bool = False) -> jax.Array:
    """Self-attention of a packed row under the dual-view predicate, [B, T, N, H] -> [B, T, N, H].

    doc_ids, view_ids, positions: [B, T] int32; window: int scalar (0 = unlimited; may be traced).
    T is padded to a multiple of the block internally (padding forms its own document).
    """
    b, t, n, h = q_btnh.shape
    nkv = k_bskh.shape[2]
    blk = _block_size(t, block)
    pad = -t % blk
    if pad:
        pad_tokens = lambda a: jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))
        q_btnh, k_bskh, v_bskh = pad_tokens(q_btnh), pad_tokens(k_bskh), pad_tokens(v_bskh)
        doc_ids = jnp.pad(doc_ids, ((0, 0), (0, pad)), constant_values=-1)
        view_ids, positions = (jnp.pad(a, ((0, 0), (0, pad))) for a in (view_ids, positions))
    tp = t + pad
    q = q_btnh.reshape(b, tp, nkv, n // nkv, h).transpose(0, 2, 3, 1, 4)
    k, v = (a.transpose(0, 2, 1, 3) for a in (k_bskh, v_bskh))
    meta = jnp.stack([doc_ids, view_ids, positions], axis=-1).astype(jnp.int32)  # [B, T, 3]
    table = block_table(doc_ids, view_ids, positions, blk, window)
    window = jnp.reshape(jnp.asarray(window, jnp.int32), (1,))
    o = _flash(q, k, v, meta, meta.transpose(0, 2, 1), table, window, float(scale), blk, bool(interpret))
    return o.transpose(0, 3, 1, 2, 4).reshape(b, tp, n, h)[:, :t]
