"""The fused LM-head loss against a float64 reference on fresh random inputs (KERNELS.md §1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from her_jax.kernels.dual_layer_loss import dual_layer_loss, reference_token_stats, token_stats

IMPLS = ["xla_chunked", "pallas_tpu", "pallas_gpu"]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def problem(rng, t, h, v, vocab_size=None, dtype=np.float32, scale=0.3):
    x = rng.standard_normal((t, h)).astype(dtype)
    w = (rng.standard_normal((v, h)) * scale).astype(dtype)
    vocab_size = vocab_size or v
    y = rng.integers(0, vocab_size, t)
    y[:3] = [0, vocab_size - 1, vocab_size // 2]  # first, last and middle ids
    cot = [rng.standard_normal(t) for _ in range(3)]
    return x, w, y, vocab_size, cot


def objective(stats_fn, cot):
    def f(x, w):
        s = stats_fn(x, w)
        return jnp.sum(s.logprob * cot[0]) + jnp.sum(s.lse * cot[1]) + jnp.sum(s.entropy * cot[2]), s
    return f


def reference64(x, w, y, vocab_size, cot, temperature=1.0):
    with jax.enable_x64(True):
        f = objective(lambda x, w: reference_token_stats(x, w, jnp.asarray(y), vocab_size=vocab_size,
                                                         temperature=temperature, entropy=True), cot)
        (_, s), g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(np.asarray(x, np.float64),
                                                                         np.asarray(w, np.float64))
        return jax.tree.map(np.asarray, (s, g))


# T not a multiple of the token tile, V not a multiple of the vocab tile, padded rows, temperature,
# a hidden size that is not a power of two (the GPU kernel then sums 3 hidden slices of 16).
SHAPES = [(203, 64, 1000, None, 1.0), (64, 128, 777, 700, 0.7), (300, 32, 4096, 4000, 1.3), (17, 16, 100, None, 1.0),
          (40, 48, 500, None, 1.0)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t,h,v,vocab_size,temperature", SHAPES)
def test_matches_float64_reference(rng, impl, t, h, v, vocab_size, temperature):
    x, w, y, vs, cot = problem(rng, t, h, v, vocab_size)
    (s64, g64) = reference64(x, w, y, vs, cot, temperature)
    kw = dict(vocab_size=vs, temperature=temperature, entropy=True, impl=impl, block_t=64, block_v=128,
              interpret=True)
    f = objective(lambda x, w: token_stats(x, w, jnp.asarray(y), **kw), cot)
    (_, s), g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(jnp.asarray(x), jnp.asarray(w))
    for name in ("logprob", "lse", "entropy"):
        assert rel(getattr(s, name), getattr(s64, name)) <= 1e-5, name
    assert rel(g[0], g64[0]) <= 1e-4 and rel(g[1], g64[1]) <= 1e-4
    if vs < v:
        assert not np.asarray(g[1])[vs:].any()  # padded rows get no gradient


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_within_naive_bf16_error(rng, impl):
    """bf16 inputs: the error against the f64 reference is no worse than a naive bf16 computation's + 1e-2."""
    x, w, y, vs, cot = problem(rng, 256, 64, 2000)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    s64, g64 = reference64(np.asarray(xb, np.float32), np.asarray(wb, np.float32), y, vs, cot)
    f = objective(lambda x, w: token_stats(x, w, jnp.asarray(y), entropy=True, impl=impl, block_t=128,
                                           block_v=256, interpret=True), cot)
    (_, s), g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(xb, wb)

    def naive(x, w):
        z = jnp.einsum("th,vh->tv", x, w).astype(jnp.bfloat16).astype(jnp.float32)  # bf16 logits
        lse = jax.nn.logsumexp(z, axis=-1)
        return jnp.take_along_axis(z, jnp.asarray(y)[:, None], 1)[:, 0] - lse, lse

    lp_naive, lse_naive = naive(xb, wb)
    assert rel(s.logprob, s64.logprob) <= rel(lp_naive, s64.logprob) + 1e-2
    assert rel(s.lse, s64.lse) <= rel(lse_naive, s64.lse) + 1e-2
    assert g[0].dtype == jnp.bfloat16 and g[1].dtype == jnp.bfloat16
    assert rel(g[0], g64[0]) <= 2e-2 and rel(g[1], g64[1]) <= 2e-2


def test_forward_only_keeps_no_residuals(rng):
    x, w, y, vs, _ = problem(rng, 128, 32, 500)
    s = jax.lax.stop_gradient(token_stats(jnp.asarray(x), jnp.asarray(w), jnp.asarray(y), impl="xla_chunked"))
    ref = reference_token_stats(x, w, jnp.asarray(y))
    assert rel(s.logprob, ref.logprob) <= 1e-5 and s.entropy is None


def test_confident_and_extreme_rows(rng):
    """p(target) close to 1 and logits scaled x100: no overflow, no NaN."""
    x, w, y, vs, cot = problem(rng, 64, 32, 300)
    w[y[:32]] = x[:32] * 3  # the target row aligned with the hidden state
    x = x * 10
    s64, g64 = reference64(x, w, y, vs, cot)
    f = objective(lambda x, w: token_stats(x, w, jnp.asarray(y), entropy=True, impl="xla_chunked", block_t=32,
                                           block_v=64), cot)
    (_, s), g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(jnp.asarray(x), jnp.asarray(w))
    assert np.isfinite(np.asarray(s.lse)).all() and np.isfinite(np.asarray(g[1])).all()
    assert rel(s.lse, s64.lse) <= 1e-5 and rel(g[0], g64[0]) <= 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_dual_layer_loss_per_layer_sums_and_gradients(rng, impl):
    t, h, v, layers = 150, 32, 400, 8
    x, w, y, vs, _ = problem(rng, t, h, v)
    layer_ids = rng.integers(0, layers, t)
    layer_ids[layer_ids == 3] = 4  # an empty layer
    weights = np.where(rng.random(t) < 0.3, 0.0, rng.uniform(0.5, 2.0, t)).astype(np.float32)
    z_loss, eps = 1e-3, 0.1

    def ours(x, w):
        out = dual_layer_loss(x, w, jnp.asarray(y), jnp.asarray(weights), jnp.asarray(layer_ids), layers,
                              z_loss=z_loss, label_smoothing=eps, impl=impl, block_t=64, block_v=128, interpret=True)
        return out.loss_sum, out

    def reference(x, w):
        z = x @ w.T
        lse = jax.nn.logsumexp(z, axis=-1)
        nll = lse - jnp.take_along_axis(z, jnp.asarray(y)[:, None], 1)[:, 0]
        per = (1 - eps) * nll + eps * (lse - z.mean(axis=-1)) + z_loss * lse ** 2
        return jnp.sum(per * weights), nll

    (loss, out), g = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(jnp.asarray(x), jnp.asarray(w))
    with jax.enable_x64(True):
        (ref, nll), g64 = jax.value_and_grad(reference, argnums=(0, 1), has_aux=True)(
            np.asarray(x, np.float64), np.asarray(w, np.float64))
    assert rel(loss, ref) <= 1e-5 and rel(g[0], g64[0]) <= 1e-4 and rel(g[1], g64[1]) <= 1e-4
    assert float(out.weight_sum) == pytest.approx(weights.sum(), rel=1e-6)
    trained = weights > 0
    for layer in range(layers):
        mask = trained & (layer_ids == layer)
        assert float(out.layer_count[layer]) == mask.sum()
        assert float(out.layer_nll[layer]) == pytest.approx(float(np.asarray(nll)[mask].sum()), rel=1e-5, abs=1e-6)
    assert out.layer_count[3] == 0 and out.layer_nll[3] == 0


def test_errors_name_the_problem():
    x, w, y = jnp.zeros((4, 8)), jnp.zeros((10, 8)), jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match=r"expected hidden \[T, H\] and weight \[V, H\]"):
        token_stats(x, jnp.zeros((10, 9)), y)
    with pytest.raises(ValueError, match="targets should be"):
        token_stats(x, w, jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="vocab_size 11 outside"):
        token_stats(x, w, y, vocab_size=11)
    with pytest.raises(ValueError, match="impl 'fast'"):
        token_stats(x, w, y, impl="fast")


@pytest.mark.parametrize("impl", IMPLS)
def test_token_sharded_equals_unsharded(rng, impl):
    from her_jax.kernels.dual_layer_loss import sharded_token_stats
    from her_jax.parallel import MeshConfig, make_mesh

    x, w, y, vs, cot = problem(rng, 256, 32, 500)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    kw = dict(impl=impl, entropy=True, block_t=16, block_v=128, interpret=True)

    def f(x, w, sharded):
        s = sharded_token_stats(x, w, jnp.asarray(y), mesh, **kw) if sharded else token_stats(x, w, jnp.asarray(y), **kw)
        return jnp.sum(s.logprob * cot[0]) + jnp.sum(s.entropy * cot[2])

    ref = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w), False)
    with jax.set_mesh(mesh):
        got = jax.jit(jax.value_and_grad(f, argnums=(0, 1)), static_argnums=2)(jnp.asarray(x), jnp.asarray(w), True)
    # f32 sums in another order (KERNELS.md: 1e-5; a dW reduced 4x instead of once would be off by 3)
    assert rel(got[0], ref[0]) <= 1e-5
    assert rel(got[1][0], ref[1][0]) <= 1e-5 and rel(got[1][1], ref[1][1]) <= 1e-5  # dW reduced once, not 4x


def test_fused_loss_memory_targets():
    """KERNELS.md: compiled temporaries of fwd+bwd on CPU, bf16, V = 151,936, H = 1,024."""
    v, h = 151936, 1024

    def temp(fn, t):
        args = (jax.ShapeDtypeStruct((t, h), jnp.bfloat16), jax.ShapeDtypeStruct((v, h), jnp.bfloat16),
                jax.ShapeDtypeStruct((t,), jnp.int32))
        compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes / 2**30

    fused = lambda x, w, y: -jnp.sum(token_stats(x, w, y, impl="xla_chunked").logprob)
    naive = lambda x, w, y: -jnp.sum(jnp.take_along_axis(
        jax.nn.log_softmax(jnp.einsum("th,vh->tv", x, w, preferred_element_type=jnp.float32)), y[:, None], 1))
    f8, f32k, n8 = temp(fused, 8192), temp(fused, 32768), temp(naive, 8192)
    print(f"temp GiB: naive 8k {n8:.2f}, fused 8k {f8:.3f}, fused 32k {f32k:.3f}")
    assert n8 > 10 and f8 <= 1.2 and f32k <= 2.0 and f32k / f8 <= 2.0
