"""Training sequences from rendered conversations, and rows packed from sequences (DESIGN.md §4).

Three modes:
- `single_turn`: HER's split — one sequence per assistant turn k: the conversation up to turn k,
  earlier assistant turns in history form, turn k in target form (with its system thinking).
- `dual_view`: one sequence per conversation. The shared stream is the conversation as its last
  turn sees it; right after each assistant header comes that turn's private branch (view k) with
  the full target, then the history form resumes in the shared stream. Positions skip branches,
  so every token sits at the position it has in its own single-turn sample, and token i sees
  token j iff j <= i, same doc, and view_j in (0, view_i). A turn whose target equals its history
  form needs no branch: its loss goes on the shared copy.
- Plain packing (`pack`): several sequences per row with distinct doc ids (grain's first-fit packer).

Every sequence/row has: tokens, targets (next token in packed order), loss_weights (per-layer
weight on positions whose target is a trained token, else 0), layer_ids (layer of the *target*
token), view_ids, positions; packed rows add doc_ids (0 = padding).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from her_jax.data.format import LAYERS, FormatError
from her_jax.data.render import RenderedConversation, RenderedTurn, Tokens

FEATURES = ("tokens", "targets", "loss_weights", "layer_ids", "view_ids", "positions")
ROW_FEATURES = FEATURES + ("doc_ids",)
MODES = ("dual_view", "single_turn")


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """Loss weight per layer of the target token (METHOD.md §4); context is never trained."""

    system_thinking: float = 1.0
    role_thinking: float = 1.0
    role_action: float = 1.0
    speech: float = 1.0
    tag: float = 1.0
    name: float = 1.0
    end: float = 1.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"layer_weights.{f.name}: expected a number >= 0, found {value!r}")

    def array(self) -> np.ndarray:
        """float32 [len(LAYERS)] indexed by layer id (context = 0)."""
        return np.array([0.0 if name == "context" else getattr(self, name) for name in LAYERS], np.float32)


@dataclasses.dataclass(frozen=True)
class _Block:
    tokens: Tokens
    view: int = 0
    trained: bool = False  # its tokens are prediction targets
    branch: bool = False  # private branch: does not advance the shared position counter


def _sequence(blocks: Sequence[_Block], weights: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    ids = np.concatenate([b.tokens.ids for b in blocks]).astype(np.int32)
    layers = np.concatenate([b.tokens.layers for b in blocks]).astype(np.int32)
    views = np.concatenate([np.full(len(b.tokens), b.view, np.int32) for b in blocks])
    trained = np.concatenate([np.full(len(b.tokens), b.trained) for b in blocks])
    positions, pos = [], 0
    for b in blocks:
        positions.append(pos + np.arange(len(b.tokens), dtype=np.int32))
        if not b.branch:
            pos += len(b.tokens)
    targets = np.append(ids[1:], pad_id).astype(np.int32)
    target_layers = np.append(layers[1:], 0).astype(np.int32)
    on = np.append(trained[1:], False)
    return {
        "tokens": ids,
        "targets": targets,
        "loss_weights": np.where(on, weights[target_layers], 0.0).astype(np.float32),
        "layer_ids": np.where(on, target_layers, 0).astype(np.int32),
        "view_ids": views,
        "positions": np.concatenate(positions),
    }


def _turn_indices(conv: RenderedConversation) -> list[int]:
    return [i for i, p in enumerate(conv.pieces) if isinstance(p, RenderedTurn)]


def _history_blocks(conv: RenderedConversation, end: int) -> list[_Block]:
    """Pieces [0, end) as context (assistant turns in history form)."""
    out = []
    for p in conv.pieces[:end]:
        if isinstance(p, RenderedTurn):
            out += [_Block(p.header), _Block(p.history), _Block(p.newline)]
        else:
            out.append(_Block(p))
    return out


def single_turn_sequences(conv: RenderedConversation, weights: LayerWeights = LayerWeights(),
                          pad_id: int = 0) -> list[dict[str, np.ndarray]]:
    """HER's single-turn samples: one per assistant turn, ending with that turn's <|im_end|>."""
    w = weights.array()
    out = []
    for i in _turn_indices(conv):
        turn = conv.pieces[i]
        out.append(_sequence([*_history_blocks(conv, i), _Block(turn.header), _Block(turn.target, trained=True)],
                             w, pad_id))
    return out


def _dual_blocks(conv: RenderedConversation, first: int, last: int) -> list[_Block]:
    """Dual-view blocks training turns first..last (indices into the assistant turns)."""
    turns = _turn_indices(conv)
    blocks = _history_blocks(conv, turns[first])
    for k in range(first, last + 1):
        i = turns[k]
        turn = conv.pieces[i]
        blocks.append(_Block(turn.header))
        if k == last:  # nothing follows: the target sits in the shared stream
            blocks.append(_Block(turn.target, trained=True))
            break
        if turn.private:
            blocks += [_Block(turn.target, view=k + 1, trained=True, branch=True), _Block(turn.history),
                       _Block(turn.newline)]
        else:
            blocks += [_Block(turn.target, trained=True), _Block(turn.newline)]
        blocks += [_Block(p) for p in conv.pieces[i + 1:turns[k + 1]]]
    return blocks


def dual_view_sequences(conv: RenderedConversation, weights: LayerWeights = LayerWeights(), pad_id: int = 0,
                        max_len: int | None = None) -> list[dict[str, np.ndarray]]:
    """Dual-view sequence(s) of a conversation. With `max_len`, a conversation that does not fit
    is split into several dual-view sequences over consecutive turns (each with its full context);
    a single turn whose own sample exceeds `max_len` raises FormatError('too_long')."""
    w = weights.array()
    n = len(_turn_indices(conv))
    size = lambda a, b: sum(len(x.tokens) for x in _dual_blocks(conv, a, b))
    out, first = [], 0
    while first < n:
        last = first
        if max_len is not None:
            if size(first, first) > max_len:
                raise FormatError("too_long", f"turn {first + 1} needs {size(first, first)} tokens, more than "
                                  f"the sequence length {max_len}", record=conv.id)
            while last + 1 < n and size(first, last + 1) <= max_len:
                last += 1
        else:
            last = n - 1
        out.append(_sequence(_dual_blocks(conv, first, last), w, pad_id))
        first = last + 1
    return out


def sequences(conv: RenderedConversation, mode: str, weights: LayerWeights = LayerWeights(), pad_id: int = 0,
              max_len: int | None = None) -> list[dict[str, np.ndarray]]:
    if mode == "dual_view":
        return dual_view_sequences(conv, weights, pad_id, max_len)
    if mode == "single_turn":
        out = single_turn_sequences(conv, weights, pad_id)
        if max_len is not None:
            for k, s in enumerate(out):
                if len(s["tokens"]) > max_len:
                    raise FormatError("too_long", f"turn {k + 1} needs {len(s['tokens'])} tokens, more than the "
                                      f"sequence length {max_len}", record=conv.id)
        return out
    raise ValueError(f"packing mode {mode!r}: expected one of {MODES}")


# -- attention mask (the dense reference) -------------------------------------------------------------

def attention_mask(doc_ids: np.ndarray, view_ids: np.ndarray) -> np.ndarray:
    """Dense [..., T, T] bool: token i sees token j iff j <= i, same doc, and view_j in (0, view_i)."""
    doc_ids, view_ids = np.asarray(doc_ids), np.asarray(view_ids)
    t = doc_ids.shape[-1]
    causal = np.tril(np.ones((t, t), bool))
    same_doc = doc_ids[..., :, None] == doc_ids[..., None, :]
    kv_view = view_ids[..., None, :]
    return causal & same_doc & ((kv_view == 0) | (kv_view == view_ids[..., :, None]))


# -- packing rows -----------------------------------------------------------------------------------

def pack(seqs: Iterable[dict[str, np.ndarray]], seq_len: int, *, num_bins: int = 16, pad_id: int = 0,
         seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Rows of exactly `seq_len` tokens holding several sequences each (grain's first-fit packer);
    doc_ids number the sequences of a row from 1 (0 = padding). Sequences must fit (see
    `sequences(max_len=...)`); one that does not is an error, never truncated."""
    import grain

    def check(s):
        if len(s["tokens"]) > seq_len:
            raise ValueError(f"sequence of {len(s['tokens'])} tokens does not fit rows of {seq_len}")
        return {k: s[k] for k in FEATURES}

    ds = grain.MapDataset.source(list(seqs)).map(check).to_iter_dataset()
    yield from pack_dataset(ds, seq_len, num_bins=num_bins, pad_id=pad_id, seed=seed)


def pack_dataset(ds, seq_len: int, *, num_bins: int, pad_id: int = 0, seed: int = 0):
    """Apply grain's first-fit packing to an IterDataset of sequences; yields rows (ROW_FEATURES)."""
    from grain.experimental import FirstFitPackIterDataset

    lengths = {k: seq_len for k in FEATURES}
    padding = {k: 0 for k in FEATURES} | {"targets": pad_id, "tokens": pad_id}
    packed = FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=num_bins, seed=seed,
                                     shuffle_bins=False, padding_struct=padding)
    return packed.map(_row)


def _row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    row = {k: np.asarray(packed[k]) for k in FEATURES}
    row["doc_ids"] = np.asarray(packed["tokens_segment_ids"], np.int32)
    return row


def efficiency(rows: Iterable[dict[str, np.ndarray]]) -> float:
    """Share of row slots holding real tokens."""
    used = total = 0
    for r in rows:
        used += int((r["doc_ids"] > 0).sum())
        total += r["doc_ids"].size
    return used / total if total else 0.0
