"""The dual-layer turn format (METHOD.md §1–2): parsing, validation, and who sees what.

One assistant turn of a character:

    <system_thinking>third-person plan</system_thinking>Name: <segments>

where segments interleave `<role_thinking>` (private first-person thought), `<role_action>`
(visible action) and plain speech. `parse_turn` turns text into a typed `Turn` or raises
`FormatError` with a reason code, a message and a character position; nothing else escapes it.
Legacy spellings are normalised on input, and CoSER's `[thought]` / `(action)` markup converts
to the HER tags.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Iterable, Sequence

# Per-token layers. "context" is everything that is never a training target (system prompt,
# user turns, history, chat markup); the others split an assistant target by meaning.
LAYERS = ("context", "system_thinking", "role_thinking", "role_action", "speech", "tag", "name", "end")
LAYER_ID = {name: i for i, name in enumerate(LAYERS)}

SEGMENT_KINDS = ("role_thinking", "role_action", "speech")
ENVIRONMENT = "Environment"
CONVERSATION_START = "===Conversation Start===\n\n"

# Opening/closing tag spellings seen in the wild -> canonical kind.
_TAG = re.compile(r"<\s*(/?)\s*([A-Za-z][^<>]{0,80}?)\s*>")
_KINDS = {
    "system_thinking": "system_thinking", "system_think": "system_thinking", "system thinking": "system_thinking",
    "system think": "system_thinking", "systemthinking": "system_thinking", "system-thinking": "system_thinking",
    "role_thinking": "role_thinking", "long_role_thinking": "role_thinking", "role_think": "role_thinking",
    "role_action": "role_action",
}
# Legacy <role_speech> tags mark plain speech: they are removed before parsing (repeatedly, since
# removing one can join fragments into another).
_ROLE_SPEECH = re.compile(r"<\s*/?\s*role[_ ]speech\s*>", re.IGNORECASE)
# Tag-like text that is almost certainly a broken or unknown tag of ours rather than speech.
_OURS_HINT = re.compile(r"think|thought|role|action|speech|system", re.IGNORECASE)
_SPECIAL = re.compile(r"<\|[^|<>]{1,40}\|>")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_NAME_COLONS = (":", "：")


class FormatError(ValueError):
    """A turn or record that breaks the dual-layer format.

    reason: a short code (e.g. 'unclosed_tag'); position: character offset in the text, when
    known; record: the record id, when raised from a pipeline.
    """

    def __init__(self, reason: str, message: str, position: int | None = None, record: str | None = None):
        self.reason, self.detail, self.position, self.record = reason, message, position, record
        where = f" at character {position}" if position is not None else ""
        prefix = f"record {record}: " if record else ""
        super().__init__(f"{prefix}{message}{where} [{reason}]")

    def in_record(self, record: str) -> FormatError:
        """The same error, naming the record it came from."""
        return FormatError(self.reason, self.detail, self.position, record)


@dataclasses.dataclass(frozen=True)
class Segment:
    kind: str  # one of SEGMENT_KINDS
    text: str


@dataclasses.dataclass(frozen=True)
class Turn:
    """A parsed assistant turn. `name` is the speaker prefix found in the text (None if absent)."""

    system_thinking: str | None
    name: str | None
    segments: tuple[Segment, ...]

    def spans(self, *, speaker: str | None = None, system_thinking: bool = True,
              role_thinking: bool = True) -> list[tuple[str, str]]:
        """The turn as (text, layer) pieces, canonically rendered.

        speaker: name for the prefix (default: the parsed one; no prefix if both are None).
        system_thinking / role_thinking: include those layers (history and other characters'
        views drop them).
        """
        out: list[tuple[str, str]] = []
        if system_thinking and self.system_thinking is not None:
            out += [("<system_thinking>", "tag"), (self.system_thinking, "system_thinking"),
                    ("</system_thinking>", "tag")]
        name = speaker if speaker is not None else self.name
        if name is not None:
            out.append((f"{name}: ", "name"))
        for seg in self.segments:
            if seg.kind == "speech":
                out.append((seg.text, "speech"))
            elif seg.kind == "role_action" or role_thinking:
                out += [(f"<{seg.kind}>", "tag"), (seg.text, seg.kind), (f"</{seg.kind}>", "tag")]
        return out

    def render(self, **kw) -> str:
        return "".join(text for text, _ in self.spans(**kw))

    def visible_text(self) -> str:
        """What other characters perceive: actions and speech, no name prefix."""
        return Turn(None, None, self.segments).render(role_thinking=False)

    @property
    def has_response(self) -> bool:
        return bool(self.segments)


def _check_text(text, kind: str = "turn") -> str:
    if not isinstance(text, str):
        raise FormatError("not_text", f"{kind} should be a string, found {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FormatError("invalid_unicode", f"{kind} is not valid Unicode ({e.reason})", e.start) from None
    if m := _CONTROL.search(text):
        raise FormatError("control_character", f"{kind} contains control character U+{ord(m.group()):04X}", m.start())
    if m := _SPECIAL.search(text):
        raise FormatError("special_token", f"{kind} contains the chat-markup token {m.group()!r}", m.start())
    return unicodedata.normalize("NFC", text)


def _lex(text: str) -> list[tuple[str, str, int]]:
    """[(kind, content, position)] with kinds: text, open:<kind>, close:<kind>."""
    out, pos = [], 0
    for m in _TAG.finditer(text):
        closing, raw = m.group(1) == "/", " ".join(m.group(2).lower().split())
        kind = _KINDS.get(raw) or _KINDS.get(raw.replace(" ", "_"))
        if kind is None:
            first = re.split(r"[\s=/\"']", raw, maxsplit=1)[0]
            if raw == "think":
                raise FormatError("qwen_think_block", "Qwen3 <think> blocks are not part of the HER format", m.start())
            if first in _KINDS:
                raise FormatError("malformed_tag", f"tag {m.group()!r} has extra content (tags take no attributes)",
                                  m.start())
            if _OURS_HINT.search(raw) and re.fullmatch(r"[a-z_ \-]+", raw):
                raise FormatError("unknown_tag", f"unknown tag {m.group()!r}", m.start())
            continue  # '<b>', '<Hello there>', ... : ordinary text
        if m.start() > pos:
            out.append(("text", text[pos:m.start()], pos))
        out.append((("close:" if closing else "open:") + kind, "", m.start()))
        pos = m.end()
    if pos < len(text):
        out.append(("text", text[pos:], pos))
    return out


def parse_turn(text, speaker: str | None = None) -> Turn:
    """Parse one assistant turn (HER tags; legacy spellings accepted).

    speaker: the character's name, when known; a leading "speaker: " prefix is then recognised
    exactly. Without it, a short leading "Name: " before any tag is taken as the prefix.
    Error positions count characters of the text after legacy <role_speech> tags are removed.
    """
    while isinstance(text, str) and (stripped := _ROLE_SPEECH.sub("", text)) != text:
        text = stripped
    text = _check_text(text)
    if not text.strip():
        raise FormatError("empty_turn", "turn is empty", 0)
    pieces: list[tuple[str, str, int]] = []  # (kind, text, position) with kinds system_thinking/segment kinds
    open_kind, open_pos, buffer = None, 0, []
    for kind, content, pos in _lex(text):
        if kind == "text":
            if open_kind is None:
                pieces.append(("speech", content, pos))
            else:
                buffer.append(content)
        elif kind.startswith("open:"):
            new = kind[5:]
            if open_kind is not None:
                raise FormatError("nested_tag", f"<{new}> opened inside <{open_kind}>", pos)
            open_kind, open_pos, buffer = new, pos, []
        else:
            closed = kind[6:]
            if open_kind is None:
                raise FormatError("orphan_closing_tag", f"</{closed}> closes nothing", pos)
            if closed != open_kind:
                raise FormatError("mismatched_closing_tag", f"</{closed}> closes <{open_kind}>", pos)
            pieces.append((open_kind, "".join(buffer), open_pos))
            open_kind = None
    if open_kind is not None:
        raise FormatError("unclosed_tag", f"<{open_kind}> is never closed", open_pos)

    system, body = None, []
    for i, (kind, content, pos) in enumerate(pieces):
        if kind != "system_thinking":
            body.append((kind, content, pos))
            continue
        if system is not None:
            raise FormatError("multiple_system_thinking", "a turn has exactly one <system_thinking> block", pos)
        if any(k != "speech" or c.strip() for k, c, _ in pieces[:i]):
            raise FormatError("system_thinking_not_first", "<system_thinking> must open the turn", pos)
        if not content.strip():
            raise FormatError("empty_system_thinking", "<system_thinking> block is empty", pos)
        system, body = content.strip(), []

    name, segments = None, []
    for kind, content, pos in body:
        if kind == "speech":
            if not segments and name is None:
                content = content.lstrip()
                name, content = _split_name(content, speaker)
            if not content.strip():
                continue
            if segments and segments[-1].kind == "speech":  # e.g. around a dropped <role_speech> tag
                segments[-1] = Segment("speech", segments[-1].text + content)
            else:
                segments.append(Segment("speech", content))
        else:
            if not content.strip():
                raise FormatError("empty_segment", f"<{kind}> block is empty", pos)
            segments.append(Segment(kind, content.strip()))
    if segments and segments[-1].kind == "speech":
        segments[-1] = Segment("speech", segments[-1].text.rstrip())
    if not segments:
        if system is not None or name is not None:
            raise FormatError("empty_response", "turn has no role-play response", len(text))
        raise FormatError("empty_turn", "turn is empty", 0)
    return Turn(system, name, tuple(segments))


def _split_name(text: str, speaker: str | None) -> tuple[str | None, str]:
    if speaker is not None:
        for colon in _NAME_COLONS:
            prefix = speaker + colon
            if text.startswith(prefix):
                return speaker, text[len(prefix):].removeprefix(" ")
        return None, text
    m = re.match(r"([^\s<>:：\[\]()][^<>:：\n\[\]()]{0,58}?)[:：] ?", text)
    if m and len(m.group(1).split()) <= 6:
        return m.group(1), text[m.end():]
    return None, text


# ------------------------------------------------------------------------------------------------
# CoSER markup: [thought] and (action), no nesting.

def coser_to_her(text) -> str:
    """CoSER `[thought]` / `(action)` markup -> HER `<role_thinking>` / `<role_action>` tags.

    Brackets must balance and not nest; the whitespace right after a converted block is dropped
    (as HER's converter does).
    """
    text = _check_text(text, "message")
    out, i, n = [], 0, len(text)
    pairs = {"[": ("]", "role_thinking"), "(": (")", "role_action")}
    while i < n:
        ch = text[i]
        if ch in pairs:
            close, kind = pairs[ch]
            j = i + 1
            while j < n and text[j] != close:
                if text[j] in "[(":
                    raise FormatError("nested_bracket", f"{text[j]!r} inside a CoSER {ch}...{close} block", j)
                if text[j] in "])":
                    raise FormatError("mismatched_bracket", f"{text[j]!r} closes a CoSER {ch}... block", j)
                j += 1
            if j == n:
                raise FormatError("unclosed_bracket", f"CoSER {ch!r} is never closed", i)
            content = text[i + 1:j].strip()
            if not content:
                raise FormatError("empty_segment", f"empty CoSER {ch}{close} block", i)
            out.append(f"<{kind}>{content}</{kind}>")
            i = j + 1
            while i < n and text[i] in " \t":
                i += 1
        elif ch in "])":
            raise FormatError("stray_bracket", f"{ch!r} closes nothing", i)
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def parse_any(text, speaker: str | None = None) -> Turn:
    """HER tags if the text uses them, else CoSER markup (any bracket then has its CoSER meaning)."""
    if isinstance(text, str) and "<" not in text and any(b in text for b in "[]()"):
        text = coser_to_her(text)
    return parse_turn(text, speaker)


# ------------------------------------------------------------------------------------------------
# Who sees what (METHOD.md §2).

@dataclasses.dataclass(frozen=True)
class Utterance:
    speaker: str
    turn: Turn | None  # None for plain narration (Environment)
    text: str = ""  # narration text when turn is None

    def seen_by_others(self) -> str:
        """`Name: visible text` (role and system thinking removed, actions kept); '' if nothing shows."""
        visible = (self.turn.visible_text() if self.turn is not None else self.text).strip()
        return f"{self.speaker}: {visible}" if visible else ""


@dataclasses.dataclass(frozen=True)
class Message:
    """A chat message. Assistant messages carry their parsed turn; `target` marks the turn being
    trained (rendered with its system thinking) as opposed to history (without)."""

    role: str  # system | user | assistant
    content: str = ""
    turn: Turn | None = None
    speaker: str | None = None
    target: bool = False
    train: bool = True  # assistant turns only: False keeps the turn as context

    def spans(self) -> list[tuple[str, str]]:
        if self.turn is None:
            return [(self.content, "context")]
        return self.turn.spans(speaker=self.speaker, system_thinking=self.target)


def character_history(utterances: Sequence[Utterance], character: str) -> list[Message]:
    """The user/assistant messages of `character`'s view of a scene (all its turns in history form).

    Others' turns between two of the character's turns merge into one user message (pieces
    `Name: text`, blank-line separated, role thinking removed); the first user message starts with
    `===Conversation Start===`; if the character speaks first, no user message precedes it.
    """
    messages: list[Message] = []
    pending: list[str] = []
    started = False

    def flush():
        nonlocal started
        if pending:
            body = "\n\n".join(pending)
            messages.append(Message("user", (CONVERSATION_START if not started else "") + body))
            started = True
            pending.clear()

    for u in utterances:
        if u.speaker == character:
            flush()
            started = True
            messages.append(Message("assistant", turn=u.turn, speaker=character))
        elif piece := u.seen_by_others():
            pending.append(piece)
    flush()
    return messages


def assistant_indices(messages: Iterable[Message]) -> list[int]:
    return [i for i, m in enumerate(messages) if m.role == "assistant"]
