"""Orbax checkpoints of model parameters that carry their model config.

A checkpoint folder holds Orbax items: `params` (the parameter tree, sharded on save and restored
straight into the target sharding), `model_config` (JSON of `Qwen3Config`) and, optionally,
`tokenizer` (the HF tokenizer files as text, so an export is complete without the source). Loading
builds the model from the stored config; a caller that expects a particular architecture passes
it and a mismatch is refused before any tensor is read.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from her_jax.data.tokenizer import tokenizer_files
from her_jax.model.config import ARCH_FIELDS, Qwen3Config
from her_jax.model.qwen3 import Qwen3, abstract_model
from her_jax.parallel.rules import DEFAULT_RULES, Rules, state_shardings

PARAMS, MODEL_CONFIG, TOKENIZER = "params", "model_config", "tokenizer"


class CheckpointMismatchError(ValueError):
    """A checkpoint whose model does not match what the caller expects (fields named)."""


def _checkpointer() -> ocp.Checkpointer:
    # A training step folder also holds the optimizer state and the loop state: known, not restored here.
    handler = ocp.CompositeCheckpointHandler(**{PARAMS: ocp.StandardCheckpointHandler(),
                                                MODEL_CONFIG: ocp.JsonCheckpointHandler(),
                                                TOKENIZER: ocp.JsonCheckpointHandler(),
                                                "opt_state": ocp.StandardCheckpointHandler(),
                                                "train": ocp.JsonCheckpointHandler()})
    return ocp.Checkpointer(handler)


def resolve(path: str | os.PathLike) -> str:
    """A model checkpoint folder from what a user may pass: the folder itself, a training run
    folder (its `final/` export, else its newest step), or a run's `checkpoints/` folder."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(os.path.join(path, MODEL_CONFIG)):
        return path
    if os.path.isdir(os.path.join(path, "final", MODEL_CONFIG)):
        return os.path.join(path, "final")
    steps_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    steps = sorted((int(n) for n in os.listdir(steps_dir) if n.isdigit()), reverse=True) \
        if os.path.isdir(steps_dir) else []
    for step in steps:
        if os.path.isdir(os.path.join(steps_dir, str(step), MODEL_CONFIG)):
            return os.path.join(steps_dir, str(step))
    return path


def save_model(model: Qwen3, path: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
               force: bool = False) -> str:
    """Save the parameters and config of `model` (and the HF tokenizer files found in
    `tokenizer_dir`) to `path`. All processes call this."""
    path = os.path.abspath(os.fspath(path))
    items = {
        PARAMS: ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
        MODEL_CONFIG: ocp.args.JsonSave(model.config.to_json_dict()),
    }
    if tokenizer_dir is not None:
        files = {}
        for file in tokenizer_files(tokenizer_dir):
            with open(file, encoding="utf-8") as f:
                files[os.path.basename(file)] = f.read()
        items[TOKENIZER] = ocp.args.JsonSave(files)
    with _checkpointer() as ckptr:
        ckptr.save(path, ocp.args.Composite(**items), force=force)
    return path


def restore_tokenizer(path: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Write the tokenizer files stored in checkpoint `path` into `out_dir`; [] if it has none."""
    path = resolve(path)
    if not os.path.isdir(os.path.join(path, TOKENIZER)):
        return []
    with _checkpointer() as ckptr:
        files = ckptr.restore(path, args=ocp.args.Composite(**{TOKENIZER: ocp.args.JsonRestore()}))[TOKENIZER]
    os.makedirs(out_dir, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(os.fspath(out_dir), os.path.basename(name)), "w", encoding="utf-8") as f:
            f.write(text)
    return sorted(files)


def read_model_config(path: str | os.PathLike) -> Qwen3Config:
    path = resolve(path)
    if not os.path.isdir(os.path.join(path, MODEL_CONFIG)):
        raise CheckpointMismatchError(f"{path}: not a her_jax model checkpoint (no '{MODEL_CONFIG}' item)")
    with _checkpointer() as ckptr:
        stored = ckptr.restore(path, args=ocp.args.Composite(**{MODEL_CONFIG: ocp.args.JsonRestore()}))
    return Qwen3Config.from_json_dict(stored[MODEL_CONFIG])


def load_model(path: str | os.PathLike, *, mesh=None, expect: Qwen3Config | None = None,
               rules: Rules = DEFAULT_RULES, **runtime) -> Qwen3:
    """Restore a model saved by `save_model` (or a training checkpoint step holding the same items).

    mesh: target mesh (default: the first local device). expect: refuse the load unless the
    stored architecture equals this config's. runtime: our run-time fields to change
    (`param_dtype`, `dtype`, `remat`); parameters are cast to `param_dtype` on restore.
    """
    path = resolve(path)
    config = read_model_config(path)
    if expect is not None:
        diff = {f: (getattr(config, f), getattr(expect, f)) for f in ARCH_FIELDS
                if getattr(config, f) != getattr(expect, f)}
        if diff:
            details = "; ".join(f"{f}: checkpoint {a!r}, expected {b!r}" for f, (a, b) in diff.items())
            raise CheckpointMismatchError(f"{path}: model config does not match: {details}")
    config = config.replace(**runtime)
    graphdef, state = nnx.split(abstract_model(config, rules))
    shardings = state_shardings(state, mesh, rules)
    target = nnx.to_pure_dict(jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                                           state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    with _checkpointer() as ckptr:
        stored = ckptr.metadata(path).item_metadata[PARAMS]
        _check_tree(path, getattr(stored, "tree", stored), target)
        restored = ckptr.restore(path, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))
    nnx.replace_by_pure_dict(state, restored[PARAMS])
    return nnx.merge(graphdef, state)


def _check_tree(path: str, stored, target) -> None:
    """Same parameter names and shapes in the checkpoint as the config implies, or a named error."""
    flat_stored = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
    flat_target = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(target)[0]}
    missing = sorted(set(flat_target) - set(flat_stored))
    extra = sorted(set(flat_stored) - set(flat_target))
    if missing or extra:
        raise CheckpointMismatchError(f"{path}: parameters differ from the stored config's model: "
                                      f"missing {missing[:5]}, unexpected {extra[:5]}")
    for name, want in flat_target.items():
        got = tuple(flat_stored[name].shape)
        if got != tuple(want.shape):
            raise CheckpointMismatchError(f"{path}: parameter {name} has shape {list(got)}, the config "
                                          f"needs {list(want.shape)}")
