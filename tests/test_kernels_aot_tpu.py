"""The Pallas TPU kernels lower and compile for real TPU generations (AOT on this CPU host)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from helpers import TPU_SLICES, tpu_devices

from her_jax.kernels.dual_layer_loss import sharded_token_stats

@pytest.mark.parametrize("generation", sorted(TPU_SLICES))
@pytest.mark.parametrize("hidden", [1024, 4096, 5120])  # Qwen3-0.6B, 8B, 14B/32B widths
def test_fused_loss_compiles_for_tpu(generation, hidden):
    mesh = Mesh(np.array(tpu_devices(generation)), ("data",))
    t, v = 2048 * mesh.size, 151936

    def loss(x, w, y):
        stats = sharded_token_stats(x, w, y, mesh, token_axes=("data",), impl="pallas_tpu", entropy=True)
        return jnp.sum(stats.logprob) + jnp.sum(stats.entropy)

    spec = lambda shape, dtype, p: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, p))
    args = (spec((t, hidden), jnp.bfloat16, P("data", None)), spec((v, hidden), jnp.bfloat16, P()),
            spec((t,), jnp.int32, P("data")))
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    assert compiled.as_text().count("tpu_custom_call") == 3  # forward, dX and dW kernels
    # No [T, V] logits and no weight-sized copies in HBM: only tile-sized temporaries.
    assert compiled.memory_analysis().temp_size_in_bytes < 64 * 2**20
