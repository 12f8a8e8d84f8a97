"""Orbax parameter checkpoints that carry their config: resharding restore, refusal of mismatches."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from her_jax.model import init_model, preset
from her_jax.parallel import MeshConfig, make_mesh
from her_jax.train.checkpoint import CheckpointMismatchError, load_model, read_model_config, save_model

CONFIG = preset("qwen3-test").replace(num_attention_heads=8, num_key_value_heads=4, head_dim=8)


def leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_save_on_one_mesh_restore_on_another(tmp_path):
    mesh_a = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh_a):
        model = init_model(CONFIG.replace(remat="dots"), mesh=mesh_a, seed=9)
    path = save_model(model, tmp_path / "ckpt")
    assert read_model_config(path) == model.config and read_model_config(path).remat == "dots"

    mesh_b = make_mesh(MeshConfig(fsdp=4, tensor=2))
    restored = load_model(path, mesh=mesh_b)
    assert restored.layers.self_attn.q_proj[...].sharding.mesh.shape == mesh_b.shape
    assert restored.layers.self_attn.q_proj[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    for a, b in zip(leaves(model), leaves(restored)):
        np.testing.assert_array_equal(a, b)

    single = load_model(path, param_dtype="bfloat16")
    assert single.embed_tokens[...].dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(single.norm[...]).astype(np.float32),
                                  np.asarray(model.norm[...]).astype(jax.numpy.bfloat16).astype(np.float32))


def test_mismatched_architecture_is_refused(tmp_path):
    path = save_model(init_model(CONFIG), tmp_path / "ckpt")
    load_model(path, expect=CONFIG.replace(dtype="bfloat16"))  # run-time fields may differ
    with pytest.raises(CheckpointMismatchError, match=r"rope_theta: checkpoint 1000000.0, expected 10.0; "
                                                      r"tie_word_embeddings: checkpoint False, expected True"):
        load_model(path, expect=CONFIG.replace(rope_theta=10.0, tie_word_embeddings=True))


def test_parameters_that_disagree_with_the_stored_config_are_named(tmp_path):
    path = save_model(init_model(CONFIG), tmp_path / "ckpt")
    config_file = os.path.join(path, "model_config", "metadata")
    stored = json.load(open(config_file))
    json.dump({**stored, "intermediate_size": 100}, open(config_file, "w"))
    with pytest.raises(CheckpointMismatchError, match=r"\['layers'\]\['mlp'\]\['down_proj'\] has shape "
                                                      r"\[2, 96, 64\], the config needs \[2, 100, 64\]"):
        load_model(path)
    json.dump({**stored, "tie_word_embeddings": True}, open(config_file, "w"))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \[\"\['lm_head'\]\"\]"):
        load_model(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointMismatchError, match="not a her_jax model checkpoint"):
        load_model(tmp_path)
