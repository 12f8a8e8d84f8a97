"""AOT-compile a forward+backward step of the real model for a TPU topology, on this CPU host.

The TPU compiler really runs (libtpu): sharding, fusion and HBM accounting are TPU's own, and an
out-of-memory program would fail here. Skipped only when libtpu is not installed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from helpers import tpu_devices

from her_jax.model import abstract_model, preset
from her_jax.parallel import MeshConfig, make_mesh
from her_jax.parallel.rules import state_shardings


def test_train_step_compiles_for_v5p_and_fits(capsys):
    devices = tpu_devices("v5p")
    mesh = make_mesh(MeshConfig(fsdp=-1), devices=devices)
    # Qwen3-0.6B widths (query width 2048 != hidden 1024, GQA 2, real vocabulary), two layers.
    config = preset("qwen3-0.6b", param_dtype="float32", dtype="bfloat16", remat="full").replace(num_hidden_layers=2)
    graphdef, state = nnx.split(abstract_model(config))
    shardings = state_shardings(state, mesh)
    abstract_state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings,
                                  is_leaf=lambda x: isinstance(x, nnx.Variable))
    batch, length = 8, 1024
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32,
                                  sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))

    def step(state, tokens):
        def loss(state):
            logits = nnx.merge(graphdef, state)(tokens)
            logp = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

        return jax.value_and_grad(loss)(state)

    with jax.set_mesh(mesh):
        compiled = jax.jit(step, out_shardings=(None, shardings)).lower(abstract_state, tokens).compile()
    memory = compiled.memory_analysis()
    with capsys.disabled():
        print(f"\nAOT v5p-8 (4 chips), Qwen3-0.6B widths x 2 layers, B={batch} T={length}: per chip "
              f"args {memory.argument_size_in_bytes / 2**20:.1f} MiB, out {memory.output_size_in_bytes / 2**20:.1f} MiB, "
              f"temp {memory.temp_size_in_bytes / 2**20:.1f} MiB")

    param_bytes = sum(math.prod(v.shape) * v.dtype.itemsize for v in jax.tree.leaves(abstract_state))
    # FSDP over 4 chips: each chip holds a quarter of the parameters (plus its token shard), and
    # the gradient comes out sharded the same way.
    assert param_bytes / 4 <= memory.argument_size_in_bytes <= param_bytes / 4 * 1.05 + 2**20
    assert memory.output_size_in_bytes <= param_bytes / 4 * 1.05 + 2**20
    assert 0 < memory.temp_size_in_bytes < 8 * 2**30
    assert "all-gather" in compiled.as_text() and "reduce-scatter" in compiled.as_text()
