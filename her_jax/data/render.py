"""Scenes -> chat messages -> token ids with a layer id per token (METHOD.md §3).

Rendering is plain ChatML, `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message. Each
message is tokenized on its own (the chat-markup tokens split the text anyway, so this equals
tokenizing the whole string); an assistant turn is tokenized twice, in target form (with its
system thinking) and in history form (without), so packing can place either. A token's layer is
the layer of the character at the (upper) middle of its span (tokens such as `>Name` straddle two).
"""

from __future__ import annotations

import dataclasses
import html as html_lib
from collections.abc import Mapping, Sequence

import numpy as np

from her_jax.data.format import LAYER_ID, LAYERS, FormatError, Message, Utterance, character_history

# -- system prompt (the one place its wording lives) ------------------------------------------------

REQUIREMENTS_DUAL = (
    "Reply with exactly one turn of {name}, in two parts and in this order.\n"
    "1. Start with one <system_thinking>...</system_thinking> block: a third-person analysis of how to portray "
    "{name} right now (context, goal, plan). It is never shown to anyone.\n"
    "2. Then write \"{name}: \" followed by the role-play response. Wrap {name}'s inner thoughts in "
    "<role_thinking>...</role_thinking> (others cannot see them) and visible actions in "
    "<role_action>...</role_action>; everything outside tags is spoken aloud. Thoughts, actions and speech may "
    "appear several times, in any order."
)
REQUIREMENTS_PLAIN = (
    "Reply with exactly one turn of {name}: write \"{name}: \" followed by the role-play response. Wrap {name}'s "
    "inner thoughts in <role_thinking>...</role_thinking> (others cannot see them) and visible actions in "
    "<role_action>...</role_action>; everything outside tags is spoken aloud. Thoughts, actions and speech may "
    "appear several times, in any order."
)


def system_prompt(name: str, *, book: str = "", profile: str = "", background: str = "", scenario: str = "",
                  others: Mapping[str, str] | None = None, inner_thoughts: str = "",
                  system_thinking: bool = True) -> str:
    """The character's system prompt; a section appears only when its text is non-empty."""
    opening = f"You are {name} from {book}." if book else f"You are {name}."
    sections = [opening]
    others_text = "\n\n".join(f"**{other}**: {text.strip()}" for other, text in (others or {}).items() if text.strip())
    for header, text in ((f"==={name}'s Profile===", profile), ("===Background===", background),
                         ("===Current Scenario===", scenario),
                         ("===Information about other Characters===", others_text),
                         ("===Your Inner Thoughts===", inner_thoughts),
                         ("===Requirements===", (REQUIREMENTS_DUAL if system_thinking else REQUIREMENTS_PLAIN)
                          .format(name=name))):
        if text and text.strip():
            sections.append(f"{header}\n{text.strip()}")
    return "\n\n".join(sections)


# -- scenes and conversations -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Character:
    profile: str = ""
    inner_thoughts: str = ""


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One character's view of a scene: system, user and assistant messages. An assistant message
    with `train=True` is a training turn (history form before it, target form at it)."""

    id: str
    character: str
    messages: tuple[Message, ...]

    @property
    def num_turns(self) -> int:
        """Trained assistant turns."""
        return sum(m.role == "assistant" and m.train for m in self.messages)


@dataclasses.dataclass(frozen=True)
class Scene:
    """A multi-character scene; `conversations()` gives each target character's view."""

    id: str
    utterances: tuple[Utterance, ...]
    characters: Mapping[str, Character]
    book: str = ""
    scenario: str = ""
    background: str = ""
    targets: tuple[str, ...] = ()

    def conversations(self) -> list[Conversation]:
        out = []
        for name in self.targets:
            history = character_history(self.utterances, name)
            turns = [i for i, m in enumerate(history) if m.role == "assistant"]
            if not turns:
                raise FormatError("target_not_speaking", f"target character {name!r} never speaks", record=self.id)
            last = turns[-1]
            dual = any(m.turn.system_thinking for m in history if m.role == "assistant")
            others = {n: c.profile for n, c in self.characters.items() if n != name}
            me = self.characters.get(name, Character())
            system = system_prompt(name, book=self.book, profile=me.profile, background=self.background,
                                   scenario=self.scenario, others=others, inner_thoughts=me.inner_thoughts,
                                   system_thinking=dual)
            out.append(Conversation(f"{self.id}/{name}", name, (Message("system", system), *history[:last + 1])))
        return out


# -- tokens ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tokens:
    ids: np.ndarray  # int32 [n]
    layers: np.ndarray  # int8 [n], LAYERS index of each token

    def __len__(self) -> int:
        return len(self.ids)

    @staticmethod
    def concat(parts: Sequence[Tokens]) -> Tokens:
        if not parts:
            return Tokens(np.zeros(0, np.int32), np.zeros(0, np.int8))
        return Tokens(np.concatenate([p.ids for p in parts]), np.concatenate([p.layers for p in parts]))


@dataclasses.dataclass(frozen=True)
class RenderedTurn:
    header: Tokens  # <|im_start|>assistant\n
    target: Tokens  # content with system thinking, then <|im_end|>
    history: Tokens  # content without system thinking, then <|im_end|>
    newline: Tokens  # the \n that closes the message in the stream

    @property
    def private(self) -> bool:
        """Whether the target differs from the history form (it then needs a private branch)."""
        return not np.array_equal(self.target.ids, self.history.ids)


@dataclasses.dataclass(frozen=True)
class RenderedConversation:
    id: str
    pieces: tuple[Tokens | RenderedTurn, ...]  # context tokens and trained assistant turns, in order


def _as_context(tokens: Tokens) -> Tokens:
    return Tokens(tokens.ids, np.zeros(len(tokens), np.int8))


class Renderer:
    """Tokenizes conversations with per-token layers (one batched tokenizer call per conversation)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if self.im_start is None or self.im_end is None or self.im_start == tokenizer.unk_token_id:
            raise ValueError("tokenizer has no <|im_start|>/<|im_end|> tokens; a Qwen3 tokenizer is needed")
        self._headers = {role: self._context(self._encode([role + "\n"])[0][0], lead=[self.im_start])
                         for role in ("system", "user", "assistant")}
        self._newline = self._context(self._encode(["\n"])[0][0])
        self._end = Tokens(np.array([self.im_end], np.int32), np.array([LAYER_ID["end"]], np.int8))

    def _encode(self, texts: list[str]):
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return list(zip(enc["input_ids"], enc["offset_mapping"]))

    @staticmethod
    def _context(ids, lead=()) -> Tokens:
        ids = np.asarray([*lead, *ids], np.int32)
        return Tokens(ids, np.zeros(len(ids), np.int8))

    @staticmethod
    def _layered(spans: list[tuple[str, str]], ids, offsets) -> Tokens:
        text_layers = np.concatenate([np.full(len(t), LAYER_ID[layer], np.int8) for t, layer in spans] or
                                     [np.zeros(0, np.int8)])
        if len(text_layers) == 0:
            return Tokens(np.asarray(ids, np.int32), np.zeros(len(ids), np.int8))
        # The character at the upper middle of each token's span: ">Ines" -> name, " <" -> tag.
        mids = np.array([min((a + b) // 2, max(b - 1, a)) for a, b in offsets], np.int64).clip(0, len(text_layers) - 1)
        return Tokens(np.asarray(ids, np.int32), text_layers[mids])

    def render(self, conv: Conversation) -> RenderedConversation:
        texts, plan = [], []
        for m in conv.messages:
            if m.turn is None:
                plan.append(("context", m.role, len(texts)))
                texts.append(m.content)
            else:
                target = Message("assistant", turn=m.turn, speaker=m.speaker, target=True).spans()
                history = Message("assistant", turn=m.turn, speaker=m.speaker, target=False).spans()
                plan.append(("turn", ((target, history), m.train), len(texts)))
                texts += ["".join(t for t, _ in target), "".join(t for t, _ in history)]
        encoded = self._encode(texts)
        pieces: list[Tokens | RenderedTurn] = []
        for kind, what, i in plan:
            if kind == "context":
                body = self._context(encoded[i][0], lead=self._headers[what].ids)
                pieces.append(Tokens.concat([body, Tokens(np.array([self.im_end], np.int32), np.zeros(1, np.int8)),
                                             self._newline]))
            else:
                (t_spans, h_spans), train = what
                target = Tokens.concat([self._layered(t_spans, *encoded[i]), self._end])
                history = Tokens.concat([self._layered(h_spans, *encoded[i + 1]), self._end])
                turn = RenderedTurn(self._headers["assistant"], target, history, self._newline)
                pieces.append(turn if train else Tokens.concat([turn.header, _as_context(history), turn.newline]))
        return RenderedConversation(conv.id, tuple(pieces))

    def prompt(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of `messages` (history form) followed by the generation prompt `<|im_start|>assistant\\n`."""
        conv = self.render(Conversation("prompt", "", tuple(messages)))
        parts = [p if isinstance(p, Tokens) else Tokens.concat([p.header, p.history, p.newline]) for p in conv.pieces]
        return [int(x) for x in Tokens.concat([*parts, self._headers["assistant"]]).ids]


# -- showing a rendered sample coloured by layer ----------------------------------------------------

_ANSI = {"context": "2", "system_thinking": "38;5;141", "role_thinking": "38;5;39", "role_action": "38;5;214",
         "speech": "38;5;255", "tag": "38;5;244", "name": "38;5;83", "end": "38;5;203"}
_HTML = {"context": "#9a9a9a", "system_thinking": "#8e6bd8", "role_thinking": "#2f8fd8", "role_action": "#d98a12",
         "speech": "#222222", "tag": "#b0b0b0", "name": "#2e9d4a", "end": "#d84a4a"}


def _token_texts(tokenizer, ids) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]


def show(tokenizer, tokens: Tokens, *, html: bool = False, legend: bool = True) -> str:
    """The tokens decoded one by one and coloured by layer: ANSI for a terminal, or an HTML snippet
    (e.g. for `IPython.display.HTML` in a notebook)."""
    texts = _token_texts(tokenizer, tokens.ids)
    if html:
        body = "".join(f'<span title="{LAYERS[l]}" style="color:{_HTML[LAYERS[l]]}">{html_lib.escape(t)}</span>'
                       for t, l in zip(texts, tokens.layers))
        key = " ".join(f'<span style="color:{c}">■ {n}</span>' for n, c in _HTML.items()) if legend else ""
        return (f'<div style="font-family:monospace;white-space:pre-wrap">{key}{"<br>" if key else ""}'
                f"{body}</div>")
    body = "".join(f"\x1b[{_ANSI[LAYERS[l]]}m{t}\x1b[0m" for t, l in zip(texts, tokens.layers))
    key = " ".join(f"\x1b[{c}m■ {n}\x1b[0m" for n, c in _ANSI.items()) + "\n" if legend else ""
    return key + body
