"""The SFT loss of packed rows: model hidden states -> fused dual-layer loss.

A batch is what `her_jax.data.pipeline` yields: tokens, targets, loss_weights, layer_ids, view_ids,
positions, doc_ids, each [B, T]. The model runs with the rows' doc/view/positions (dual-view
visibility); the loss streams the vocabulary (`loss_impl`), never building [B, T, V] logits.
"""

from __future__ import annotations

import jax.numpy as jnp

from her_jax.data.format import LAYERS
from her_jax.kernels.dual_layer_loss import LossOutput, dual_layer_loss

LOSS_IMPLS = ("auto", "reference", "xla_chunked", "pallas_tpu", "pallas_gpu", "pallas_interpret")


def sft_loss(model, batch, *, loss_impl: str = "auto", z_loss: float = 0.0, label_smoothing: float = 0.0,
             mesh=None) -> LossOutput:
    """(loss_sum, weight_sum, per-layer NLL sums, per-layer counts) for one batch of packed rows.

    loss_impl: a `token_stats` implementation; "pallas_interpret" runs the TPU kernel in interpret
    mode (tests). With `mesh`, the loss runs per token shard (needed by the Pallas kernels).
    """
    if loss_impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl: expected one of {LOSS_IMPLS}, found {loss_impl!r}")
    hidden = model.hidden_states(batch["tokens"], positions=batch["positions"], doc_ids=batch["doc_ids"],
                                 view_ids=batch["view_ids"])
    b, t, d = hidden.shape
    impl, interpret = ("pallas_tpu", True) if loss_impl == "pallas_interpret" else (loss_impl, False)
    flat = lambda a: jnp.reshape(a, (b * t,))
    kwargs = dict(vocab_size=model.config.vocab_size, impl=impl, interpret=interpret, z_loss=z_loss,
                  label_smoothing=label_smoothing)
    if mesh is not None:
        kwargs["mesh"] = mesh
    return dual_layer_loss(hidden.reshape(b * t, d), model.head_weight(), flat(batch["targets"]),
                           flat(batch["loss_weights"]), flat(batch["layer_ids"]), len(LAYERS), **kwargs)
