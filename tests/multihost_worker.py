"""One process of the two-process test in test_multihost.py (run as a script, not collected)."""

import os
import sys

import numpy as np


def main(process_id: int, port: int, hf_folder: str, out: str) -> None:
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    from her_jax.convert.hf import load_hf, save_hf
    from her_jax.parallel import MeshConfig, initialize_distributed, make_mesh

    assert initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = load_hf(hf_folder, mesh=mesh, progress=False)
    for leaf in jax.tree.leaves(nnx.state(model)):
        # Each process holds (and built) only the shards of its own four devices.
        assert not leaf.is_fully_addressable
        assert {s.device.process_index for s in leaf.addressable_shards} == {process_id}

    tokens = np.load(os.path.join(out, "tokens.npy"))
    local = tokens.reshape(2, -1, tokens.shape[1])[process_id]
    with jax.set_mesh(mesh):
        batch = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec(("data", "fsdp"))), local)
        logits = nnx.jit(lambda m, t: m(t))(model, batch)
    full = multihost_utils.process_allgather(logits, tiled=True)
    save_hf(model, os.path.join(out, "export"), progress=False)
    if process_id == 0:
        np.save(os.path.join(out, "logits.npy"), np.asarray(full))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
