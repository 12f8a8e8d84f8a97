"""The SFT loss of dual-view rows computed with the kernels equals the reference path."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from her_jax.data.pipeline import DataConfig, Pipeline
from her_jax.model import init_model, preset
from her_jax.train.loss import sft_loss


def test_kernels_equal_the_reference_path():
    batch = next(iter(Pipeline(DataConfig(sources=("sample",), seq_len=1024, batch_size=1, num_packing_bins=2), 0, 1)))
    assert (batch["view_ids"] > 0).any() and (batch["loss_weights"] > 0).any()  # real dual-view rows
    config = preset("qwen3-test").replace(num_hidden_layers=2)
    # Token ids folded into the small test vocabulary: the row structure is what is under test.
    batch = {**batch, "tokens": batch["tokens"] % config.vocab_size, "targets": batch["targets"] % config.vocab_size}
    results = {}
    for attention, loss in (("dense", "reference"), ("pallas_interpret", "pallas_interpret"), ("dense", "xla_chunked")):
        model = init_model(config.replace(attention_impl=attention), seed=7)

        def objective(model):
            out = sft_loss(model, {k: jnp.asarray(v) for k, v in batch.items()}, loss_impl=loss, z_loss=1e-4)
            return out.loss_sum / out.weight_sum, out

        (value, out), grads = nnx.value_and_grad(objective, has_aux=True)(model)
        results[(attention, loss)] = (float(value), np.asarray(out.layer_nll), np.asarray(out.layer_count),
                                      np.asarray(grads["layers"]["mlp"]["down_proj"][...]),
                                      np.asarray(grads["embed_tokens"][...]))
    ref = results[("dense", "reference")]
    assert ref[2][1] > 0  # system-thinking tokens are trained
    for key, got in results.items():
        assert abs(got[0] - ref[0]) / abs(ref[0]) <= 1e-5, key
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-4, atol=1e-3)
        np.testing.assert_array_equal(got[2], ref[2])
        for g, r in zip(got[3:], ref[3:]):
            assert np.linalg.norm(g - r) / np.linalg.norm(r) <= 1e-4, key
