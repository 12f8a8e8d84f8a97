"""Rendering with per-token layers, and dual-view packing equal to HER's single-turn samples."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from her_jax.data.format import LAYER_ID, FormatError, Utterance, parse_turn
from her_jax.data.packing import (
    LayerWeights, attention_mask, dual_view_sequences, efficiency, pack, sequences, single_turn_sequences,
)
from her_jax.data.render import Character, Renderer, Scene, Tokens, show, system_prompt
from her_jax.data.tokenizer import load_tokenizer

A, B, C = "Ines Calder", "Tomas Reyne", "Old Wen"


@pytest.fixture(scope="module")
def renderer():
    return Renderer(load_tokenizer())


def turn(name, body, plan=None):
    text = (f"<system_thinking>{plan}</system_thinking>" if plan else "") + f"{name}: {body}"
    return Utterance(name, parse_turn(text, name))


def scene(sid="s1", first=B, with_plans=True, n=6):
    """A scene where `first` speaks first; turns alternate A/B with Environment and a third voice."""
    rng = np.random.default_rng(len(sid) * 7 + n)
    names = [first, A if first == B else B]
    utts = []
    for k in range(n):
        who = names[k % 2]
        plan = f"Context {k}: {who} weighs the offer. Goal: stay in character. Plan: {rng.integers(1000)}." \
            if with_plans and k != 3 else None
        utts.append(turn(who, f"<role_thinking>thought {k} of {who}</role_thinking><role_action>acts {k}</role_action>"
                               f"Line {k}, number {rng.integers(10**6)}.", plan))
        if k == 1:
            utts.append(Utterance("Environment", None, "A gust rattles the shed door."))
        if k == 2:
            utts.append(turn(C, "<role_thinking>hidden</role_thinking>Mind the lantern."))
    chars = {A: Character("keeper of the orchard", "tired"), B: Character("shipping agent"), C: Character("porter")}
    return Scene(sid, tuple(utts), chars, book="The Salt Orchard", scenario="A shed at dusk.", targets=(A, B))


def test_system_prompt_sections():
    text = system_prompt(A, book="The Salt Orchard", profile="keeper", scenario="A shed.", others={B: "agent", C: ""},
                         inner_thoughts="", background="")
    assert text.startswith("You are Ines Calder from The Salt Orchard.\n\n===Ines Calder's Profile===\nkeeper")
    order = ["Profile", "===Current Scenario===", "===Information about other Characters===", "===Requirements==="]
    assert [text.index(h) for h in order] == sorted(text.index(h) for h in order)
    assert "**Tomas Reyne**: agent" in text and "Old Wen" not in text and "===Background===" not in text
    assert "<system_thinking>" in text and "<system_thinking>" not in system_prompt(A, system_thinking=False)


def test_layers_follow_the_text(renderer):
    conv = scene().conversations()[1]  # Tomas Reyne, who speaks first
    rendered = renderer.render(conv)
    tok = renderer.tokenizer
    turn_piece = next(p for p in rendered.pieces if not isinstance(p, Tokens))
    by_layer = collections.defaultdict(str)
    for i, layer in zip(turn_piece.target.ids, turn_piece.target.layers):
        by_layer[int(layer)] += tok.decode([int(i)])
    assert "weighs the offer" in by_layer[LAYER_ID["system_thinking"]]
    assert "thought 0" in by_layer[LAYER_ID["role_thinking"]] and "acts 0" in by_layer[LAYER_ID["role_action"]]
    assert "Line 0" in by_layer[LAYER_ID["speech"]] and "Tomas Reyne" in by_layer[LAYER_ID["name"]]
    assert by_layer[LAYER_ID["end"]] == "<|im_end|>"
    assert "system_thinking" in by_layer[LAYER_ID["tag"]]
    # Tokenizing piece by piece equals tokenizing the whole ChatML string.
    sample = single_turn_sequences(rendered)[1]
    text = tok.decode(sample["tokens"].tolist())
    assert tok(text, add_special_tokens=False)["input_ids"] == sample["tokens"].tolist()
    assert "<|im_start|>assistant\nTomas Reyne: <role_thinking>thought 0" in text  # history form
    assert text.endswith("<|im_end|>") and text.count("<system_thinking>Context") == 1
    assert "thought 1 of Ines" not in text and "hidden" not in text  # others' thoughts are not visible
    assert "\x1b[" in show(tok, Tokens(sample["tokens"], sample["layer_ids"].astype(np.int8)))
    assert 'title="speech"' in show(tok, turn_piece.target, html=True)


def _trained_contexts(rows):
    """For every trained prediction: (visible tokens, their positions, target, weight, target layer)."""
    out = []
    for row in rows:
        doc = row.get("doc_ids", np.ones_like(row["tokens"]))
        mask = attention_mask(doc, row["view_ids"])
        for i in np.flatnonzero(row["loss_weights"]):
            js = np.flatnonzero(mask[i])
            out.append((row["tokens"][js].tobytes(), row["positions"][js].tobytes(), int(row["targets"][i]),
                        float(row["loss_weights"][i]), int(row["layer_ids"][i])))
    return sorted(out)


@pytest.mark.parametrize("first", [A, B])
def test_every_trained_prediction_has_its_single_turn_context(renderer, first):
    """Model-free proof of the equivalence: each trained token of a dual-view row sees exactly the
    tokens, at exactly the positions, that it sees in its own single-turn sample."""
    convs = [renderer.render(c) for c in scene(first=first).conversations()]
    single = [s for c in convs for s in single_turn_sequences(c)]
    dual = [s for c in convs for s in dual_view_sequences(c)]
    assert _trained_contexts(single) == _trained_contexts(dual)
    assert sum(len(s["tokens"]) for s in dual) < sum(len(s["tokens"]) for s in single)
    # The same after packing several conversations into rows (doc ids keep them apart).
    rows = list(pack(dual, 2048))
    assert len(rows) == 1 and set(np.unique(rows[0]["doc_ids"])) == {0, 1, 2}
    assert _trained_contexts(single) == _trained_contexts(rows)


def test_views_and_positions(renderer):
    rendered = renderer.render(scene().conversations()[1])  # Tomas Reyne: 3 turns, each with a plan
    seq = dual_view_sequences(rendered)[0]
    views = seq["view_ids"]
    assert set(np.unique(views)) <= {0, 1, 2, 3}
    for v in np.unique(views[views > 0]):  # a branch continues the position of its header
        idx = np.flatnonzero(views == v)
        assert np.all(np.diff(idx) == 1) and np.all(np.diff(seq["positions"][idx]) == 1)
        after = idx[-1] + 1
        assert seq["positions"][after] == seq["positions"][idx[0]]  # shared stream resumes there
        assert seq["loss_weights"][idx[-1]] == 0  # the branch's <|im_end|> predicts nothing
        assert seq["loss_weights"][idx[0] - 1] > 0  # the header's last token predicts the branch


def test_turns_without_system_thinking_train_on_the_shared_copy(renderer):
    rendered = renderer.render(scene(with_plans=False).conversations()[0])
    seq = dual_view_sequences(rendered)[0]
    assert not seq["view_ids"].any()
    assert _trained_contexts(single_turn_sequences(rendered)) == _trained_contexts([seq])


def test_layer_weights(renderer):
    rendered = renderer.render(scene().conversations()[0])
    plain = dual_view_sequences(rendered)[0]
    weights = LayerWeights(system_thinking=0.0, speech=2.5)
    weighted = dual_view_sequences(rendered, weights)[0]
    sys_pos = plain["layer_ids"] == LAYER_ID["system_thinking"]
    speech_pos = plain["layer_ids"] == LAYER_ID["speech"]
    assert sys_pos.any() and not weighted["loss_weights"][sys_pos].any()
    np.testing.assert_array_equal(weighted["loss_weights"][speech_pos], 2.5 * plain["loss_weights"][speech_pos])
    with pytest.raises(ValueError, match="layer_weights.speech"):
        LayerWeights(speech=-1)


def test_long_conversations_split_and_too_long_turns_are_reported(renderer):
    rendered = renderer.render(scene(n=10).conversations()[0])
    whole = dual_view_sequences(rendered)[0]
    limit = max(len(s["tokens"]) for s in single_turn_sequences(rendered))  # every turn fits, the whole does not
    assert len(whole["tokens"]) > limit
    parts = dual_view_sequences(rendered, max_len=limit)
    assert len(parts) > 1 and all(len(p["tokens"]) <= limit for p in parts)
    assert _trained_contexts(parts) == _trained_contexts(single_turn_sequences(rendered))
    with pytest.raises(FormatError, match="too_long"):
        sequences(rendered, "dual_view", max_len=50)
    with pytest.raises(FormatError, match="too_long"):
        sequences(rendered, "single_turn", max_len=50)
    with pytest.raises(ValueError, match="does not fit"):
        list(pack([whole], 50))


def test_plain_packing_reports_efficiency(renderer):
    convs = [renderer.render(c) for s in ("a", "bb", "ccc") for c in scene(s).conversations()]
    seqs = [s for c in convs for s in single_turn_sequences(c)]
    rows = list(pack(seqs, 1024))
    used = sum(len(s["tokens"]) for s in seqs)
    assert efficiency(rows) == pytest.approx(used / (len(rows) * 1024))
    for row in rows:
        assert not row["view_ids"].any()
        for d in np.unique(row["doc_ids"][row["doc_ids"] > 0]):
            assert row["positions"][row["doc_ids"] == d][0] == 0  # each sample restarts its positions


# -- the numerical equivalence on a tiny model ------------------------------------------------------

def _loss(model, rows, vocab, length=2048):
    """Summed weighted NLL of each row, every row padded to `length` as a separate document (one jit)."""
    @nnx.jit
    def one(model, tokens, targets, weights, positions, doc, view):
        logits = model(tokens[None], positions=positions[None], doc_ids=doc[None], view_ids=view[None])[0]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return jnp.sum(-jnp.take_along_axis(logp, targets[:, None], axis=1)[:, 0] * weights)

    total = 0.0
    for r in rows:
        pad = length - len(r["tokens"])
        fill = lambda a, v=0: np.pad(np.asarray(a), (0, pad), constant_values=v)
        doc = fill(r.get("doc_ids", np.ones_like(r["tokens"])) + 1)  # padding is doc 0, its own document
        total += float(one(model, fill(r["tokens"] % vocab), fill(r["targets"] % vocab), fill(r["loss_weights"]),
                           fill(r["positions"]), doc, fill(r["view_ids"])))
    return total


def test_dual_view_loss_equals_the_sum_of_single_turn_losses(renderer):
    """fp32, tiny random Qwen3: several-turn conversations, a character speaking first, a turn without
    system thinking, and several conversations per row. (Token ids are folded into the model's small
    vocabulary; the equivalence depends only on positions and visibility.)"""
    from her_jax.model import init_model, preset

    model = init_model(preset("qwen3-test").replace(num_hidden_layers=2), seed=3)
    vocab = model.config.vocab_size
    convs = [renderer.render(c) for s in (scene("p", first=A), scene("q", first=B)) for c in s.conversations()]
    single = [s for c in convs for s in single_turn_sequences(c)]
    rows = list(pack([s for c in convs for s in dual_view_sequences(c)], 2048, num_bins=2))
    assert max(len(np.unique(r["doc_ids"])) for r in rows) >= 3  # several conversations share a row
    with jax.default_matmul_precision("float32"):
        expected, got = _loss(model, single, vocab), _loss(model, rows, vocab)
    assert abs(got - expected) / expected <= 1e-5, (got, expected)


def test_reference_mask_equals_the_models_predicate(rng):
    from her_jax.kernels.dual_view_attention import visibility_mask

    doc = np.sort(rng.integers(0, 3, (2, 40)), axis=1)
    view = rng.integers(0, 4, (2, 40)) * (rng.random((2, 40)) < 0.5)
    idx = np.arange(40)
    np.testing.assert_array_equal(attention_mask(doc, view),
                                  np.asarray(visibility_mask(idx, idx, doc, doc, view, view)))


def test_generation_prompt_matches_the_chat_template(renderer):
    conv = scene().conversations()[0]
    history = [m for m in conv.messages]
    ids = renderer.prompt(history)
    chat = [{"role": m.role, "content": m.content if m.turn is None else m.turn.render(speaker=m.speaker,
                                                                                          system_thinking=False)}
            for m in history]
    text = renderer.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert ids == renderer.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert renderer.tokenizer.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
