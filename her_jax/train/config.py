"""Run configuration: one validated tree of dataclasses, from YAML plus `dotted.key=value` overrides.

Unknown keys and values of the wrong type are errors that name the key. The defaults are the
default run (a tiny Qwen3 on the bundled sample corpus, on CPU), so `python -m her_jax.train`
needs no arguments.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from her_jax.data.pipeline import DataConfig
from her_jax.model.config import ATTENTION_IMPLS, DTYPES, REMAT_POLICIES, Qwen3Config
from her_jax.parallel.mesh import MeshConfig
from her_jax.train.loss import LOSS_IMPLS


class ConfigError(ValueError):
    """A run configuration that cannot be used; names the key."""


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: expected one of {list(allowed)}, found {value!r}")


def _positive(key: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{key}: expected a positive number, found {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Where the weights come from: a preset (random init), an HF folder, or a her_jax checkpoint."""

    preset: str = "qwen3-tiny"  # used when neither hf nor checkpoint is given
    hf: str | None = None  # HF model folder (config.json + safetensors) to start from
    checkpoint: str | None = None  # her_jax params checkpoint to start from
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # architecture changes for presets
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute; bfloat16 on accelerators
    remat: str = "full"
    attention_impl: str = "auto"
    init_seed: int = 0

    def __post_init__(self):
        if self.hf and self.checkpoint:
            raise ConfigError("model: set hf or checkpoint, not both")
        if self.overrides and (self.hf or self.checkpoint):
            raise ConfigError("model.overrides: only a preset's architecture can be changed")
        known = {f.name for f in dataclasses.fields(Qwen3Config)} - {"hf_extra", "generation_config"}
        for key in self.overrides:
            if key not in known:
                raise ConfigError(f"model.overrides: unknown Qwen3Config field {key!r} (write 'key: value' with a "
                                  "space after the colon)")
        _choice("model.param_dtype", self.param_dtype, DTYPES)
        _choice("model.dtype", self.dtype, DTYPES)
        _choice("model.remat", self.remat, REMAT_POLICIES)
        _choice("model.attention_impl", self.attention_impl, ATTENTION_IMPLS)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and cosine decay, global-norm clipping (METHOD.md §4 defaults)."""

    lr: float = 1e-5
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8

    def __post_init__(self):
        for name in ("lr", "clip_norm", "eps"):
            _positive(f"optim.{name}", getattr(self, name))
        for name in ("warmup_ratio", "min_lr_ratio", "weight_decay", "b1", "b2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 1):
                raise ConfigError(f"optim.{name}: expected a number in [0, 1], found {value!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run. `stage` selects the trainer (SFT now; reward model and RL plug in here)."""

    stage: str = "sft"
    output_dir: str = "runs/default"
    steps: int = 45
    micro_batches: int = 1  # gradient accumulation: each step sums this many micro-batches
    seed: int = 0
    log_every: int = 1
    eval_every: int = 15
    eval_batches: int = 2
    eval_fraction: float = 0.15
    checkpoint_every: int = 15
    keep_checkpoints: int = 2
    max_nonfinite: int = 3  # this many non-finite steps in a row stop the run
    loss_impl: str = "auto"
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    tensorboard: bool = True
    plot: bool = True
    progress: bool = True
    wandb_project: str | None = None
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(seq_len=2048, batch_size=1, num_epochs=None))
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=6e-3, warmup_ratio=0.1))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def __post_init__(self):
        _choice("stage", self.stage, ("sft",))
        for name in ("steps", "micro_batches", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                     "keep_checkpoints", "max_nonfinite"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: expected a positive integer, found {value!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction: expected a number in [0, 1), found {self.eval_fraction!r}")
        _choice("loss_impl", self.loss_impl, LOSS_IMPLS)
        for name in ("z_loss", "label_smoothing"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value < 1):
                raise ConfigError(f"{name}: expected a number in [0, 1), found {value!r}")
        if self.data.batch_size % self.micro_batches:
            raise ConfigError(f"data.batch_size={self.data.batch_size} is not divisible by "
                              f"micro_batches={self.micro_batches}")

    def to_dict(self) -> dict:
        return _plain(self)


def _plain(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    return obj


# -- building from plain data ------------------------------------------------------------------------

def _coerce(key: str, value, hint):
    """`value` checked (and gently converted: int -> float, list -> tuple) against type `hint`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: unexpected null")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {hint.__name__} fields, found {value!r}")
        return build(hint, value, key)
    if origin in (tuple, Sequence) or hint is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, found {value!r}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if origin is Mapping or hint is Mapping or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, found {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, found {value!r}")
        return float(value)
    if hint is int or hint is bool or hint is str:
        if isinstance(value, bool) != (hint is bool) or not isinstance(value, hint):
            raise ConfigError(f"{key}: expected {hint.__name__}, found {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {hint!r}")


def build(cls, data: Mapping, prefix: str = ""):
    """An instance of dataclass `cls` from a mapping; unknown keys and bad values name the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    dotted = lambda name: f"{prefix}.{name}" if prefix else name
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {dotted(unknown[0])!r} (known: {sorted(names)})")
    kwargs = {name: _coerce(dotted(name), value, hints[name]) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}: {e}" if prefix and not str(e).startswith(prefix) else str(e)) from None
    except ValueError as e:  # validation inside DataConfig, LayerWeights, MeshConfig ...
        raise ConfigError(str(e) if not prefix or str(e).startswith(prefix) else f"{prefix}: {e}") from None


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config: defaults, then the YAML file (if any), then `key=value` overrides (YAML values)."""
    tree = _plain(RunConfig())
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        _merge(tree, loaded)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return build(RunConfig, tree)


def _merge(base: dict, new: Mapping) -> None:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value

