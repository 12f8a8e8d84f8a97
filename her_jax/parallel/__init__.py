"""Device meshes, the logical-axis rule table, and multi-host start-up."""

from her_jax.parallel.mesh import MeshConfig, initialize_distributed, make_mesh
from her_jax.parallel.rules import DEFAULT_RULES, ShardingError, make_rules

__all__ = ["DEFAULT_RULES", "MeshConfig", "ShardingError", "initialize_distributed", "make_mesh", "make_rules"]
