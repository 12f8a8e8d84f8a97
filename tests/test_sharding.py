"""The model on the 8-device CPU mesh: same logits under every layout, real shards, named errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import hf_logits, hf_model, rel_err, save_hf_model
from jax.sharding import PartitionSpec as P

from her_jax.convert.hf import load_hf
from her_jax.model import init_model, preset
from her_jax.parallel import MeshConfig, ShardingError, make_mesh, make_rules
from her_jax.parallel.rules import logical_to_spec

# Divisible by 8 wherever a rule may shard: vocab, width, heads, kv heads, MLP width; GQA 2.
SHARDABLE = dict(vocab_size=128, hidden_size=64, num_attention_heads=16, num_key_value_heads=8, head_dim=8,
                 intermediate_size=96, num_hidden_layers=2)

LAYOUTS = {
    "fsdp": ((1, 8, 1), P(None, "fsdp", None, None), P(None, "fsdp")),
    "tensor": ((1, 1, 8), P(None, None, "tensor", None), P("tensor", None)),
    "mixed": ((2, 2, 2), P(None, "fsdp", "tensor", None), P("tensor", "fsdp")),
}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    hf = hf_model(11, **SHARDABLE)
    return hf, save_hf_model(hf, tmp_path_factory.mktemp("hf") / "model")


def sharded_forward(model, mesh, tokens):
    with jax.set_mesh(mesh):
        fn = nnx.jit(lambda m, t: m(t))
        return np.asarray(fn(model, tokens)), fn.lower(model, tokens).as_text()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_same_logits_under_every_layout(hf_folder, rng, layout):
    hf, folder = hf_folder
    shape, q_spec, embed_spec = LAYOUTS[layout]
    mesh = make_mesh(MeshConfig(*shape))
    model = load_hf(folder, mesh=mesh, progress=False)
    q = model.layers.self_attn.q_proj[...]
    assert q.sharding.spec == q_spec and model.embed_tokens[...].sharding.spec == embed_spec
    # Real shards: each device holds only its piece.
    expected = tuple(d // np.prod([mesh.shape[a] for a in ((s,) if isinstance(s, str) else s or ())], dtype=int)
                     for d, s in zip(q.shape, q_spec))
    assert all(s.data.shape == expected for s in q.addressable_shards)

    tokens = rng.integers(0, 128, (8, 12)).astype(np.int32)
    logits, hlo = sharded_forward(model, mesh, tokens)
    assert rel_err(logits, hf_logits(hf, tokens)) <= 1e-4
    unsharded = np.asarray(nnx.jit(lambda m, t: m(t))(load_hf(folder, progress=False), tokens))
    assert rel_err(logits, unsharded) <= 1e-5
    # Activation constraints are in the program on CPU too.
    assert "sharding_constraint" in hlo or "@Sharding" in hlo


def test_sharded_init_builds_only_shards():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    config = preset("qwen3-test").replace(num_key_value_heads=4, num_attention_heads=8, head_dim=8)
    with jax.set_mesh(mesh):
        model = init_model(config, mesh=mesh, seed=3)
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]:
        spec = leaf.sharding.spec
        factor = [np.prod([mesh.shape[a] for a in ((s,) if isinstance(s, str) else s or ())], dtype=int)
                  for s in tuple(spec) + (None,) * (leaf.ndim - len(spec))]
        assert leaf.addressable_shards[0].data.shape == tuple(d // f for d, f in zip(leaf.shape, factor)), path
    assert model.layers.mlp.gate_proj[...].sharding.spec == P(None, "fsdp", "tensor")
    # Same seed, same values as an unsharded init.
    np.testing.assert_array_equal(np.asarray(model.layers.mlp.gate_proj[...]),
                                  np.asarray(init_model(config, seed=3).layers.mlp.gate_proj[...]))


def test_indivisible_parameter_is_an_error_naming_it():
    mesh = make_mesh(MeshConfig(tensor=8, fsdp=1))
    with pytest.raises(ShardingError, match=r"parameter 'layers/self_attn/k_proj': dimension 2 \('kv_heads', "
                                            r"size 2\) is not divisible by mesh axes \('tensor',\)"):
        init_model(preset("qwen3-test"), mesh=mesh)


def test_indivisible_activation_is_an_error_naming_it(hf_folder):
    _, folder = hf_folder
    mesh = make_mesh(MeshConfig(fsdp=8))
    model = load_hf(folder, mesh=mesh, progress=False)
    with jax.set_mesh(mesh), pytest.raises(ShardingError, match=r"activation 'embed': dimension 0 \('act_batch'"):
        nnx.jit(lambda m, t: m(t))(model, np.zeros((3, 4), np.int32))


def test_rule_overrides():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = make_rules({"vocab": None, "mlp": ("tensor", "data")})
    assert logical_to_spec(("vocab", "embed"), (128, 64), mesh, rules) == P(None, "fsdp")
    assert logical_to_spec(("embed", "mlp"), (64, 96), mesh, rules) == P("fsdp", ("tensor", "data"))
    with pytest.raises(ShardingError, match="unknown logical axis 'vocabulary'"):
        make_rules({"vocabulary": None})
    with pytest.raises(ShardingError, match="'model' is not a mesh axis"):
        make_rules({"vocab": "model"})
    with pytest.raises(ShardingError, match="would shard two dimensions"):
        logical_to_spec(("embed", "embed"), (64, 64), mesh)
    with jax.set_mesh(mesh):
        model = init_model(preset("qwen3-test").replace(num_key_value_heads=4, num_attention_heads=8, head_dim=8),
                           mesh=mesh, rules=rules)
    assert model.embed_tokens[...].sharding.spec == P(None, "fsdp")


def test_mesh_config_errors():
    assert MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
    with pytest.raises(ValueError, match="need 16 devices, found 8"):
        make_mesh(MeshConfig(data=2, fsdp=4, tensor=2))
    with pytest.raises(ValueError, match="at most one -1"):
        MeshConfig(data=-1, fsdp=-1).resolve(8)
    with pytest.raises(ValueError, match="not divisible"):
        MeshConfig(data=3, fsdp=-1).resolve(8)


def test_distributed_init_needs_nothing_for_one_process(monkeypatch):
    from her_jax.parallel import initialize_distributed

    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    assert initialize_distributed() is False
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    with pytest.raises(ValueError, match="needs num_processes and process_id"):
        initialize_distributed()
