"""Hugging Face safetensors <-> her_jax Qwen3, streamed one tensor at a time.

The name/layout mapping is declared once (`MAPPING`) and used by both directions. Loading reads
each HF tensor, converts its layout on the host and places it straight into its sharding (a
process builds only its addressable shards; a stacked layer parameter is filled layer by layer in
place). Export gathers one tensor at a time and streams it into size-capped safetensors files.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from her_jax.convert.safetensors_stream import (
    DTYPES, Entry, SafetensorsReader, StreamWriter, dtype_name, parse_size, plan_shards, shard_file_names,
    write_index,
)
from her_jax.data.tokenizer import tokenizer_files
from her_jax.model.config import Qwen3Config
from her_jax.model.qwen3 import Qwen3, abstract_model
from her_jax.parallel.rules import DEFAULT_RULES, Rules, state_shardings

log = logging.getLogger(__name__)



class ConversionError(ValueError):
    """A checkpoint that does not fit the model, naming the tensor and file."""


# ------------------------------------------------------------------------------------------------
# The mapping, as data. Layouts (HF torch Linear weights are [out, in]):
#   copy          same array
#   transpose     [out, in]            <-> [in, out]
#   heads_in      [heads*head_dim, d]  <-> [d, heads, head_dim]      (q/k/v projections)
#   heads_out     [d, heads*head_dim]  <-> [heads, head_dim, d]      (o projection)
#   heads_bias    [heads*head_dim]     <-> [heads, head_dim]

@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF tensor name; "{i}" marks a per-layer tensor stacked on our leading layer axis
    ours: str  # path in the model's parameter state
    layout: str = "copy"
    when: Callable[[Qwen3Config], bool] = lambda c: True

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf


def _untied(c: Qwen3Config) -> bool:
    return not c.tie_word_embeddings


def _bias(c: Qwen3Config) -> bool:
    return c.attention_bias


_LAYER = "model.layers.{i}."
MAPPING: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "embed_tokens"),
    Rule(_LAYER + "input_layernorm.weight", "layers/input_layernorm"),
    Rule(_LAYER + "self_attn.q_proj.weight", "layers/self_attn/q_proj", "heads_in"),
    Rule(_LAYER + "self_attn.k_proj.weight", "layers/self_attn/k_proj", "heads_in"),
    Rule(_LAYER + "self_attn.v_proj.weight", "layers/self_attn/v_proj", "heads_in"),
    Rule(_LAYER + "self_attn.o_proj.weight", "layers/self_attn/o_proj", "heads_out"),
    Rule(_LAYER + "self_attn.q_proj.bias", "layers/self_attn/q_bias", "heads_bias", _bias),
    Rule(_LAYER + "self_attn.k_proj.bias", "layers/self_attn/k_bias", "heads_bias", _bias),
    Rule(_LAYER + "self_attn.v_proj.bias", "layers/self_attn/v_bias", "heads_bias", _bias),
    Rule(_LAYER + "self_attn.o_proj.bias", "layers/self_attn/o_bias", "copy", _bias),
    Rule(_LAYER + "self_attn.q_norm.weight", "layers/self_attn/q_norm"),
    Rule(_LAYER + "self_attn.k_norm.weight", "layers/self_attn/k_norm"),
    Rule(_LAYER + "post_attention_layernorm.weight", "layers/post_attention_layernorm"),
    Rule(_LAYER + "mlp.gate_proj.weight", "layers/mlp/gate_proj", "transpose"),
    Rule(_LAYER + "mlp.up_proj.weight", "layers/mlp/up_proj", "transpose"),
    Rule(_LAYER + "mlp.down_proj.weight", "layers/mlp/down_proj", "transpose"),
    Rule("model.norm.weight", "norm"),
    Rule("lm_head.weight", "lm_head", "copy", _untied),
)


def hf_shape(layout: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    """The HF shape of a (per-layer) parameter of shape `ours`."""
    if layout == "transpose":
        return ours[::-1]
    if layout == "heads_in":
        d, n, h = ours
        return (n * h, d)
    if layout == "heads_out":
        n, h, d = ours
        return (d, n * h)
    if layout == "heads_bias":
        n, h = ours
        return (n * h,)
    return ours


def to_ours(layout: str, w: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
    if layout in ("transpose", "heads_in", "heads_out"):
        return np.ascontiguousarray(w.T).reshape(ours)
    return w.reshape(ours)


def to_hf(layout: str, a: np.ndarray) -> np.ndarray:
    if layout == "heads_in":
        d, n, h = a.shape
        return np.ascontiguousarray(a.reshape(d, n * h).T)
    if layout == "heads_out":
        n, h, d = a.shape
        return np.ascontiguousarray(a.reshape(n * h, d).T)
    if layout == "transpose":
        return np.ascontiguousarray(a.T)
    if layout == "heads_bias":
        return a.reshape(-1)
    return a


def active_rules(config: Qwen3Config) -> list[Rule]:
    return [r for r in MAPPING if r.when(config)]


def hf_names(rule: Rule, config: Qwen3Config) -> list[str]:
    return [rule.hf.format(i=i) for i in range(config.num_hidden_layers)] if rule.stacked else [rule.hf]


def export_plan(config: Qwen3Config) -> list[tuple[Rule, str, int | None]]:
    """(rule, HF name, layer) in HF file order: each layer's tensors together."""
    plan = []
    for stacked, group in itertools.groupby(active_rules(config), key=lambda r: r.stacked):
        group = list(group)
        if stacked:
            plan += [(r, r.hf.format(i=i), i) for i in range(config.num_hidden_layers) for r in group]
        else:
            plan += [(r, r.hf, None) for r in group]
    return plan


def _variable(state: nnx.State, path: str):
    """The node at `path` ('layers/mlp/up_proj') of a parameter state (or of its shardings)."""
    node = state
    for key in path.split("/"):
        node = node[key]
    return node


# ------------------------------------------------------------------------------------------------
# Device placement helpers (jitted once per shape/sharding).

@functools.lru_cache(maxsize=None)
def _zeros_fn(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _set_layer_fn(sharding):
    return jax.jit(lambda buf, x, i: jax.lax.dynamic_update_index_in_dim(buf, x, i, 0),
                   donate_argnums=0, out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _get_layer_fn():
    return jax.jit(lambda buf, i: jax.lax.dynamic_index_in_dim(buf, i, 0, keepdims=False))


def _put(host: np.ndarray, sharding) -> jax.Array:
    """Place a host array into `sharding`, building only this process's shards."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _to_host(array: jax.Array) -> np.ndarray:
    if array.is_fully_addressable:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _drop_leading(sharding):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


# ------------------------------------------------------------------------------------------------
def load_hf(path: str | os.PathLike, mesh=None, dtype=None, *, compute_dtype=None, remat: str | None = None,
            attention_impl: str | None = None, rules: Rules = DEFAULT_RULES, progress: bool = True) -> Qwen3:
    """Load an HF Qwen3 folder (config.json + safetensors, one file or sharded with an index).

    dtype: parameter dtype (default: the checkpoint's `dtype`/`torch_dtype`, else that of its
    embedding); compute_dtype defaults to the parameter dtype. Every expected tensor must be
    present with its HF shape, and every tensor in the files must be used.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: expected an HF model folder (config.json + *.safetensors)")
    reader = SafetensorsReader(path)
    hf_config = Qwen3Config.from_hf(path)
    if dtype is None:
        dtype = hf_config.hf_dtype if hf_config.hf_dtype in ("float32", "bfloat16", "float16") else None
    if dtype is None and "model.embed_tokens.weight" in reader:
        dtype = str(reader.tensors["model.embed_tokens.weight"].np_dtype)
    dtype = str(jnp.dtype(dtype or "float32"))
    runtime = {"param_dtype": dtype, "dtype": str(jnp.dtype(compute_dtype or dtype))}
    if remat is not None:
        runtime["remat"] = remat
    if attention_impl is not None:
        runtime["attention_impl"] = attention_impl
    config = hf_config.replace(**runtime, generation_config=_read_json(os.path.join(path, "generation_config.json")))

    rules_used = active_rules(config)
    expected = {name for r in rules_used for name in hf_names(r, config)}
    missing = sorted(expected - set(reader.tensors))
    if missing:
        raise ConversionError(f"{path}: {len(missing)} expected tensors are missing, e.g. {missing[:5]}")
    unused = sorted(set(reader.tensors) - expected)
    if config.tie_word_embeddings and "lm_head.weight" in unused:
        # Some exports keep a copy of the tied head; accept it only if it really is the embedding.
        if not np.array_equal(reader.read("lm_head.weight"), reader.read("model.embed_tokens.weight")):
            raise ConversionError(f"{path}: tie_word_embeddings is true but lm_head.weight differs from "
                                  "model.embed_tokens.weight")
        unused.remove("lm_head.weight")
    if unused:
        raise ConversionError(f"{path}: {len(unused)} tensors in the checkpoint are not used by Qwen3 "
                              f"(config: {config.num_hidden_layers} layers, attention_bias="
                              f"{config.attention_bias}, tied={config.tie_word_embeddings}), e.g. {unused[:5]}")

    graphdef, state = nnx.split(abstract_model(config, rules))
    shardings = state_shardings(state, mesh, rules)
    total = sum(len(hf_names(r, config)) for r in rules_used)
    bar = tqdm(total=total, desc="load_hf", unit="tensor", disable=not progress or jax.process_index() != 0)
    for rule in rules_used:
        var = _variable(state, rule.ours)
        shape, param_dtype = var.get_value().shape, var.get_value().dtype
        sharding = _variable(shardings, rule.ours)
        per_layer = shape[1:] if rule.stacked else shape
        read = functools.partial(_read_tensor, reader, rule.layout, per_layer, param_dtype, bar)
        if rule.stacked:
            value = _zeros_fn(shape, param_dtype, sharding)()
            layer_sharding, set_layer = _drop_leading(sharding), _set_layer_fn(sharding)
            for i, name in enumerate(hf_names(rule, config)):
                value = set_layer(value, _put(read(name), layer_sharding), np.int32(i))
        else:
            value = _put(read(rule.hf), sharding)
        var.set_value(value)
    bar.close()
    return nnx.merge(graphdef, state)


def _read_tensor(reader: SafetensorsReader, layout: str, per_layer, dtype, bar, name: str) -> np.ndarray:
    """One HF tensor, checked against the shape the config needs, in our layout and dtype."""
    info = reader.tensors[name]
    want = hf_shape(layout, per_layer)
    if info.shape != want:
        raise ConversionError(f"{info.file}: tensor '{name}' has shape {list(info.shape)}, the config needs {list(want)}")
    if info.dtype not in ("F64", "F32", "F16", "BF16"):
        raise ConversionError(f"{info.file}: tensor '{name}' has dtype {info.dtype}, expected a float type")
    host = to_ours(layout, reader.read(name), per_layer).astype(dtype, copy=False)
    bar.update()
    return host


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_hf(model: Qwen3, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
            max_shard_size: int | str = "5GB", dtype=None, progress: bool = True) -> str:
    """Write an HF model folder: size-capped safetensors (+ index when sharded), config.json,
    generation_config.json and, from `tokenizer_dir`, the tokenizer files.

    dtype: stored dtype (default: the dtype the weights were loaded from, else the parameter dtype).
    All processes must call this (tensors are gathered collectively); process 0 writes.
    """
    out_dir = os.fspath(out_dir)
    config = model.config
    dtype = np.dtype(jnp.dtype(dtype or config.hf_dtype or config.param_dtype))
    if dtype not in (np.dtype(np.float32), DTYPES["BF16"], np.dtype(np.float16)):
        raise ConversionError(f"save_hf: dtype {dtype} is not a float type HF checkpoints use")
    writer_process = jax.process_index() == 0
    if writer_process:
        os.makedirs(out_dir, exist_ok=True)

    state = nnx.state(model, nnx.Param)
    plan = []
    for rule, name, layer in export_plan(config):
        shape = _variable(state, rule.ours).get_value().shape
        plan.append((rule, layer, Entry(name, dtype_name(dtype), hf_shape(rule.layout, shape[rule.stacked:]))))
    shards = plan_shards([e for _, _, e in plan], parse_size(max_shard_size))
    files = shard_file_names(len(shards))
    source = {e.name: (rule, layer) for rule, layer, e in plan}

    bar = tqdm(total=len(plan), desc="save_hf", unit="tensor", disable=not progress or not writer_process)
    for file, shard in zip(files, shards):
        writer = StreamWriter(os.path.join(out_dir, file), shard) if writer_process else None
        for entry in shard:
            rule, layer = source[entry.name]
            value = _variable(state, rule.ours).get_value()
            if layer is not None:
                value = _get_layer_fn()(value, np.int32(layer))
            host = to_hf(rule.layout, _to_host(value)).astype(dtype, copy=False)
            if writer is not None:
                writer.write(entry.name, host)
            del host, value
            bar.update()
        if writer is not None:
            writer.close()
    bar.close()
    if not writer_process:
        return out_dir
    if len(shards) > 1:
        write_index(out_dir, zip(files, shards))
    _write_json(os.path.join(out_dir, "config.json"), config.to_hf(torch_dtype=str(jnp.dtype(dtype))))
    generation = dict(config.generation_config) or {
        k: config.hf_extra[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.hf_extra.get(k) is not None}
    _write_json(os.path.join(out_dir, "generation_config.json"), generation)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out_dir)
    return out_dir


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the HF tokenizer files found in `src` to `dst`; an error if there are none."""
    os.makedirs(dst, exist_ok=True)
    found = tokenizer_files(src)
    for file in found:
        shutil.copyfile(file, os.path.join(os.fspath(dst), os.path.basename(file)))
    return [os.path.basename(f) for f in found]


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
