"""TPU slices by their Cloud names (`v5p-64`, `v6e-16`, `v5e-256`, multi-slice `2xv5p-64`) as device
lists for AOT compilation on any host, libtpu installed (`jax.experimental.topologies`).

Cloud names count TensorCores for v4 and v5p (two per chip, fused as one "megacore" device) and
chips for v5e and v6e; either way the devices of the topology are chips.
"""

from __future__ import annotations

import dataclasses
import re

# generation -> (topology prefix, chip config, TensorCores per chip, 3-D torus, HBM GiB per chip)
_GENERATIONS = {
    "v4": ("v4", "megacore", 2, True, 32.0),
    "v5p": ("v5", "megacore", 2, True, 95.0),
    "v5e": ("v5e", "default", 1, False, 16.0),
    "v6e": ("v6e", "default", 1, False, 32.0),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}
_NAME = re.compile(r"^(?:(\d+)x)?([a-z0-9]+)-(\d+)$")


class TopologyError(ValueError):
    """A slice name that does not describe a TPU slice we can build."""


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A named TPU slice (or several identical slices joined over the data-centre network)."""

    name: str  # as given, e.g. "2xv5p-64"
    generation: str  # v4, v5p, v5e, v6e
    chips: int  # per slice
    shape: tuple[int, ...]  # chip grid of one slice
    num_slices: int
    hbm_gib: float  # per chip

    @property
    def num_devices(self) -> int:
        return self.chips * self.num_slices

    @property
    def topology_name(self) -> str:
        return f"{_GENERATIONS[self.generation][0]}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_host(self) -> tuple[int, int, int]:
        if len(self.shape) == 2 and self.chips == 8:  # v5e-8 / v6e-8: one host with 8 chips
            return (2, 4, 1)
        return (min(2, self.shape[0]), min(2, self.shape[1]), 1)

    @property
    def num_hosts(self) -> int:
        a, b, c = self.chips_per_host
        return self.num_slices * max(1, self.chips // (a * b * c))

    def devices(self) -> list:
        """The slice's devices (chips), ordered slice by slice. Needs libtpu (`pip install '.[tpu]'`)."""
        from jax.experimental import topologies

        try:
            topo = topologies.get_topology_desc(
                topology_name=self.topology_name, platform="tpu", chip_config_name=_GENERATIONS[self.generation][1],
                chips_per_host_bounds=self.chips_per_host, num_slices=self.num_slices, wrap=(False,) * 3)
        except RuntimeError as e:
            if "TPU support not installed" in str(e):
                raise RuntimeError("AOT compilation for TPU needs libtpu: pip install -e '.[tpu]' "
                                   "(jax[tpu]==0.10.2)") from e
            raise
        return list(topo.devices)


def _grid(chips: int, three_d: bool) -> tuple[int, ...]:
    """The chip grid Cloud uses for a slice of `chips` chips (powers of two)."""
    if three_d:
        if chips == 4:
            return (2, 2, 1)
        dims = [2, 2, 2]
        while dims[0] * dims[1] * dims[2] < chips:  # 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4 -> 4x4x8 ...
            smallest = min(dims)
            i = max(j for j, d in enumerate(dims) if d == smallest)
            dims[i] *= 2
        return tuple(dims)
    if chips == 1:
        return (1, 1)
    dims = [2, 2]
    while dims[0] * dims[1] < chips:  # 2x2 -> 2x4 -> 4x4 -> 4x8 -> 8x8 ...
        dims[1 if dims[0] == dims[1] else 0] *= 2
    return tuple(dims)


def parse_slice(name: str) -> TpuSlice:
    """`v5p-32`, `v6e-64`, `v5e-256` (`v5litepod-256`), `v4-16`, multi-slice `2xv5p-64`."""
    m = _NAME.match(name.strip().lower())
    if not m:
        raise TopologyError(f"TPU slice {name!r}: expected a name like v5p-32, v6e-64, v5e-256 or 2xv5p-64")
    slices = int(m.group(1) or 1)
    generation = _ALIASES.get(m.group(2), m.group(2))
    if generation not in _GENERATIONS:
        raise TopologyError(f"TPU slice {name!r}: unknown generation {m.group(2)!r}; expected one of "
                            f"{sorted(_GENERATIONS)}")
    _, _, cores_per_chip, three_d, hbm = _GENERATIONS[generation]
    size = int(m.group(3))
    chips = size // cores_per_chip
    smallest = 4 if three_d else 1
    if size % cores_per_chip or chips < smallest or chips & (chips - 1) or slices < 1:
        unit = "TensorCores (2 per chip)" if cores_per_chip == 2 else "chips"
        raise TopologyError(f"TPU slice {name!r}: the number after the dash counts {unit}; expected a power of two "
                            f"of at least {smallest * cores_per_chip}, found {size}")
    if not three_d and chips not in (1, 4) and chips < 8:
        raise TopologyError(f"TPU slice {name!r}: {generation} slices have 1, 4, 8, 16, ... chips, found {chips}")
    return TpuSlice(name=name, generation=generation, chips=chips, shape=_grid(chips, three_d), num_slices=slices,
                    hbm_gib=hbm)
