"""Batched KV-cache generation (her_jax.rl.sampler) and the chat CLI."""

from __future__ import annotations

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import forward

from her_jax.kernels.dual_layer_loss import token_stats
from her_jax.model import init_model, preset
from her_jax.rl.sampler import SamplingParams, generate

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [90, 91, 92, 93]]


@pytest.fixture(scope="module")
def model():
    return init_model(preset("qwen3-test", param_dtype="float32", dtype="float32"), seed=3)


def _step_logits(model, prompt, generated):
    """Logits a full forward pass over prompt + generated[:k] gives for the next token, for every k
    (one causal pass over the whole sequence: row k is what recomputing at step k would see)."""
    seq = np.array([list(prompt) + list(generated)], np.int32)
    return forward(model, seq)[0, len(prompt) - 1:-1].astype(np.float64)


def _log_softmax(z):
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


@pytest.mark.parametrize("unstack_layers", [True, False], ids=["per-layer-weights", "stacked-scan"])
def test_greedy_equals_argmax_of_full_forward_at_every_step(model, unstack_layers):
    out = generate(model, PROMPTS, SamplingParams(max_new_tokens=6, temperature=0, stop_tokens=()), bucket=8,
                   unstack_layers=unstack_layers)
    assert out.tokens.shape == (3, 6) and (out.lengths == 6).all() and not out.finished.any()
    for row, prompt in enumerate(PROMPTS):
        for step, logits in enumerate(_step_logits(model, prompt, out.tokens[row])):
            assert out.tokens[row, step] == int(np.argmax(logits)), (row, step)
            assert abs(out.logprobs[row, step] - _log_softmax(logits)[out.tokens[row, step]]) < 1e-5


@pytest.mark.parametrize("temperature, filters", [(0.8, dict(top_k=50, top_p=0.95)), (1.3, {})])
def test_sampled_logprobs_equal_the_trainers_fused_loss_forward(model, temperature, filters):
    params = SamplingParams(max_new_tokens=8, temperature=temperature, stop_tokens=(), **filters)
    out = generate(model, PROMPTS, params, seed=7, bucket=8)
    for row, prompt in enumerate(PROMPTS):
        seq = np.array([list(prompt) + out.tokens[row].tolist()], np.int32)
        hidden = nnx.jit(lambda m, t: m.hidden_states(t))(model, seq)[0, len(prompt) - 1:-1]
        stats = jax.jit(lambda h, w, y: jax.lax.stop_gradient(
            token_stats(h, w, y, temperature=temperature, impl="xla_chunked")))(
            hidden, model.head_weight(), jnp.asarray(out.tokens[row]))
        np.testing.assert_allclose(out.logprobs[row], np.asarray(stats.logprob), atol=1e-5, rtol=0)


def test_left_padding_does_not_change_a_prompts_result(model):
    params = SamplingParams(max_new_tokens=5, temperature=0, stop_tokens=())
    alone = generate(model, [PROMPTS[1]], params, bucket=8)
    # In a batch with a much longer prompt the short one is left-padded by 30 tokens.
    batched = generate(model, [list(range(100, 138)), PROMPTS[1]], params, bucket=8)
    assert (alone.tokens[0] == batched.tokens[1]).all()
    np.testing.assert_allclose(alone.logprobs[0], batched.logprobs[1], atol=1e-5, rtol=0)


def test_stop_tokens_end_rows_and_pad_the_rest(model):
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_tokens=())
    free = generate(model, PROMPTS, params, bucket=8)
    stop = int(free.tokens[0, 2])
    out = generate(model, PROMPTS, SamplingParams(max_new_tokens=6, temperature=0, stop_tokens=(stop,), pad_id=511),
                   bucket=8)
    for row in range(3):
        hits = [i for i, t in enumerate(free.tokens[row]) if t == stop]
        n = hits[0] + 1 if hits else 6
        assert out.lengths[row] == n and out.finished[row] == bool(hits)
        assert (out.tokens[row, :n] == free.tokens[row, :n]).all()
        assert (out.tokens[row, n:] == 511).all() and (out.logprobs[row, n:] == 0).all()
        assert out.sequences()[row] == free.tokens[row, :n].tolist()
    assert out.lengths[0] <= 3 and out.finished[0]


def test_sampling_is_reproducible_from_a_seed_and_respects_top_k(model):
    params = SamplingParams(max_new_tokens=8, temperature=1.5, top_k=4, stop_tokens=())
    a, b = (generate(model, PROMPTS, params, seed=11, bucket=8) for _ in range(2))
    c = generate(model, PROMPTS, params, seed=12, bucket=8)
    assert (a.tokens == b.tokens).all() and (a.logprobs == b.logprobs).all()
    assert (a.tokens != c.tokens).any()
    # every drawn token is among the 4 most likely at its step
    for row, prompt in enumerate(PROMPTS):
        for step, logits in enumerate(_step_logits(model, prompt, a.tokens[row])):
            assert a.tokens[row, step] in np.argsort(logits)[-4:]
    # top-k 1 and a tiny top-p both reduce to greedy decoding
    greedy = generate(model, PROMPTS, SamplingParams(max_new_tokens=8, temperature=0, stop_tokens=()), bucket=8)
    for narrow in (dict(top_k=1), dict(top_p=1e-6)):
        out = generate(model, PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, stop_tokens=(), **narrow),
                       seed=5, bucket=8)
        assert (out.tokens == greedy.tokens).all(), narrow


def test_prefill_tokens_start_every_reply(model):
    params = SamplingParams(max_new_tokens=4, temperature=0, stop_tokens=())
    with_prefill = generate(model, [PROMPTS[0]], params, prefill=[300, 301], bucket=8)
    explicit = generate(model, [PROMPTS[0] + [300, 301]], params, bucket=8)
    assert (with_prefill.tokens == explicit.tokens).all()


def test_bad_requests_are_refused(model):
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, 2, 600]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, [[1, 2]], SamplingParams(max_new_tokens=model.config.max_position_embeddings))


def test_generation_runs_sharded_on_a_mesh(model):
    from her_jax.parallel import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices=jax.devices()[:8])
    params = SamplingParams(max_new_tokens=4, temperature=0, stop_tokens=())
    prompts = PROMPTS + [[7, 7, 7]]
    plain = generate(model, prompts, params, bucket=8)
    with jax.set_mesh(mesh):
        sharded_model = init_model(model.config, mesh=mesh, seed=3)
    out = generate(sharded_model, prompts, params, mesh=mesh, bucket=8)
    assert (out.tokens == plain.tokens).all()
    np.testing.assert_allclose(out.logprobs, plain.logprobs, atol=1e-5, rtol=0)


# -- the chat CLI ---------------------------------------------------------------------------------

def test_chat_cli_talks_through_stdin_and_saves_a_loadable_transcript(tmp_path):
    from her_jax import chat
    from her_jax.data.sources import load
    from her_jax.data.tokenizer import default_tokenizer_dir
    from her_jax.train.checkpoint import save_model

    ckpt = tmp_path / "ckpt"
    save_model(init_model(preset("qwen3-tiny"), seed=0), ckpt, tokenizer_dir=default_tokenizer_dir())
    transcript = tmp_path / "chat.json"
    stdin = io.StringIO(f"Who keeps the lamp tonight?\n/show\nAnd tomorrow?\n/save {transcript}\n/quit\n")
    stdout = io.StringIO()
    code = chat.main(["--checkpoint", str(ckpt), "--scene", "0", "--character", "Tobin Reyes", "--as", "Ottilie Marsh",
                      "--max-new-tokens", "12", "--temperature", "0"], stdin=stdin, stdout=stdout)
    text = stdout.getvalue()
    assert code == 0, text
    assert "the model plays Tobin Reyes" in text and text.count("Tobin Reyes: ") >= 2 and "thinking layers shown" in text
    record = json.loads(transcript.read_text())
    roles = [m["role"] for m in record["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert record["messages"][0]["content"].startswith("You are Tobin Reyes")
    # the scene's opening and the first line share one user message (METHOD.md §2)
    assert record["messages"][1]["content"].startswith("===Conversation Start===")
    assert record["messages"][1]["content"].endswith("Ottilie Marsh: Who keeps the lamp tonight?")
    assert record["messages"][3]["content"] == "Ottilie Marsh: And tomorrow?"
    assert all(m["content"].startswith("Tobin Reyes: ") or m["content"].startswith("<system_thinking>")
               for m in record["messages"] if m["role"] == "assistant")
    units, report = load([str(transcript)])  # a saved chat is a HER messages record
    assert not report.rejected
    assert units and units[0][1][0].character == "Tobin Reyes"


def test_chat_cli_reports_a_bad_scene(tmp_path, capsys):
    from her_jax import chat

    code = chat.main(["--checkpoint", str(tmp_path), "--scene", "99"], stdin=io.StringIO(""), stdout=io.StringIO())
    assert code == 2 and "--scene 99" in capsys.readouterr().err
