"""Qwen3 model configuration: built from (and written back to) a Hugging Face `config.json`.

Every architecture field is required when reading an HF config (no silent defaults: a port once
ignored `rope_theta`); fields we do not model are kept verbatim in `hf_extra` so an export writes
back the config it was given.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np


class ConfigError(ValueError):
    """An HF or her_jax model config that cannot be used, with the field and source named."""


DTYPES = ("float32", "bfloat16", "float16")

# `hidden_act` values: transformers' ACT2FN entries without learned parameters (prelu and xielu
# have weights of their own, which no Qwen3 checkpoint carries).
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_python", "gelu_new", "gelu_fast", "gelu_accurate", "gelu_pytorch_tanh",
               "gelu_python_tanh", "gelu_10", "quick_gelu", "laplace", "mish", "relu", "relu2", "relu6", "leaky_relu",
               "hardswish", "sqrtsoftplus", "sigmoid", "tanh", "linear")

# Every RoPE type transformers offers Qwen3 ('dynamic' and 'longrope' depend on the call's length).
ROPE_TYPES = ("default", "linear", "proportional", "llama3", "yarn", "dynamic", "longrope")

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "qkv_proj", "mlp", "mlp_offload")
# "auto": the Pallas flash kernel on TPU, dense XLA attention elsewhere; "pallas_interpret" runs the
# TPU kernel in Pallas interpret mode (any backend; tests and debugging).
ATTENTION_IMPLS = ("auto", "dense", "pallas_tpu", "pallas_interpret")

# Fields that define the network (and so must match between a checkpoint and its config).
ARCH_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_type", "rope_scaling",
    "tie_word_embeddings", "attention_bias", "hidden_act", "sliding_window", "layer_types",
)

# HF keys that we model (everything else in a config.json is passed through in `hf_extra`).
_HF_MODELLED = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling",
    "tie_word_embeddings", "attention_bias", "hidden_act", "sliding_window", "use_sliding_window",
    "layer_types", "max_position_embeddings", "initializer_range", "dtype", "torch_dtype",
}


def _frozen_items(d: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """Sorted (key, value) pairs with lists as tuples, so the config stays hashable."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in dict(d or {}).items()))


def _thawed(items: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in items}


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """A dense Qwen3 decoder.

    Architecture fields mirror HF's `Qwen3Config`; `param_dtype`, `dtype` (compute), `remat`,
    `attention_impl` and `scan_layers` are run-time choices of ours and are not part of the HF file.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope_type: str = "default"
    # Extra RoPE parameters of non-default `rope_type`s, as sorted (key, value) pairs.
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    attention_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    # Per layer: "full_attention" or "sliding_attention"; empty means all full.
    layer_types: tuple[str, ...] = ()
    initializer_range: float = 0.02
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "full"
    attention_impl: str = "auto"
    # Layers run under `lax.scan` (compile time flat in depth); False unrolls them (AOT FLOP counts:
    # XLA's cost analysis counts a loop body once).
    scan_layers: bool = True
    # Everything else from the HF config.json (token ids, torch dtype, ...), kept for export.
    hf_extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)
    # The HF generation_config.json that came with the weights (written back on export).
    generation_config: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        def need(ok: bool, field: str, msg: str):
            if not ok:
                raise ConfigError(f"Qwen3Config.{field}: {msg} (found {getattr(self, field)!r})")

        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f, "expected a positive int")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"must divide num_attention_heads={self.num_attention_heads}")
        need(self.head_dim % 2 == 0, "head_dim", "RoPE needs an even head_dim")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "expected > 0")
        need(self.rope_theta > 0, "rope_theta", "expected > 0")
        need(self.rope_type in ROPE_TYPES, "rope_type", f"supported RoPE types are {ROPE_TYPES}")
        need(self.hidden_act in ACTIVATIONS, "hidden_act", f"expected one of {ACTIVATIONS}")
        need(self.param_dtype in DTYPES, "param_dtype", f"expected one of {DTYPES}")
        need(self.dtype in DTYPES, "dtype", f"expected one of {DTYPES}")
        need(self.remat in REMAT_POLICIES, "remat", f"expected one of {REMAT_POLICIES}")
        need(self.attention_impl in ATTENTION_IMPLS, "attention_impl", f"expected one of {ATTENTION_IMPLS}")
        need(not self.layer_types or len(self.layer_types) == self.num_hidden_layers, "layer_types",
             f"expected one entry per layer ({self.num_hidden_layers})")
        need(all(t in ("full_attention", "sliding_attention") for t in self.layer_types), "layer_types",
             "entries must be 'full_attention' or 'sliding_attention'")
        if "sliding_attention" in self.layer_types:
            need(isinstance(self.sliding_window, int) and self.sliding_window > 0, "sliding_window",
                 "sliding_attention layers need a positive sliding_window")
        rope_params(self)  # validates the RoPE parameters of the chosen type

    # ----------------------------------------------------------------------------------------
    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Per-layer attention window in positions (0 = unlimited)."""
        types = self.layer_types or ("full_attention",) * self.num_hidden_layers
        return tuple(self.sliding_window if t == "sliding_attention" else 0 for t in types)

    def replace(self, **changes) -> Qwen3Config:
        return dataclasses.replace(self, **changes)

    def arch_dict(self) -> dict[str, Any]:
        """The fields that define the network, JSON-ready (used to refuse mismatched checkpoints)."""
        out = {f: getattr(self, f) for f in ARCH_FIELDS}
        out["rope_scaling"] = _thawed(self.rope_scaling)
        out["layer_types"] = list(self.layer_types)
        return out

    def to_json_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready; `from_json_dict` inverts it."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["rope_scaling"] = _thawed(self.rope_scaling)
        out["layer_types"] = list(self.layer_types)
        out["hf_extra"] = dict(self.hf_extra)
        out["generation_config"] = dict(self.generation_config)
        return out

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> Qwen3Config:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown Qwen3Config fields {unknown}")
        d = dict(d)
        d["rope_scaling"] = _frozen_items(d.get("rope_scaling"))
        d["layer_types"] = tuple(d.get("layer_types") or ())
        return cls(**d)

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any], **runtime) -> Qwen3Config:
        """Build from an HF config: a `config.json` path, a model folder, or a dict.

        `runtime` sets our own fields (`param_dtype`, `dtype`, `remat`).
        """
        where = "config dict"
        if not isinstance(source, Mapping):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            where = path
            try:
                with open(path, encoding="utf-8") as f:
                    source = json.load(f)
            except FileNotFoundError:
                raise ConfigError(f"{where}: no such file (expected an HF config.json or a folder holding one)") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e})") from None
        hf = dict(source)

        def req(key: str, types: type | tuple[type, ...]):
            if key not in hf or hf[key] is None:
                raise ConfigError(f"{where}: required field '{key}' is missing")
            value = hf[key]
            if not isinstance(value, types) or isinstance(value, bool) != (types is bool):
                raise ConfigError(f"{where}: field '{key}' should be {types}, found {value!r}")
            return value

        model_type = hf.get("model_type", "qwen3")
        if model_type != "qwen3":
            raise ConfigError(f"{where}: model_type is {model_type!r}; her_jax supports dense 'qwen3' models")

        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if isinstance(rope.get("rope_theta"), (int, float)):
            theta = float(rope["rope_theta"])
        elif isinstance(hf.get("rope_theta"), (int, float)):
            theta = float(hf["rope_theta"])
        else:
            raise ConfigError(f"{where}: required field 'rope_theta' is missing "
                              "(looked in 'rope_parameters' and at the top level)")
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        rope.pop("rope_theta", None)
        max_pos = req("max_position_embeddings", int)
        if rope_type in ("yarn", "llama3", "longrope"):
            rope.setdefault("original_max_position_embeddings", max_pos)

        n_layers = req("num_hidden_layers", int)
        sliding = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
        if "layer_types" in hf and hf["layer_types"] is not None:
            layer_types = tuple(hf["layer_types"])
        elif sliding is not None:
            max_window_layers = req("max_window_layers", int)
            layer_types = tuple("sliding_attention" if i >= max_window_layers else "full_attention"
                                for i in range(n_layers))
        else:
            layer_types = ()
        if all(t == "full_attention" for t in layer_types):
            layer_types = ()

        extra = {k: v for k, v in hf.items() if k not in _HF_MODELLED}
        try:
            return cls(
                vocab_size=req("vocab_size", int),
                hidden_size=req("hidden_size", int),
                intermediate_size=req("intermediate_size", int),
                num_hidden_layers=n_layers,
                num_attention_heads=req("num_attention_heads", int),
                num_key_value_heads=req("num_key_value_heads", int),
                head_dim=req("head_dim", int),
                rms_norm_eps=float(req("rms_norm_eps", (int, float))),
                rope_theta=theta,
                tie_word_embeddings=req("tie_word_embeddings", bool),
                max_position_embeddings=max_pos,
                rope_type=rope_type,
                rope_scaling=_frozen_items(rope),
                attention_bias=bool(hf.get("attention_bias", False)),
                hidden_act=hf.get("hidden_act", "silu"),
                sliding_window=sliding,
                layer_types=layer_types,
                initializer_range=float(hf.get("initializer_range", 0.02)),
                hf_extra={**extra, "dtype": hf.get("dtype") or hf.get("torch_dtype")},
                **runtime,
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self, torch_dtype: str | None = None) -> dict[str, Any]:
        """A transformers-5 `config.json` dict; keys we do not model come back from `hf_extra`."""
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **_thawed(self.rope_scaling)}
        layer_types = list(self.layer_types or ("full_attention",) * self.num_hidden_layers)
        sliding = "sliding_attention" in layer_types
        hf = {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "bos_token_id": None,
            "eos_token_id": None,
            "pad_token_id": None,
            "attention_dropout": 0.0,
            "use_cache": True,
            **dict(self.hf_extra),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": rope,
            "attention_bias": self.attention_bias,
            "use_sliding_window": sliding,
            "sliding_window": self.sliding_window if sliding else None,
            "layer_types": layer_types,
            "dtype": torch_dtype or self.hf_dtype,
        }
        if hf["dtype"] is None:
            del hf["dtype"]
        return hf

    @property
    def hf_dtype(self) -> str | None:
        """The dtype the HF checkpoint was stored in, when known."""
        return self.hf_extra.get("dtype")


# ------------------------------------------------------------------------------------------------
# RoPE: inverse frequencies and the cos/sin scale, computed the way transformers computes them for
# Qwen3 (float32). Most types depend only on the config; 'dynamic' and 'longrope' also depend on
# the longest position of the call, which may be a traced value.

def rope_params(config: Qwen3Config, seq_len=None):
    """(inv_freq [head_dim // 2] float32, attention_scaling) for `config`'s RoPE.

    seq_len: max position + 1 over the call (needed by 'dynamic' and 'longrope'; None means
    "within the original context"). Returns a numpy array unless seq_len is a jax value.
    Unlike transformers' dynamic RoPE, which keeps the frequencies of the longest call a model
    object has seen, this depends on the current call only (= transformers on a fresh model).
    """
    import jax.numpy as jnp

    dim = config.head_dim
    base = config.rope_theta
    p = dict(config.rope_scaling)
    kind = config.rope_type

    def get(key: str, default=None):
        if p.get(key) is not None:
            return p[key]
        if default is None:
            raise ConfigError(f"rope_parameters: rope_type '{kind}' needs '{key}'")
        return default

    partial = float(p.get("partial_rotary_factor", 1.0))
    # transformers' own Qwen3 default RoPE ignores partial_rotary_factor; 'proportional' honours it
    # with zero frequencies; every other type would shorten the tables and fail in the model.
    if partial != 1.0 and kind not in ("default", "proportional"):
        raise ConfigError(f"rope_parameters: partial_rotary_factor={partial} with rope_type '{kind}' gives RoPE "
                          f"tables shorter than head_dim={dim}")
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (1.0 / np.power(np.float32(base), exponents, dtype=np.float32)).astype(np.float32)
    scaling = 1.0
    if kind == "linear":
        inv_freq = inv_freq / np.float32(get("factor"))
    elif kind == "proportional":
        angles = int(partial * dim // 2)
        inv_freq = np.concatenate([inv_freq[:angles], np.zeros(dim // 2 - angles, np.float32)])
        inv_freq = inv_freq / np.float32(p.get("factor") or 1.0)
    elif kind == "llama3":
        factor = float(get("factor"))
        low, high = float(get("low_freq_factor")), float(get("high_freq_factor"))
        old_len = float(get("original_max_position_embeddings"))
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    elif kind == "yarn":
        original = get("original_max_position_embeddings")
        factor = float(get("factor"))

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        scaling = p.get("attention_factor")
        if scaling is None:
            m, m_all = p.get("mscale"), p.get("mscale_all_dim")
            scaling = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        scaling = float(scaling)

        def correction_dim(rotations):
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
        if p.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1)
        extrapolation = 1 - ramp
        pos_freqs = np.power(np.float32(base), exponents, dtype=np.float32)
        inv_freq = (1.0 / (factor * pos_freqs) * (1 - extrapolation)
                    + 1.0 / pos_freqs * extrapolation).astype(np.float32)
    elif kind == "dynamic":
        factor = float(get("factor"))
        if seq_len is not None:  # NTK-aware base growth beyond max_position_embeddings
            max_pos = config.max_position_embeddings
            seq = jnp.maximum(jnp.asarray(seq_len, jnp.float32), jnp.float32(max_pos))
            grown = base * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2))
            inv_freq = 1.0 / jnp.power(grown.astype(jnp.float32), jnp.asarray(exponents))
    elif kind == "longrope":
        original = get("original_max_position_embeddings")
        short, long = (np.asarray(get(k), np.float32) for k in ("short_factor", "long_factor"))
        for name, f in (("short_factor", short), ("long_factor", long)):
            if f.shape != (dim // 2,):
                raise ConfigError(f"rope_parameters: longrope {name} has {f.size} entries, head_dim {dim} needs {dim // 2}")
        factor = p.get("factor") or config.max_position_embeddings / original
        scaling = p.get("attention_factor")
        if scaling is None:
            scaling = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        scaling = float(scaling)
        ext = short if seq_len is None else jnp.where(jnp.asarray(seq_len) > original, long, short)
        inv_freq = 1.0 / (ext * np.power(np.float32(base), exponents, dtype=np.float32))
    return inv_freq, scaling


# ------------------------------------------------------------------------------------------------
# Presets: golden copies of the public Qwen3 dense configs (QWEN3.md), plus tiny ones.

def _qwen3_hf(layers, hidden, heads, inter, tied, max_window_layers, theta=1_000_000, max_pos=40960):
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": 151936, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 8,
        "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-6, "rope_theta": theta, "rope_scaling": None,
        "tie_word_embeddings": tied, "attention_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": max_window_layers, "bos_token_id": 151643, "eos_token_id": 151645,
        "torch_dtype": "bfloat16", "use_cache": True,
    }


HF_PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": _qwen3_hf(28, 1024, 16, 3072, True, 28),
    "qwen3-1.7b": _qwen3_hf(28, 2048, 16, 6144, True, 28),
    "qwen3-4b": _qwen3_hf(36, 2560, 32, 9728, True, 36),
    "qwen3-4b-2507": _qwen3_hf(36, 2560, 32, 9728, True, 36, theta=5_000_000, max_pos=262144),
    "qwen3-8b": _qwen3_hf(36, 4096, 32, 12288, False, 36),
    "qwen3-14b": _qwen3_hf(40, 5120, 40, 17408, False, 40),
    "qwen3-32b": _qwen3_hf(64, 5120, 64, 25600, False, 64),
    # The default CPU run: the real Qwen3 vocabulary (so the real tokenizer works), a tiny body.
    "qwen3-tiny": {**_qwen3_hf(4, 64, 4, 192, True, 4), "num_key_value_heads": 2, "head_dim": 16,
                   "torch_dtype": "float32"},
    # Unit tests: small vocabulary, odd shapes (query width != hidden, GQA 2).
    "qwen3-test": {**_qwen3_hf(2, 64, 4, 96, False, 2), "vocab_size": 512, "num_key_value_heads": 2,
                   "head_dim": 32, "torch_dtype": "float32"},
}


def preset(name: str, **runtime) -> Qwen3Config:
    """A named preset (`qwen3-0.6b` ... `qwen3-32b`, `qwen3-tiny`, `qwen3-test`)."""
    if name not in HF_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(HF_PRESETS)}")
    return Qwen3Config.from_hf(HF_PRESETS[name], **runtime)
