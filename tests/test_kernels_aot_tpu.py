"""The Pallas TPU kernels lower and compile for real TPU generations (AOT on this CPU host)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from her_jax.kernels.dual_layer_loss import sharded_token_stats

TOPOLOGIES = {"v5e": ("v5e:2x2", "default"), "v5p": ("v5:2x2x1", "megacore"), "v6e": ("v6e:2x2", "default")}


def topology_mesh(name):
    from jax.experimental import topologies

    topology, chip = TOPOLOGIES[name]
    try:
        topo = topologies.get_topology_desc(topology_name=topology, platform="tpu", chip_config_name=chip,
                                            chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False,) * 3)
    except RuntimeError as e:
        if "TPU support not installed" in str(e):
            pytest.skip("libtpu is not installed")
        raise
    return Mesh(np.array(topo.devices), ("data",))


@pytest.mark.parametrize("generation", sorted(TOPOLOGIES))
@pytest.mark.parametrize("hidden", [1024, 5120])
def test_fused_loss_compiles_for_tpu(generation, hidden):
    mesh = topology_mesh(generation)
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
