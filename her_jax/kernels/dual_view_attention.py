"""Attention under the dual-view visibility predicate (DESIGN.md §4).

Query i may attend key j iff `j <= i` (packed order) and `doc_j == doc_i` and
(`view_j == 0` or `view_j == view_i`).
This module holds the dense XLA reference; the flash kernels build on the same predicate.
"""

from __future__ import annotations

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
                    scale: float) -> jax.Array:
    """Softmax attention with grouped KV heads (no K/V repetition) and a dense boolean mask.

    q: [B, T, N, H]; k, v: [B, S, K, H] with N a multiple of K; mask: [B, T, S] -> [B, T, N, H].
    Scores and softmax in float32; the weights are cast to v's dtype before the value product.
    """
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask_bts[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh)
    return out.reshape(b, t, n, h)
