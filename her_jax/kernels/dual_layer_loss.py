"""Fused LM head + cross-entropy with per-layer weights (KERNELS.md §1).

`token_stats(hidden[T, H], weight[V, H], targets[T])` gives, per token, the log-prob of its target,
the log-sum-exp and (optionally) the entropy of `softmax(hidden @ weight.T / temperature)` without
materialising the [T, V] logits: tiles of the vocabulary (and of the tokens) are streamed with an
online log-sum-exp, and the backward recomputes each tile (custom VJP). The weight stays in the
HF/embedding layout [V, H]; rows at or beyond `vocab_size` (padding) are masked.

Implementations behind one dispatcher:
- `reference`    full logits in plain JAX (the test oracle; run it in float64);
- `xla_chunked`  scans over token and vocab tiles, custom VJP (the portable fallback);
- `pallas_tpu`   Mosaic kernels (forward, and a split dX / dW backward);
- `pallas_gpu`   a Pallas forward for GPUs, backward through `xla_chunked`.
`impl="auto"` picks per backend and falls back (with a one-time warning) when a kernel cannot be
built, also on VMEM/shared-memory exhaustion at compile time.

`dual_layer_loss` builds the SFT loss on top: a (sum, weight) pair, per-layer NLL sums and token
counts, optional z-loss and label smoothing.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

IMPLS = ("reference", "xla_chunked", "pallas_tpu", "pallas_gpu")
_NEG = -1e30  # finite "minus infinity" for masked logits (exp underflows to exactly 0)


class TokenStats(NamedTuple):
    logprob: jax.Array  # [T] f32, log p(target)
    lse: jax.Array  # [T] f32, log-sum-exp of the (temperature-scaled) logits
    entropy: jax.Array | None  # [T] f32, Shannon entropy in nats (when asked for)


# ------------------------------------------------------------------------------------------------
# reference

def reference_token_stats(hidden, weight, targets, *, vocab_size=None, temperature=1.0, entropy=False,
                          mean_logit=False):
    """Full logits in the inputs' dtype promoted to float32 (float64 when x64 is on and inputs are f64)."""
    vocab_size = vocab_size or weight.shape[0]
    dtype = jnp.promote_types(hidden.dtype, jnp.float32)
    z = jnp.einsum("th,vh->tv", hidden.astype(dtype), weight[:vocab_size].astype(dtype)) / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    logprob = jnp.take_along_axis(z, targets[:, None].astype(jnp.int32), axis=-1)[:, 0] - lse
    out = TokenStats(logprob, lse, None)
    if entropy:
        p = jnp.exp(z - lse[:, None])
        out = out._replace(entropy=lse - jnp.sum(p * z, axis=-1))
    if mean_logit:
        return out, jnp.mean(z, axis=-1)
    return out


# ------------------------------------------------------------------------------------------------
# xla_chunked: token tiles x vocab tiles, online log-sum-exp, custom VJP

def _tiles(n: int, block: int) -> tuple[int, int]:
    """(block, number of tiles). A divisor of n within [block/2, block] is preferred, so the tiles
    partition n; otherwise the last tile is shifted back to end at n (callers mask the overlap)."""
    block = min(block, n)
    for b in range(block, max(block // 2, 1) - 1, -1):
        if n % b == 0:
            return b, n // b
    return block, -(-n // block)


def _start(i, block: int, n: int):
    return jnp.minimum(i * block, n - block)


def _slice(a, start, size):
    """A tile of `a` along axis 0. 16-bit floats are sliced as uint16 bit patterns: XLA:CPU otherwise
    widens the whole loop-invariant array to float32 before slicing (a W-sized copy); the bitcasts
    are free on every backend."""
    if a.dtype.itemsize == 2 and jnp.issubdtype(a.dtype, jnp.floating):
        bits = jax.lax.bitcast_convert_type(a, jnp.uint16)
        return jax.lax.bitcast_convert_type(jax.lax.dynamic_slice_in_dim(bits, start, size), a.dtype)
    return jax.lax.dynamic_slice_in_dim(a, start, size)


def _logits_tile(x, w, v0, j, bv, vocab_size, scale):
    """Scaled f32 logits of a token tile against vocab tile j (starting at row v0), and the mask of
    columns that are real vocabulary and not already covered by an earlier (overlapping) tile."""
    z = jnp.einsum("th,vh->tv", x, w.astype(x.dtype), preferred_element_type=jnp.float32) * scale
    col = v0 + jnp.arange(w.shape[0])
    fresh = (col >= j * bv) & (col < vocab_size)
    return z, col, fresh


def _active_tiles(active, bt: int, nt: int):
    """Token tiles holding the first `active` rows (all tiles when active is None)."""
    if active is None:
        return nt
    return jnp.clip((active + bt - 1) // bt, 0, nt)


def _chunked_forward(hidden, weight, targets, active, vocab_size, scale, want_entropy, bt, bv):
    t, _ = hidden.shape
    bt, nt = _tiles(t, bt)
    bv, nv = _tiles(weight.shape[0], bv)

    def token_tile(i):
        t0 = _start(i, bt, t)
        x = _slice(hidden, t0, bt)
        y = jax.lax.dynamic_slice_in_dim(targets, t0, bt)

        def vocab_tile(carry, j):
            m, l, tgt, s = carry
            v0 = _start(j, bv, weight.shape[0])
            z, col, fresh = _logits_tile(x, _slice(weight, v0, bv), v0, j, bv, vocab_size, scale)
            z = jnp.where(fresh, z, _NEG)
            m_new = jnp.maximum(m, z.max(axis=1))
            alpha = jnp.exp(m - m_new)
            e = jnp.where(fresh, jnp.exp(z - m_new[:, None]), 0.0)
            l = alpha * l + e.sum(axis=1)
            s = alpha * s + jnp.sum(jnp.where(fresh, e * z, 0.0), axis=1)
            tgt = tgt + jnp.sum(jnp.where(fresh & (col == y[:, None]), z, 0.0), axis=1)
            return (m_new, l, tgt, s), None

        init = (jnp.full((bt,), _NEG, jnp.float32), jnp.zeros((bt,), jnp.float32), jnp.zeros((bt,), jnp.float32),
                jnp.zeros((bt,), jnp.float32))
        (m, l, tgt, s), _ = jax.lax.scan(vocab_tile, init, jnp.arange(nv))
        lse = m + jnp.log(l)
        return tgt - lse, lse, lse - s / l

    if nt == 1:
        logprob, lse, ent = token_tile(0)
    else:
        def body(i, outs):
            t0 = _start(i, bt, t)
            return tuple(jax.lax.dynamic_update_slice_in_dim(o, v, t0, 0) for o, v in zip(outs, token_tile(i)))

        zeros = jnp.zeros((t,), jnp.float32)
        logprob, lse, ent = jax.lax.fori_loop(0, _active_tiles(active, bt, nt), body, (zeros, zeros, zeros))
    return TokenStats(logprob, lse, ent if want_entropy else None)


def _chunked_backward(hidden, weight, targets, active, lse, ent, g_lp, g_lse, g_ent, vocab_size, scale, bt, bv):
    """Vocab tiles outside, token tiles inside: each dW tile is accumulated in f32 and written once in
    the weight's dtype; dX (much smaller than W for T << V) accumulates in f32 across vocab tiles."""
    t, h = hidden.shape
    v_rows = weight.shape[0]
    bt, nt = _tiles(t, bt)
    bv, nv = _tiles(v_rows, bv)
    gemm_dtype = hidden.dtype
    stats = jnp.stack([lse, ent, g_lp, g_lse, g_ent], axis=1)  # [T, 5]

    def vocab_tile(carry, j):
        dx, dw = carry
        v0 = _start(j, bv, v_rows)
        w = _slice(weight, v0, bv)

        def token_tile(i, inner):
            dx, dw_tile = inner
            t0 = _start(i, bt, t)
            x = _slice(hidden, t0, bt)
            y = jax.lax.dynamic_slice_in_dim(targets, t0, bt)
            lse_i, ent_i, glp, glse, gent = jnp.split(jax.lax.dynamic_slice_in_dim(stats, t0, bt), 5, axis=1)
            z, col, fresh = _logits_tile(x, w, v0, j, bv, vocab_size, scale)
            p = jnp.where(fresh, jnp.exp(z - lse_i), 0.0)
            dz = glp * jnp.where(fresh & (col == y[:, None]), 1.0, 0.0) + p * (glse - glp - gent * (z - lse_i + ent_i))
            rows_fresh = (t0 + jnp.arange(bt)) >= i * bt  # an overlapping last token tile counts rows once
            dz = (jnp.where(rows_fresh[:, None], dz, 0.0) * scale).astype(gemm_dtype)
            dx_tile = jnp.einsum("tv,vh->th", dz, w.astype(gemm_dtype), preferred_element_type=jnp.float32)
            dx = jax.lax.dynamic_update_slice_in_dim(dx, jax.lax.dynamic_slice_in_dim(dx, t0, bt) + dx_tile, t0, 0)
            dw_tile = dw_tile + jnp.einsum("tv,th->vh", dz, x, preferred_element_type=jnp.float32)
            return dx, dw_tile

        dx, dw_tile = jax.lax.fori_loop(0, _active_tiles(active, bt, nt), token_tile,
                                        (dx, jnp.zeros((bv, h), jnp.float32)))
        if dw is None:
            return (dx, dw_tile.astype(weight.dtype)), None
        # Rows an earlier (overlapping) vocab tile already wrote keep their value.
        fresh_rows = (v0 + jnp.arange(bv))[:, None] >= j * bv
        old = jax.lax.dynamic_slice_in_dim(dw, v0, bv)
        dw = jax.lax.dynamic_update_slice_in_dim(dw, jnp.where(fresh_rows, dw_tile.astype(dw.dtype), old), v0, 0)
        return (dx, dw), None

    if v_rows % bv == 0:  # tiles partition the rows: emit them as scan outputs, reshaped in place
        def emit(dx, j):
            (dx, dw_tile), _ = vocab_tile((dx, None), j)
            return dx, dw_tile

        dx, tiles = jax.lax.scan(emit, jnp.zeros((t, h), jnp.float32), jnp.arange(nv))
        return dx.astype(hidden.dtype), tiles.reshape(weight.shape)
    init = (jnp.zeros((t, h), jnp.float32), jnp.zeros(weight.shape, weight.dtype))
    (dx, dw), _ = jax.lax.scan(vocab_tile, init, jnp.arange(nv))
    return dx.astype(hidden.dtype), dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _xla_chunked(hidden, weight, targets, active, vocab_size, scale, want_entropy, bt, bv):
    return _chunked_forward(hidden, weight, targets, active, vocab_size, scale, want_entropy, bt, bv)


def _xla_chunked_fwd(hidden, weight, targets, active, vocab_size, scale, want_entropy, bt, bv):
    out = _chunked_forward(hidden, weight, targets, active, vocab_size, scale, True, bt, bv)
    kept = out if want_entropy else out._replace(entropy=None)
    return kept, (hidden, weight, targets, active, out.lse, out.entropy)


def _xla_chunked_bwd(vocab_size, scale, want_entropy, bt, bv, res, g):
    hidden, weight, targets, active, lse, ent = res
    g_ent = g.entropy if want_entropy else jnp.zeros_like(lse)
    dx, dw = _chunked_backward(hidden, weight, targets, active, lse, ent, g.logprob, g.lse, g_ent, vocab_size,
                               scale, bt, bv)
    return dx, dw, None, None


_xla_chunked.defvjp(_xla_chunked_fwd, _xla_chunked_bwd)


def custom_vjp_stats(forward, backward):
    """A `TokenStats` function with a custom VJP, for kernels written as
    forward(x, w, y, *static) -> (logprob, lse, entropy) and
    backward(x, w, y, lse, entropy, g_logprob, g_lse, g_entropy, *static) -> (dx, dw);
    call it as f(x, w, y, want_entropy, static_tuple)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
    def stats(x, w, y, want_entropy, static):
        lp, lse, ent = forward(x, w, y, *static)
        return TokenStats(lp, lse, ent if want_entropy else None)

    def fwd(x, w, y, want_entropy, static):
        lp, lse, ent = forward(x, w, y, *static)
        return TokenStats(lp, lse, ent if want_entropy else None), (x, w, y, lse, ent)

    def bwd(want_entropy, static, res, g):
        x, w, y, lse, ent = res
        g_ent = g.entropy if want_entropy else jnp.zeros_like(lse)
        return (*backward(x, w, y, lse, ent, g.logprob, g.lse, g_ent, *static), None)

    stats.defvjp(fwd, bwd)
    return stats


# ------------------------------------------------------------------------------------------------
# dispatcher

_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)


class _CompileFailure(RuntimeError):
    """A kernel that the backend compiler rejects for these shapes (e.g. VMEM / shared memory exhausted)."""


def _kernel_module(impl: str):
    if impl == "pallas_tpu":
        from her_jax.kernels import _loss_pallas_tpu as kernel
    else:
        from her_jax.kernels import _loss_pallas_gpu as kernel
    return kernel


_compiles: dict = {}


def _check_compiles(impl, hidden, weight, targets, kw) -> None:
    """Compile the kernel (forward and backward) once per shape on the running backend, so that a
    compile-time failure — VMEM or shared-memory exhaustion above all — becomes a fallback rather
    than a failed training step."""
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    key = (impl, spec(hidden), spec(weight), spec(targets), tuple(sorted(kw.items())))
    if key not in _compiles:
        kernel = _kernel_module(impl)
        loss = lambda h, w, y: jnp.sum(kernel.token_stats(h, w, y, **kw).logprob)
        try:
            jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*key[1:4]).compile()
            _compiles[key] = None
        except Exception as e:  # noqa: BLE001 - any compiler error means: do not use this kernel here
            _compiles[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    if _compiles[key] is not None:
        raise _CompileFailure(_compiles[key])


def default_impl() -> str:
    backend = jax.default_backend()
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu"}.get(
        backend, "xla_chunked")


def token_stats(hidden, weight, targets, *, vocab_size: int | None = None, temperature: float = 1.0,
                entropy: bool = False, impl: str = "auto", block_t: int | None = None,
                block_v: int | None = None, interpret: bool = False, active_rows=None) -> TokenStats:
    """Per-token log-prob of `targets`, log-sum-exp and (optionally) entropy of
    softmax(hidden @ weight[:vocab_size].T / temperature), never materialising the logits.

    hidden: [T, H] bf16/f32; weight: [V_rows, H] (HF layout; rows >= vocab_size are padding);
    targets: [T] int32 in [0, vocab_size). Outputs are float32 [T]. Differentiable in hidden and
    weight (custom VJP); wrap in `jax.lax.stop_gradient` for forward-only use (RL old-policy and
    reference log-probs): no residuals are kept then. active_rows: an int (may be traced) such that
    only rows [0, active_rows) matter; `xla_chunked` then skips the token tiles past it (their
    outputs are 0), the other implementations compute every row.
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"token_stats: expected hidden [T, H] and weight [V, H], found {hidden.shape} and "
                         f"{weight.shape}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"token_stats: targets should be [T]={hidden.shape[:1]}, found {targets.shape}")
    vocab_size = int(vocab_size or weight.shape[0])
    if not 0 < vocab_size <= weight.shape[0]:
        raise ValueError(f"token_stats: vocab_size {vocab_size} outside (0, {weight.shape[0]}]")
    if temperature <= 0:
        raise ValueError(f"token_stats: temperature must be > 0, found {temperature}")
    impl = default_impl() if impl == "auto" else impl
    if impl not in IMPLS:
        raise ValueError(f"token_stats: impl {impl!r} not in {IMPLS}")
    targets = targets.astype(jnp.int32)
    if impl == "reference":
        return reference_token_stats(hidden, weight, targets, vocab_size=vocab_size, temperature=temperature,
                                     entropy=entropy)
    if impl in ("pallas_tpu", "pallas_gpu"):
        kw = dict(vocab_size=vocab_size, scale=1.0 / temperature, entropy=entropy, block_t=block_t,
                  block_v=block_v, interpret=interpret)
        try:
            kernel = _kernel_module(impl)
            if not interpret and jax.default_backend() != "cpu":
                _check_compiles(impl, hidden, weight, targets, kw)
            return kernel.token_stats(hidden, weight, targets, **kw)
        except (NotImplementedError, ImportError, _CompileFailure) as e:
            _warn_once(impl, f"token_stats: {impl} unavailable ({type(e).__name__}: {e}); using xla_chunked")
    active = None if active_rows is None else jnp.asarray(active_rows, jnp.int32)
    return _xla_chunked(hidden, weight, targets, active, vocab_size, 1.0 / temperature, entropy, block_t or 512,
                        block_v or 2048)


# ------------------------------------------------------------------------------------------------
# the SFT loss on top

class LossOutput(NamedTuple):
    loss_sum: jax.Array  # [] f32, sum of weighted token losses (differentiate this)
    weight_sum: jax.Array  # [] f32, sum of token weights (the normaliser)
    layer_nll: jax.Array  # [L] f32, unweighted NLL summed per layer (metrics; no gradient)
    layer_count: jax.Array  # [L] f32, trained tokens per layer


def dual_layer_loss(hidden, weight, targets, loss_weights, layer_ids, num_layers: int, *, z_loss: float = 0.0,
                    label_smoothing: float = 0.0, mesh=None, **stats_kwargs) -> LossOutput:
    """Weighted next-token loss of packed rows, as (sum, weight) plus per-layer metrics.

    hidden [T, H], weight [V, H], targets [T], loss_weights [T] (0 = not trained; per-layer weights
    already applied by the data pipeline), layer_ids [T] in [0, num_layers) (layer of the target).
    Token loss = (1 - eps) * NLL + eps * (lse - mean logit) + z_loss * lse^2. Divide `loss_sum` by
    the global `weight_sum` once, after summing both over micro-batches and devices. With `mesh`,
    the token statistics are computed per token shard (`sharded_token_stats`).
    """
    if mesh is not None:
        stats = sharded_token_stats(hidden, weight, targets, mesh, **stats_kwargs)
    else:
        # Trained tokens first: the head then skips the tiles holding only context (often most of an
        # SFT row: system prompt, other characters, history).
        order = jnp.argsort(loss_weights <= 0, stable=True)
        hidden, targets, loss_weights, layer_ids = hidden[order], targets[order], loss_weights[order], layer_ids[order]
        stats = token_stats(hidden, weight, targets, active_rows=jnp.sum(loss_weights > 0), **stats_kwargs)
    nll = -stats.logprob
    per_token = nll
    if label_smoothing:
        # The mean logit is linear in hidden: hidden . mean_v(w_v) / temperature, no [T, V] tensor.
        vocab_size = stats_kwargs.get("vocab_size") or weight.shape[0]
        w_mean = jnp.mean(weight[:vocab_size], axis=0, dtype=jnp.float32)
        mean_logit = hidden.astype(jnp.float32) @ w_mean / stats_kwargs.get("temperature", 1.0)
        per_token = (1.0 - label_smoothing) * nll + label_smoothing * (stats.lse - mean_logit)
    if z_loss:
        per_token = per_token + z_loss * jnp.square(stats.lse)
    w = loss_weights.astype(jnp.float32)
    trained = (w > 0).astype(jnp.float32)
    onehot = jax.nn.one_hot(layer_ids, num_layers, dtype=jnp.float32) * trained[:, None]
    return LossOutput(jnp.sum(per_token * w), jnp.sum(w), jax.lax.stop_gradient(nll @ onehot),
                      jnp.sum(onehot, axis=0))


def sharded_token_stats(hidden, weight, targets, mesh, *, token_axes=("data", "fsdp"), **kwargs) -> TokenStats:
    """`token_stats` on token shards: hidden [T, H] and targets [T] split over `token_axes` of
    `mesh`, the weight whole on every device (FSDP gathers it; its gradient is reduced back).
    Needed for the Pallas kernels, which have no SPMD partitioning rule of their own."""
    from jax.sharding import PartitionSpec as P

    axes = tuple(a for a in token_axes if a in mesh.shape and mesh.shape[a] > 1)
    tok = P(axes or None)
    local = functools.partial(token_stats, **kwargs)
    entropy = kwargs.get("entropy", False)
    out_specs = TokenStats(tok, tok, tok if entropy else None)
    fn = jax.shard_map(lambda h, w, y: local(h, w, y), mesh=mesh, in_specs=(P(axes or None, None), P(), tok),
                       out_specs=out_specs, check_vma=False)
    return fn(hidden, weight, targets)
