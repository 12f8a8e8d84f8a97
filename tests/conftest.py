"""Test environment (DESIGN.md §5): CPU backend with 8 fake devices, libtpu kept quiet.

These must be set before jax is imported anywhere, which is why they live here.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# libtpu lets one process at a time load it; the AOT tests only compile (no TPU is touched), so the
# suite's parallel workers may each load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")


@pytest.fixture
def rng(request):
    """A freshly seeded generator per test; the seed is printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"{request.node.name}: numpy seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def shared_data():
    path = os.path.join(SHARED, "data")
    if not os.path.isdir(path):
        pytest.skip("../shared/data is not present (fresh user checkout)")
    return os.path.abspath(path)
