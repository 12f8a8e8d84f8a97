"""Device meshes with the axes ('data', 'fsdp', 'tensor'), and multi-host initialisation."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from her_jax.parallel.rules import MESH_AXES

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the three mesh axes; one of them may be -1 (all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: expected positive sizes and at most one -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % known:
                raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: {n_devices} devices are not "
                                 f"divisible by the fixed axes' product {known}")
            sizes[sizes.index(-1)] = n_devices // known
        if math.prod(sizes) != n_devices:
            raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices, "
                             f"found {n_devices}")
        return tuple(sizes)


def make_mesh(config: MeshConfig | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh over `devices` (default: all devices of all processes) with `AxisType.Auto` axes.

    Works with the devices of a TPU topology description too (AOT compilation on a CPU host).
    """
    config = config or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    shape = config.resolve(len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    # Several TPU slices joined over the data-centre network: only the data axis crosses slices
    # (one gradient all-reduce per step), FSDP and tensor traffic stays on each slice's ICI.
    data, fsdp, tensor = shape
    if data % slices:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, shape))}: {slices} TPU slices need mesh.data to be a "
                         f"multiple of {slices} (the data axis spans the slices), found data={data}")
    grid = mesh_utils.create_hybrid_device_mesh((data // slices, fsdp, tensor), (slices, 1, 1), devices,
                                                allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Start `jax.distributed` when this is one process of several; return whether it did.

    Explicit arguments win, then the environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
    `JAX_PROCESS_ID`), then cluster auto-detection: a multi-host TPU slice (`TPU_WORKER_HOSTNAMES`
    lists several hosts, as on GKE; on Cloud TPU VMs `HER_DISTRIBUTED=1`, which tpu_scripts/launch.sh
    sets, lets jax read the workers from the VM metadata) or a SLURM job with several tasks.
    A single process needs nothing and gets nothing.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs num_processes and process_id too "
                             "(arguments or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1 or \
            int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("HER_DISTRIBUTED") == "1":
        jax.distributed.initialize()
    else:
        return False
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
