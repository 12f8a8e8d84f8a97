"""Qwen3 dense decoder in Flax NNX, numerically matching transformers' `Qwen3ForCausalLM`.

Layout: token embedding `[V, D]`; `num_hidden_layers` decoder layers whose parameters are stacked
on a leading layer axis and applied with `lax.scan` (compile time flat in depth) under a named
remat policy; final RMSNorm; tied or untied head `[V, D]`. Axis letters: b batch, t tokens,
s keys, d model width, n query heads, k kv heads, g queries per kv head, h head dim, f MLP width,
v vocab, l layers.

Every parameter carries `logical_axes` metadata that `her_jax.parallel.rules` maps to the mesh.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from her_jax.kernels.dual_view_attention import dense_attention, flash_attention, visibility_mask
from her_jax.model.config import Qwen3Config, rope_params
from her_jax.parallel.rules import DEFAULT_RULES, Rules, constrain, logical_to_spec

_GELU_TANH = functools.partial(jax.nn.gelu, approximate=True)
_GELU = functools.partial(jax.nn.gelu, approximate=False)
_ACTIVATIONS = {
    "silu": jax.nn.silu, "swish": jax.nn.silu,
    "gelu": _GELU, "gelu_python": _GELU,
    "gelu_new": _GELU_TANH, "gelu_fast": _GELU_TANH, "gelu_accurate": _GELU_TANH, "gelu_pytorch_tanh": _GELU_TANH,
    "gelu_python_tanh": _GELU_TANH,
    "gelu_10": lambda x: jnp.clip(_GELU(x), -10, 10),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "laplace": lambda x: 0.5 * (1.0 + jax.lax.erf((x - 0.707107) / (0.282095 * np.sqrt(2.0)))),
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "relu": jax.nn.relu, "relu2": lambda x: jnp.square(jax.nn.relu(x)), "relu6": jax.nn.relu6,
    "leaky_relu": jax.nn.leaky_relu, "hardswish": jax.nn.hard_swish,
    "sqrtsoftplus": lambda x: jnp.sqrt(jax.nn.softplus(x)),
    "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "linear": lambda x: x,
}

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_proj": jax.checkpoint_policies.save_only_these_names("q_proj", "k_proj", "v_proj"),
    # The MLP's gate and up projections hold ~70 % of a layer's FLOPs: keeping them avoids most of
    # the recomputation, at 2 x intermediate_size values per token and layer (in HBM, or moved to
    # the host's memory while the forward pass runs and fetched back for the backward).
    "mlp": jax.checkpoint_policies.save_only_these_names("mlp_gate", "mlp_up"),
    "mlp_offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["mlp_gate", "mlp_up"],
        offload_src="device", offload_dst="pinned_host"),
}


def _concrete(x) -> np.ndarray | None:
    """x as a numpy value, or None while tracing or when x spans other processes' devices
    (checks that need values run only where the values are at hand)."""
    try:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return None
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _param(init, key, shape, dtype, axes) -> nnx.Param:
    return nnx.Param(init(key, shape, dtype), logical_axes=axes)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF's Qwen3RMSNorm: normalise in float32, cast back to x's dtype, then scale."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def rope_tables(config: Qwen3Config, positions_bt: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [B, T, head_dim] in `dtype` (rotate-half layout, as HF)."""
    seq_len = jnp.max(positions_bt) + 1 if config.rope_type in ("dynamic", "longrope") else None
    inv_freq, scaling = rope_params(config, seq_len)
    freqs = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * scaling).astype(dtype), (jnp.sin(emb) * scaling).astype(dtype)


def apply_rope(x_btnh: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    return x_btnh * cos[:, :, None, :] + rotated * sin[:, :, None, :]


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer plus per-slot metadata for the visibility predicate.

    k, v: [L, B, K, S, H] (heads before slots, so one layer's keys per KV head are a contiguous
    [S, H] matrix that the attention products read without a transpose), or tuples of L arrays
    [B, K, S, H] (`unstacked()`, for a decode loop that runs the layers one by one); pos, doc, view:
    [B, S] int32 (doc = -1 marks an empty slot);
    length: [] int32, the number of slots written (the next write starts there).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    doc: jax.Array
    view: jax.Array
    length: jax.Array

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] if isinstance(self.k, tuple) else self.k.shape[3]

    def unstacked(self) -> KVCache:
        """The same cache with one array per layer (copies)."""
        if isinstance(self.k, tuple):
            return self
        split = lambda a: tuple(a[i] for i in range(a.shape[0]))
        return self.replace(k=split(self.k), v=split(self.v))

    def stacked(self) -> KVCache:
        """The same cache with the layers stacked on a leading axis again."""
        if not isinstance(self.k, tuple):
            return self
        return self.replace(k=jnp.stack(self.k), v=jnp.stack(self.v))


class Attention(nnx.Module):
    """Grouped-query attention with per-head RMSNorm on q and k before RoPE (one layer)."""

    def __init__(self, config: Qwen3Config, rules: Rules, *, rngs: nnx.Rngs):
        c = config
        d, n, k, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        w, pdt = nnx.initializers.normal(c.initializer_range), jnp.dtype(c.param_dtype)
        self.config, self.rules = config, rules
        self.q_proj = _param(w, rngs.params(), (d, n, h), pdt, ("embed", "q_heads", "head_dim"))
        self.k_proj = _param(w, rngs.params(), (d, k, h), pdt, ("embed", "kv_heads", "head_dim"))
        self.v_proj = _param(w, rngs.params(), (d, k, h), pdt, ("embed", "kv_heads", "head_dim"))
        self.o_proj = _param(w, rngs.params(), (n, h, d), pdt, ("q_heads", "head_dim", "embed"))
        ones, zeros = nnx.initializers.ones, nnx.initializers.zeros
        self.q_norm = _param(ones, rngs.params(), (h,), pdt, ("norm",))
        self.k_norm = _param(ones, rngs.params(), (h,), pdt, ("norm",))
        if c.attention_bias:
            self.q_bias = _param(zeros, rngs.params(), (n, h), pdt, ("q_heads", "head_dim"))
            self.k_bias = _param(zeros, rngs.params(), (k, h), pdt, ("kv_heads", "head_dim"))
            self.v_bias = _param(zeros, rngs.params(), (k, h), pdt, ("kv_heads", "head_dim"))
            self.o_bias = _param(zeros, rngs.params(), (d,), pdt, ("norm",))

    def _project(self, x_btd, name: str, axes) -> jax.Array:
        w = getattr(self, name)[...].astype(x_btd.dtype)
        out = jnp.einsum("btd,dnh->btnh", x_btd, w)
        if self.config.attention_bias:
            out = out + getattr(self, name.replace("proj", "bias"))[...].astype(out.dtype)
        out = checkpoint_name(out, name)
        return constrain(out, axes, self.rules, f"attention.{name}")

    def __call__(self, x_btd, cos, sin, attend, kv_cache=None, layer=None, start=None):
        """x: [B, T, D] -> [B, T, D]; `attend(q, k, v)` applies the visibility rule. With `kv_cache` =
        (k_all, v_all) of shape [L, B, K, S, H], the new keys/values are written at slots
        [start, start + T) of `layer` and attention reads all S slots (k, v passed to `attend` as
        [B, K, S, H]); the updated (k_all, v_all) is returned alongside. With `layer=None`, the
        cache holds this layer alone ([B, K, S, H] each)."""
        c, rules = self.config, self.rules
        heads = ("act_batch", "act_seq", "act_heads", "act_head_dim")
        kv_heads = ("act_batch", "act_seq", "act_kv_heads", "act_head_dim")
        q = rms_norm(self._project(x_btd, "q_proj", heads), self.q_norm[...], c.rms_norm_eps)
        k = rms_norm(self._project(x_btd, "k_proj", kv_heads), self.k_norm[...], c.rms_norm_eps)
        v = self._project(x_btd, "v_proj", kv_heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k_all, v_all = kv_cache
            to_cache = lambda x: jnp.swapaxes(x, 1, 2).astype(k_all.dtype)  # [B, K, T, H]
            if layer is None:  # this layer's own cache arrays
                k_all = jax.lax.dynamic_update_slice(k_all, to_cache(k), (0, 0, start, 0))
                v_all = jax.lax.dynamic_update_slice(v_all, to_cache(v), (0, 0, start, 0))
                k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
            else:
                k_all = jax.lax.dynamic_update_slice(k_all, to_cache(k)[None], (layer, 0, 0, start, 0))
                v_all = jax.lax.dynamic_update_slice(v_all, to_cache(v)[None], (layer, 0, 0, start, 0))
                k, v = k_all[layer].astype(q.dtype), v_all[layer].astype(q.dtype)
            kv_cache = (k_all, v_all)
        out = attend(q, k, v, "bskh" if kv_cache is None else "bksh")
        out = constrain(out, heads, rules, "attention.out")
        out = jnp.einsum("btnh,nhd->btd", out, self.o_proj[...].astype(out.dtype))
        if c.attention_bias:
            out = out + self.o_bias[...].astype(out.dtype)
        return out, kv_cache


class MLP(nnx.Module):
    """SwiGLU-style gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, config: Qwen3Config, rules: Rules, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        w, pdt = nnx.initializers.normal(config.initializer_range), jnp.dtype(config.param_dtype)
        self.config, self.rules = config, rules
        self.gate_proj = _param(w, rngs.params(), (d, f), pdt, ("embed", "mlp"))
        self.up_proj = _param(w, rngs.params(), (d, f), pdt, ("embed", "mlp"))
        self.down_proj = _param(w, rngs.params(), (f, d), pdt, ("mlp", "embed"))

    def __call__(self, x_btd):
        dt = x_btd.dtype
        act = _ACTIVATIONS[self.config.hidden_act]
        gate = checkpoint_name(jnp.einsum("btd,df->btf", x_btd, self.gate_proj[...].astype(dt)), "mlp_gate")
        up = checkpoint_name(jnp.einsum("btd,df->btf", x_btd, self.up_proj[...].astype(dt)), "mlp_up")
        hidden = constrain(act(gate) * up, ("act_batch", "act_seq", "act_mlp"), self.rules, "mlp.hidden")
        return jnp.einsum("btf,fd->btd", hidden, self.down_proj[...].astype(dt))


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: Qwen3Config, rules: Rules, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(config.param_dtype)
        self.config, self.rules = config, rules
        self.input_layernorm = _param(nnx.initializers.ones, rngs.params(), (config.hidden_size,), pdt, ("norm",))
        self.self_attn = Attention(config, rules, rngs=rngs)
        self.post_attention_layernorm = _param(nnx.initializers.ones, rngs.params(), (config.hidden_size,), pdt,
                                               ("norm",))
        self.mlp = MLP(config, rules, rngs=rngs)

    def __call__(self, x_btd, cos, sin, attend, kv_cache=None, layer=None, start=None):
        eps = self.config.rms_norm_eps
        act = ("act_batch", "act_seq", "act_embed")
        with jax.named_scope("attention"):
            attn, kv_cache = self.self_attn(rms_norm(x_btd, self.input_layernorm[...], eps), cos, sin, attend,
                                            kv_cache, layer, start)
        x_btd = constrain(x_btd + attn, act, self.rules, "residual.attention")
        with jax.named_scope("mlp"):
            x_btd = x_btd + self.mlp(rms_norm(x_btd, self.post_attention_layernorm[...], eps))
        return constrain(x_btd, act, self.rules, "residual.mlp"), kv_cache


def _stacked_layers(config: Qwen3Config, rules: Rules, rngs: nnx.Rngs) -> DecoderLayer:
    """One DecoderLayer whose parameters carry a leading layer axis (logical name 'layers')."""
    keys = jax.random.split(rngs.params(), config.num_hidden_layers)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: DecoderLayer(config, rules, rngs=nnx.Rngs(0))))
    state = jax.vmap(lambda key: nnx.state(DecoderLayer(config, rules, rngs=nnx.Rngs(params=key))))(keys)
    layers = nnx.merge(graphdef, state)
    for _, node in nnx.iter_graph(layers):
        if isinstance(node, nnx.Param):
            node.set_metadata("logical_axes", ("layers", *node.get_metadata()["logical_axes"]))
    return layers


class Qwen3(nnx.Module):
    """Qwen3ForCausalLM. Call on token ids [B, T] int32 -> logits [B, T, V] float32.

    Optional `positions`, `doc_ids`, `view_ids` ([B, T] int32) select RoPE positions and the
    dual-view visibility (defaults: 0..T-1, one document, shared view = plain causal attention).
    """

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs, rules: Rules = DEFAULT_RULES):
        c = config
        pdt = jnp.dtype(c.param_dtype)
        w = nnx.initializers.normal(c.initializer_range)
        self.config, self.rules = config, tuple(rules)
        self.embed_tokens = _param(w, rngs.params(), (c.vocab_size, c.hidden_size), pdt, ("vocab", "embed"))
        self.layers = _stacked_layers(c, self.rules, rngs)
        self.norm = _param(nnx.initializers.ones, rngs.params(), (c.hidden_size,), pdt, ("norm",))
        if not c.tie_word_embeddings:
            self.lm_head = _param(w, rngs.params(), (c.vocab_size, c.hidden_size), pdt, ("vocab", "embed"))

    # -- public API --------------------------------------------------------------------------------
    def __call__(self, tokens, *, positions=None, doc_ids=None, view_ids=None) -> jax.Array:
        return self.logits(self.hidden_states(tokens, positions=positions, doc_ids=doc_ids, view_ids=view_ids))

    def hidden_states(self, tokens, *, positions=None, doc_ids=None, view_ids=None) -> jax.Array:
        """Final-norm hidden states [B, T, D] in the compute dtype (what the fused loss consumes)."""
        tokens, positions, doc_ids, view_ids = self._check_inputs(tokens, positions, doc_ids, view_ids, offset=0)
        if self.attention_impl() == "dense":
            idx = jnp.arange(tokens.shape[1], dtype=jnp.int32)
            attention = ("dense", self._masks(idx, idx, doc_ids, doc_ids, view_ids, view_ids, positions, positions))
        else:  # the flash kernel evaluates the predicate per block from the id vectors
            attention = ("flash", (doc_ids, view_ids, positions))
        h, _ = self._backbone(tokens, positions, attention, None, None)
        return h

    def attention_impl(self) -> str:
        """The attention implementation in use: the config's, with "auto" resolved for this backend."""
        impl = self.config.attention_impl
        if impl == "auto":
            return "pallas_tpu" if jax.default_backend() == "tpu" else "dense"
        return impl

    def head_weight(self) -> jax.Array:
        """The output projection [V, D] (the embedding when tied), in HF/embedding layout."""
        return (self.embed_tokens if self.config.tie_word_embeddings else self.lm_head)[...]

    def logits(self, hidden_btd: jax.Array) -> jax.Array:
        w = self.head_weight().astype(hidden_btd.dtype)
        logits = jnp.einsum("btd,vd->btv", hidden_btd, w, preferred_element_type=jnp.float32)
        return constrain(logits, ("act_batch", "act_seq", "act_vocab"), self.rules, "logits")

    def layer_states(self) -> tuple[nnx.State, ...]:
        """Each decoder layer's parameters as arrays of their own (copies of the stacked slices).

        For a decode loop on backends that cannot read a weight out of the stacked array in place:
        XLA:CPU and XLA:GPU copy every layer's weights out of the stack at every step of a scan
        (4 of the 31 ms of a decode step of benchmarks/generate.py's model on CPU); taken once
        before the loop, the copies cost one more set of layer weights in memory instead. XLA:TPU
        reads the slice inside the matmul."""
        _, stacked = nnx.split(self.layers)
        return tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(self.config.num_hidden_layers))

    def init_cache(self, batch: int, capacity: int, dtype=None) -> KVCache:
        """An empty cache for `batch` rows of up to `capacity` tokens (dtype: compute dtype by default)."""
        c = self.config
        dtype = jnp.dtype(dtype or c.dtype)
        shape = (c.num_hidden_layers, batch, c.num_key_value_heads, capacity, c.head_dim)
        kv_axes = ("layers", "act_batch", "act_kv_heads", "cache_seq", "act_head_dim")
        kv = constrain(jnp.zeros(shape, dtype), kv_axes, self.rules, "kv_cache")
        meta = jnp.zeros((batch, capacity), jnp.int32)
        return KVCache(k=kv, v=kv, pos=meta, doc=meta - 1, view=meta, length=jnp.zeros((), jnp.int32))

    def extend(self, tokens, cache: KVCache, *, positions=None, doc_ids=None, view_ids=None,
               hidden: bool = False, layers=None) -> tuple[jax.Array, KVCache]:
        """Run T new tokens against the cache (prefill when T > 1, one decode step when T = 1).

        Writes their keys/values at slots [cache.length, cache.length + T) and returns
        (logits [B, T, V] float32, updated cache). Positions default to length + 0..T-1. With
        `hidden=True`, the final-norm hidden states [B, T, D] instead of logits (for a caller that
        applies `head_weight()` its own way, e.g. the sampler). `layers`: the per-layer parameters
        from `layer_states()`, run one after the other instead of a scan over the stacked ones.
        """
        start = cache.length
        used = _concrete(start)
        if used is not None and int(used) + np.shape(tokens)[1] > cache.capacity:
            raise ValueError(f"KV cache overflow: {int(used)} slots used + {np.shape(tokens)[1]} new tokens > "
                             f"capacity {cache.capacity}")
        tokens, positions, doc_ids, view_ids = self._check_inputs(tokens, positions, doc_ids, view_ids, offset=start)
        t = tokens.shape[1]
        write = lambda a, new: jax.lax.dynamic_update_slice(a, new.astype(a.dtype), (0, start))
        pos, doc, view = write(cache.pos, positions), write(cache.doc, doc_ids), write(cache.view, view_ids)
        q_idx = start + jnp.arange(t, dtype=jnp.int32)
        k_idx = jnp.arange(cache.capacity, dtype=jnp.int32)
        masks = self._masks(q_idx, k_idx, doc_ids, doc, view_ids, view, positions, pos)  # decoding is dense
        h, (k_all, v_all) = self._backbone(tokens, positions, ("dense", masks), (cache.k, cache.v), start, layers)
        new_cache = KVCache(k=k_all, v=v_all, pos=pos, doc=doc, view=view, length=start + t)
        return (h if hidden else self.logits(h)), new_cache

    # -- internals ---------------------------------------------------------------------------------
    def _check_inputs(self, tokens, positions, doc_ids, view_ids, offset):
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens: expected int ids of shape [B, T], found {tokens.dtype}{list(tokens.shape)}")
        ids = _concrete(tokens)
        if ids is not None and ids.size:  # outside jit: out-of-range ids would silently gather garbage
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"tokens: ids must lie in [0, {self.config.vocab_size}), found range [{lo}, {hi}]")
        shape = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(offset + jnp.arange(shape[1], dtype=jnp.int32), shape)
        zeros = jnp.zeros(shape, jnp.int32)
        out = [tokens.astype(jnp.int32)]
        for name, arr in (("positions", positions), ("doc_ids", doc_ids if doc_ids is not None else zeros),
                          ("view_ids", view_ids if view_ids is not None else zeros)):
            arr = jnp.asarray(arr)
            if arr.shape != shape or not jnp.issubdtype(arr.dtype, jnp.integer):
                raise ValueError(f"{name}: expected int32 of shape {list(shape)} like tokens, "
                                 f"found {arr.dtype}{list(arr.shape)}")
            out.append(arr.astype(jnp.int32))
        return tuple(out)

    def _masks(self, q_idx, k_idx, q_doc, k_doc, q_view, k_view, q_pos, k_pos):
        """(full-attention mask, sliding-window mask or None), each [B, T, S] bool. The window
        counts positions, so a packed or dual-view row slides as its single-turn samples would."""
        full = visibility_mask(q_idx, k_idx, q_doc, k_doc, q_view, k_view)
        if not any(self.config.layer_windows):
            return full, None
        return full, full & ((q_pos[:, :, None] - k_pos[:, None, :]) < self.config.sliding_window)

    def _attend_fn(self, attention, is_sliding):
        """attend(q, k, v) for one layer: dense with the precomputed masks, or the flash kernel."""
        c = self.config
        scale = c.head_dim ** -0.5
        kind, data = attention
        if kind == "dense":
            full_mask, sliding_mask = data
            mask = full_mask if sliding_mask is None else jnp.where(is_sliding, sliding_mask, full_mask)
            return lambda q, k, v, kv_layout: dense_attention(q, k, v, mask, scale, kv_layout)
        doc_ids, view_ids, positions = data
        window = jnp.where(is_sliding, c.sliding_window or 0, 0).astype(jnp.int32)
        interpret = self.attention_impl() == "pallas_interpret"
        flash = functools.partial(flash_attention, scale=scale, interpret=interpret)
        mesh = jax.sharding.get_abstract_mesh()

        def flat_kv(kv_layout):  # the flash path never reads a KV cache (extend() decodes densely)
            if kv_layout != "bskh":
                raise ValueError(f"flash attention takes K/V as [B, S, K, H], found layout {kv_layout!r}")

        def local(q, k, v, kv_layout):
            flat_kv(kv_layout)
            return flash(q, k, v, doc_ids, view_ids, positions, window=window)

        if mesh.empty:
            return local

        def sharded(q, k, v, kv_layout):  # Pallas kernels have no partitioning rule: run them per shard
            flat_kv(kv_layout)
            spec = lambda names, x, what: logical_to_spec(names, x.shape, mesh, self.rules, what=what)
            q_spec = spec(("act_batch", None, "act_heads", None), q, "attention.q")
            kv_spec = spec(("act_batch", None, "act_kv_heads", None), k, "attention.k")
            meta = spec(("act_batch", None), doc_ids, "attention.doc_ids")
            fn = jax.shard_map(lambda q, k, v, d, vw, p, w: flash(q, k, v, d, vw, p, window=w), mesh=mesh,
                               in_specs=(q_spec, kv_spec, kv_spec, meta, meta, meta, PartitionSpec()),
                               out_specs=q_spec, check_vma=False)
            return fn(q, k, v, doc_ids, view_ids, positions, window)

        return sharded

    def _backbone(self, tokens, positions, attention, kv_cache, start, layers=None):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        act = ("act_batch", "act_seq", "act_embed")
        with jax.named_scope("embed"):
            # Gather the table over its FSDP-sharded width first (as FSDP does for every weight),
            # so the lookup partitions over vocab shards instead of rematerialising the table.
            table = constrain(self.embed_tokens[...], ("vocab", None), self.rules, "embed_tokens")
            h = jnp.take(table, tokens, axis=0).astype(dtype)
            h = constrain(h, act, self.rules, "embed")
        cos, sin = rope_tables(c, positions, dtype)
        graphdef, stacked = nnx.split(self.layers)
        sliding = jnp.asarray([w > 0 for w in c.layer_windows])

        def body(carry, xs):
            h, kv = carry
            layer_state, layer, is_sliding = xs
            attend = self._attend_fn(attention, is_sliding)
            h, kv = nnx.merge(graphdef, layer_state)(h, cos, sin, attend, kv, layer, start)
            return (h, kv), None

        if layers is not None:  # separate per-layer arrays: a plain loop (forward only, no remat)
            with jax.named_scope("layers"):
                per_layer = kv_cache is not None and isinstance(kv_cache[0], tuple)
                ks, vs = [], []
                for i, layer_state in enumerate(layers):
                    attend = self._attend_fn(attention, c.layer_windows[i] > 0)
                    layer = nnx.merge(graphdef, layer_state)
                    if per_layer:  # an unstacked cache: each layer reads and writes its own arrays
                        h, (k_i, v_i) = layer(h, cos, sin, attend, (kv_cache[0][i], kv_cache[1][i]), None, start)
                        ks.append(k_i)
                        vs.append(v_i)
                    else:
                        h, kv_cache = layer(h, cos, sin, attend, kv_cache, i, start)
                if per_layer:
                    kv_cache = (tuple(ks), tuple(vs))
            with jax.named_scope("final_norm"):
                return rms_norm(h, self.norm[...], c.rms_norm_eps), kv_cache
        if c.remat != "none":
            # Inside a scan XLA cannot merge the recomputation with the forward; unrolled, it could.
            body = jax.checkpoint(body, policy=_REMAT[c.remat], prevent_cse=not c.scan_layers)
        with jax.named_scope("layers"):
            (h, kv_cache), _ = jax.lax.scan(
                body, (h, kv_cache), (stacked, jnp.arange(c.num_hidden_layers, dtype=jnp.int32), sliding),
                unroll=not c.scan_layers)
        with jax.named_scope("final_norm"):
            h = rms_norm(h, self.norm[...], c.rms_norm_eps)
        return h, kv_cache


# -- construction -----------------------------------------------------------------------------------
def abstract_model(config: Qwen3Config, rules: Rules = DEFAULT_RULES) -> Qwen3:
    """The model with ShapeDtypeStruct leaves: shapes and metadata, no memory."""
    return nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0), rules=rules))


def init_model(config: Qwen3Config, *, mesh=None, seed: int = 0, rules: Rules = DEFAULT_RULES) -> Qwen3:
    """A randomly initialised model, each parameter created directly in its sharding on `mesh`
    (no full copy on one device); `mesh=None` puts everything on the default device."""
    from her_jax.parallel.rules import state_shardings

    graphdef, abstract_state = nnx.split(abstract_model(config, rules))
    out_shardings = state_shardings(abstract_state, mesh, rules)

    @functools.partial(jax.jit, out_shardings=out_shardings)
    def make():
        return nnx.state(Qwen3(config, rngs=nnx.Rngs(seed), rules=rules))

    return nnx.merge(graphdef, make())
