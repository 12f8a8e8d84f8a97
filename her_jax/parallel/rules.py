"""The one table that maps logical axis names to mesh axes, and the helpers that apply it.

Every parameter carries `logical_axes` metadata and every activation constraint names logical
axes; this module turns those names into `PartitionSpec`s for the mesh in use. A mesh axis that
does not divide its dimension is an error naming the tensor, never a silent fallback.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis, tuple of mesh axes, or None (replicated).
# Parameters: pure FSDP over the model width, tensor parallel over heads, MLP width and vocab.
# Activations: batch over data x fsdp, features over tensor.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_seq", None),
)

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


class ShardingError(ValueError):
    """A partitioning that cannot be applied, naming the tensor, dimension and mesh axes."""


def make_rules(overrides: Mapping[str, str | Sequence[str] | None] | None = None) -> Rules:
    """DEFAULT_RULES with some entries replaced (e.g. `{"vocab": None}`); unknown names are errors."""
    table = dict(DEFAULT_RULES)
    for name, axes in (overrides or {}).items():
        if name not in table:
            raise ShardingError(f"sharding rule override for unknown logical axis {name!r}; known: {sorted(table)}")
        if axes is not None and not isinstance(axes, str):
            axes = tuple(axes)
        for a in (axes,) if isinstance(axes, str) else axes or ():
            if a not in MESH_AXES:
                raise ShardingError(f"sharding rule {name!r} -> {axes!r}: {a!r} is not a mesh axis {MESH_AXES}")
        table[name] = axes
    return tuple(table.items())


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh,
                    rules: Rules = DEFAULT_RULES, what: str = "tensor") -> PartitionSpec:
    """PartitionSpec for a tensor of `shape` whose dimensions are named `logical_axes`.

    Mesh axes that the mesh lacks (or that have size 1) are left out; a mesh axis used twice in
    one tensor, or a product of axis sizes that does not divide the dimension, raises
    `ShardingError` naming `what`.
    """
    if len(logical_axes) != len(shape):
        raise ShardingError(f"{what}: {len(logical_axes)} logical axes {tuple(logical_axes)} "
                            f"for a tensor of rank {len(shape)} {tuple(shape)}")
    table = dict(rules)
    sizes = dict(mesh.shape)
    used: set[str] = set()
    parts = []
    for dim, (size, name) in enumerate(zip(shape, logical_axes)):
        if name is None:
            parts.append(None)
            continue
        if name not in table:
            raise ShardingError(f"{what}: logical axis {name!r} has no sharding rule")
        axes = table[name]
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if sizes.get(a, 1) > 1)
        for a in axes:
            if a in used:
                raise ShardingError(f"{what}: mesh axis {a!r} would shard two dimensions "
                                    f"(logical axes {tuple(logical_axes)})")
            used.add(a)
        n = math.prod(sizes[a] for a in axes)
        if size % n:
            raise ShardingError(f"{what}: dimension {dim} ({name!r}, size {size}) is not divisible by mesh "
                                f"axes {axes} of total size {n}; shape {tuple(shape)}")
        parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*parts)


def path_name(path) -> str:
    """'layers/mlp/up_proj' for a pytree key path (nnx Variable 'value' steps left out)."""
    keys = []
    for k in path:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        if key != "value":
            keys.append(str(key))
    return "/".join(keys)


def state_shardings(state, mesh, rules: Rules = DEFAULT_RULES):
    """A pytree of `NamedSharding`s (one per nnx Variable of `state`, which may also hold plain
    scalar arrays such as optimizer counters) on `mesh`; with `mesh=None`, everything on the first
    local device."""

    def one(path, var):
        if mesh is None:
            return SingleDeviceSharding(jax.local_devices()[0])
        name = path_name(path)
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
        if axes is None and value.ndim == 0:  # counters and other scalars (e.g. optimizer step counts)
            return NamedSharding(mesh, PartitionSpec())
        if axes is None:
            raise ShardingError(f"parameter '{name}' carries no logical_axes metadata")
        spec = logical_to_spec(axes, value.shape, mesh, rules, what=f"parameter '{name}'")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules, what: str) -> jax.Array:
    """Sharding constraint on an activation under the current mesh (`jax.set_mesh`); no-op without one.

    Active on every backend (CPU included), so tests on fake CPU devices exercise the same
    constraints as a TPU run.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh, rules, what=f"activation '{what}'")
    return jax.lax.with_sharding_constraint(x, spec)


def partition_specs(state, mesh_shape: Mapping[str, int], rules: Rules = DEFAULT_RULES) -> dict[str, dict]:
    """{parameter path: {"shape", "dtype", "spec"}} of an (abstract) model state on a mesh of these
    axis sizes: the whole layout in a JSON-ready form (golden snapshots, docs). No devices needed."""
    out = {}
    for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        name = path_name(path)
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
        if axes is None:
            raise ShardingError(f"parameter '{name}' carries no logical_axes metadata")
        spec = logical_to_spec(axes, value.shape, _Sizes(mesh_shape), rules, what=f"parameter '{name}'")
        out[name] = {"shape": list(value.shape), "dtype": str(value.dtype),
                     "spec": [list(p) if isinstance(p, tuple) else p for p in spec]}
    return out


class _Sizes:
    """Stands in for a mesh where only the axis sizes matter."""

    def __init__(self, shape: Mapping[str, int]):
        self.shape = dict(shape)
