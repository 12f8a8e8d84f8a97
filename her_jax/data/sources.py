"""Record sources: files in several role-play formats -> units -> conversations.

Accepted inputs (files: .jsonl, .json, .parquet; or a folder prepared by `python -m her_jax.data
prepare`), each record recognised by its keys:

- `her_jax`  our scene schema (docs: `her_jax/data/SCHEMA.md`): `turns` + `characters`.
- `her_messages`  HER-Dataset multi-/single-turn records: `messages` [{role, content}]. Single-turn
  records sharing an `original_trace_id` are regrouped into one conversation whose k-th assistant
  turn carries the system thinking of the k-th sample.
- `her_full`  HER-Dataset full records: `training_samples` {name: messages} with per-turn system
  thinking looked up in `conversation[0].dialogues` by `origin_id`.
- `sharegpt`  `conversations` [{from, value}] (CoSER's SFT export).
- `coser_scene`  a CoSER test-set scene: `dialogues` + `key_characters` + `character_profiles`.
- `coser_book`  a CoSER per-book record (`plots` + `character_datasets`): one unit per conversation.

A unit is the smallest thing that is accepted or rejected as a whole: a scene, a message list, a
group of single-turn samples, one conversation of a book.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Iterator, Mapping

from her_jax.data.format import ENVIRONMENT, FormatError, Message, Utterance, parse_any
from her_jax.data.render import Character, Conversation, Scene

KINDS = ("her_jax", "her_messages", "her_full", "sharegpt", "coser_scene", "coser_book")
SAMPLE_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_corpus.jsonl")
_SYS_THINKING_KEYS = ("sys_thinking", "sys_thinking_revised", "sys_thinking_original", "system_thinking")


@dataclasses.dataclass(frozen=True)
class Unit:
    id: str
    kind: str
    data: Mapping


@dataclasses.dataclass
class Report:
    """What a source pass found: units and conversations accepted, rejects counted by reason."""

    records: int = 0
    units: int = 0
    conversations: int = 0
    turns: int = 0
    rejected: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=dict)  # reason -> first error message

    def reject(self, error: FormatError) -> None:
        self.rejected[error.reason] += 1
        self.examples.setdefault(error.reason, str(error))

    def to_json(self) -> dict:
        return {"records": self.records, "units": self.units, "conversations": self.conversations,
                "turns": self.turns, "rejected": dict(sorted(self.rejected.items())),
                "rejected_total": sum(self.rejected.values()), "examples": dict(sorted(self.examples.items()))}


# ------------------------------------------------------------------------------------------------
# Reading files

def _records(path: str) -> Iterator[tuple[str, object]]:
    """(record id, decoded record) for every record of a file; undecodable lines yield FormatError."""
    name = os.path.basename(path)
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{name}:{i}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{name}:{i}", FormatError("invalid_json", f"not valid JSON ({e.msg})", e.pos)
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                yield name, FormatError("invalid_json", f"not valid JSON ({e.msg})", e.pos)
                return
        if isinstance(data, list):
            for i, rec in enumerate(data):
                yield f"{name}[{i}]", rec
        else:
            yield name, data
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist()):
            yield f"{name}:{i}", rec
    else:
        raise ValueError(f"{path}: unsupported file type (expected .jsonl, .json or .parquet)")


def detect_kind(record) -> str | None:
    if not isinstance(record, Mapping):
        return None
    if "turns" in record and "characters" in record:
        return "her_jax"
    if "plots" in record and "character_datasets" in record:
        return "coser_book"
    if "training_samples" in record:
        return "her_full"
    if "messages" in record:
        return "her_messages"
    if "conversations" in record:
        return "sharegpt"
    if "dialogues" in record:
        return "coser_scene"
    return None


def iter_units(paths, report: Report) -> Iterator[Unit]:
    """Units of all `paths` (files, folders of files, or prepared datasets); undecodable or
    unrecognised records are counted in `report`, never raised."""
    groups: dict[str, list] = collections.defaultdict(list)
    for path in _expand(paths):
        if os.path.isdir(path):  # a prepared dataset
            from her_jax.data.prepared import prepared_units

            for unit in prepared_units(path):
                report.records += 1
                report.units += 1
                yield unit
            continue
        book = os.path.splitext(os.path.basename(path))[0]
        for rid, rec in _records(path):
            report.records += 1
            if isinstance(rec, FormatError):
                report.reject(rec.in_record(rid))
                continue
            kind = detect_kind(rec)
            if kind is None:
                report.reject(FormatError("unknown_record", "record matches no known format "
                                          f"(keys: {sorted(rec)[:8] if isinstance(rec, Mapping) else type(rec).__name__})",
                                          record=rid))
            elif kind == "coser_book":
                for unit in _book_units(rid, rec, book):
                    report.units += 1
                    yield unit
            elif kind == "her_messages" and "original_trace_id" in rec:
                groups[str(rec["original_trace_id"])].append((rid, rec))
            else:
                report.units += 1
                yield Unit(str(rec.get("id") or rec.get("trace_id") or rid), kind, rec)
    for trace, members in groups.items():
        report.units += 1
        yield Unit(trace, "her_messages", {"group": [rec for _, rec in members], "trace_id": trace})


def _expand(paths) -> list[str]:
    out = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        p = os.fspath(p)
        if p == "sample":
            p = SAMPLE_CORPUS
        if os.path.isdir(p) and not os.path.exists(os.path.join(p, "her_jax_prepared.json")):
            out += sorted(os.path.join(p, n) for n in os.listdir(p) if n.endswith((".jsonl", ".json", ".parquet")))
        elif os.path.exists(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such data file or folder")
    return out


def _book_units(rid: str, book: Mapping, name: str) -> Iterator[Unit]:
    profiles = {n: (d or {}).get("profile", "") for n, d in (book.get("character_datasets") or {}).items()}
    for p, plot in enumerate(book.get("plots") or []):
        if not isinstance(plot, Mapping):
            continue
        described = {k.get("name"): k for k in plot.get("key_characters") or [] if isinstance(k, Mapping)}
        for c, conv in enumerate(plot.get("conversation") or []):
            data = {"book": name, "background": plot.get("summary", ""), "conversation": conv,
                    "descriptions": described, "profiles": profiles}
            yield Unit(f"{rid}/plot{p}/conv{c}", "coser_book", data)


# ------------------------------------------------------------------------------------------------
# Units -> conversations

def _need(data, key, types, uid):
    value = data.get(key) if isinstance(data, Mapping) else None
    if not isinstance(value, types):
        raise FormatError("missing_field", f"field {key!r} should be {getattr(types, '__name__', types)}, "
                          f"found {type(value).__name__}", record=uid)
    return value


def _utterance(speaker, text, uid: str, index: int) -> Utterance:
    if not isinstance(speaker, str) or not speaker.strip():
        raise FormatError("bad_speaker", f"turn {index}: speaker should be a non-empty string, found {speaker!r}",
                          record=uid)
    speaker = speaker.strip()
    if speaker == ENVIRONMENT:
        if not isinstance(text, str) or not text.strip():
            raise FormatError("empty_turn", f"turn {index}: empty Environment narration", record=uid)
        return Utterance(speaker, None, text.strip())
    try:
        return Utterance(speaker, parse_any(text, speaker))
    except FormatError as e:
        raise FormatError(e.reason, f"turn {index} ({speaker}): {e.detail}", e.position, uid) from None


def _scene_targets(uid, utterances, candidates, explicit=None) -> tuple[str, ...]:
    speakers = {u.speaker for u in utterances}
    if explicit is not None:
        if not isinstance(explicit, list) or not all(isinstance(t, str) for t in explicit):
            raise FormatError("missing_field", "field 'targets' should be a list of names", record=uid)
        for t in explicit:
            if t not in speakers:
                raise FormatError("target_not_speaking", f"target character {t!r} never speaks", record=uid)
        return tuple(explicit)
    targets = tuple(c for c in candidates if c in speakers and c != ENVIRONMENT)
    if not targets:
        raise FormatError("no_target", "no character of the scene speaks", record=uid)
    return targets


def _scene(uid: str, items, speaker_key: str, text_key: str, characters: Mapping[str, Character], candidates,
           explicit_targets=None, **context) -> list[Conversation]:
    """Conversations of a scene given as a list of {speaker_key, text_key} objects."""
    utterances = []
    for i, t in enumerate(items):
        if not isinstance(t, Mapping):
            raise FormatError("missing_field", f"turn {i} should be an object with {speaker_key} and {text_key}",
                              record=uid)
        utterances.append(_utterance(t.get(speaker_key), t.get(text_key), uid, i))
    if not utterances:
        raise FormatError("empty_record", "scene has no turns", record=uid)
    targets = _scene_targets(uid, utterances, candidates, explicit_targets)
    return Scene(uid, tuple(utterances), characters, targets=targets, **context).conversations()


def _her_jax(unit: Unit) -> list[Conversation]:
    d, uid = unit.data, unit.id
    characters = {}
    for name, info in _need(d, "characters", Mapping, uid).items():
        if not isinstance(info, Mapping):
            raise FormatError("missing_field", f"character {name!r} should map to an object", record=uid)
        characters[name] = Character(str(info.get("profile", "")), str(info.get("inner_thoughts", "")))
    return _scene(uid, _need(d, "turns", list, uid), "speaker", "text", characters, list(characters),
                  d.get("targets"), book=str(d.get("book", "")), scenario=str(d.get("scenario", "")),
                  background=str(d.get("background", "")))


def _coser_test_scene(unit: Unit) -> list[Conversation]:
    d, uid = unit.data, unit.id
    profiles = d.get("character_profiles") or {}
    thoughts = {k.get("name"): k.get("thought") or k.get("motivation") or ""
                for k in d.get("key_characters") or [] if isinstance(k, Mapping)}
    names = list(d.get("major_characters") or thoughts)
    characters = {n: Character(str(profiles.get(n, "")), str(thoughts.get(n, ""))) for n in dict.fromkeys([*names, *profiles])}
    plot = d.get("plot") if isinstance(d.get("plot"), Mapping) else {}
    return _scene(uid, _need(d, "dialogues", list, uid), "character", "message", characters, names,
                  book=str(d.get("book", "")), scenario=str(d.get("scenario", "")),
                  background=str(plot.get("summary", "")))


def _coser_book(unit: Unit) -> list[Conversation]:
    d, uid = unit.data, unit.id
    conv = d["conversation"]
    if not isinstance(conv, Mapping):
        raise FormatError("missing_field", "conversation should be an object", record=uid)
    motivations = {k.get("name"): k.get("motivation", "") for k in conv.get("key_characters") or []
                   if isinstance(k, Mapping)}
    characters = {}
    for name in dict.fromkeys([*motivations, *d["descriptions"]]):  # ordered: prompts must be reproducible
        info = d["descriptions"].get(name) or {}
        profile = "\n".join(x for x in (f"description: {info['description']}" if info.get("description") else "",
                                        str(d["profiles"].get(name, "")).strip(),
                                        f"experience: {info['experience']}" if info.get("experience") else "") if x)
        characters[name] = Character(profile, str(motivations.get(name, "")))
    return _scene(uid, _need(conv, "dialogues", list, uid), "character", "message", characters, list(motivations),
                  book=d["book"], scenario=str(conv.get("scenario", "")), background=str(d["background"]))


_PORTRAY = re.compile(r"^(?:You are|You will be portraying|You are roleplaying as|You are role-playing as)\s+"
                      r"(.+?)(?:\s+from\s|\.\s|\.$|,|\n)")


def _character_of(messages, uid) -> str:
    """The character an assistant plays: named in the system prompt, else by the first reply's prefix."""
    for role, content in messages:
        if role == "system":
            if m := _PORTRAY.match(content.strip()):
                return m.group(1).strip()
            if content.lstrip().startswith("You are a world model"):
                return ENVIRONMENT
    for role, content in messages:
        if role == "assistant" and (m := re.match(r"([^\s:：<\[(][^:：<\n]{0,58}?)[:：] ", content.strip())):
            return m.group(1)
    raise FormatError("unknown_character", "cannot tell which character the assistant plays", record=uid)


def _message_list(uid: str, items, role_key: str, content_key: str) -> list[tuple[str, str]]:
    roles = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, Mapping) or m.get(role_key) not in roles or not isinstance(m.get(content_key), str):
            raise FormatError("bad_message", f"message {i} should have {role_key!r} in {sorted(roles)} and a string "
                              f"{content_key!r}", record=uid)
        out.append((roles[m[role_key]], m[content_key]))
    return out


def _messages_conversation(uid: str, messages: list[tuple[str, str]], system_thinking: dict[int, str] | None = None
                           ) -> Conversation:
    """A Conversation from (role, content) pairs; assistant k gets system_thinking[k] if given. Assistant
    turns are trained when they carry system thinking; if none does, all are trained."""
    if not any(role == "assistant" for role, _ in messages):
        raise FormatError("no_target", "no assistant message", record=uid)
    name = _character_of(messages, uid)
    out, k = [], 0
    for i, (role, content) in enumerate(messages):
        if role != "assistant":
            if not content.strip():
                continue
            out.append(Message(role, content.strip()))
            continue
        try:
            turn = parse_any(content.strip(), name)
        except FormatError as e:
            raise FormatError(e.reason, f"message {i}: {e.detail}", e.position, uid) from None
        if system_thinking and k in system_thinking:
            if turn.system_thinking is None:
                turn = dataclasses.replace(turn, system_thinking=system_thinking[k].strip())
        out.append(Message("assistant", turn=turn, speaker=name))
        k += 1
    if any(m.turn.system_thinking for m in out if m.turn is not None):
        out = [dataclasses.replace(m, train=m.turn.system_thinking is not None) if m.turn is not None else m for m in out]
    last = max(i for i, m in enumerate(out) if m.role == "assistant" and m.train)
    return Conversation(uid, name, tuple(out[:last + 1]))


def _her_messages(unit: Unit) -> list[Conversation]:
    d, uid = unit.data, unit.id
    if "group" not in d:
        return [_messages_conversation(uid, _message_list(uid, _need(d, "messages", list, uid), "role", "content"))]
    # Single-turn samples of one conversation: the k-th ends with assistant turn k (with its system thinking).
    by_len = {}
    for rec in d["group"]:
        msgs = _message_list(uid, _need(rec, "messages", list, uid), "role", "content")
        by_len[sum(r == "assistant" for r, _ in msgs)] = msgs
    longest = by_len[max(by_len)]
    name = _character_of(longest, uid)
    thinking = {}
    for n, msgs in by_len.items():
        last = parse_any(msgs[[i for i, (r, _) in enumerate(msgs) if r == "assistant"][-1]][1].strip(), name)
        if last.system_thinking is not None:
            thinking[n - 1] = last.system_thinking
    stripped = [(r, c if r != "assistant" else parse_any(c.strip(), name).render(system_thinking=False))
                for r, c in longest]
    return [_messages_conversation(uid, stripped, thinking)]


def _her_full(unit: Unit) -> list[Conversation]:
    d, uid = unit.data, unit.id
    samples = _need(d, "training_samples", Mapping, uid)
    convs = d.get("conversation") or [{}]
    dialogues = (convs[0] if isinstance(convs, list) and convs else {}).get("dialogues") or []
    by_origin = {}
    for dlg in dialogues:
        if isinstance(dlg, Mapping) and dlg.get("origin_id") is not None:
            thought = next((dlg[k] for k in _SYS_THINKING_KEYS if isinstance(dlg.get(k), str) and dlg[k].strip()), None)
            by_origin[tuple(dlg["origin_id"]) if isinstance(dlg["origin_id"], list) else (dlg["origin_id"],)] = thought
    out = []
    for name, msgs in samples.items():
        cid = f"{uid}/{name}"
        pairs = _message_list(cid, msgs, "role", "content")
        thinking, k = {}, 0
        for m in msgs:
            if m.get("role") == "assistant":
                origin = m.get("origin_id")
                key = tuple(origin) if isinstance(origin, list) else (origin,)
                if by_origin.get(key):
                    thinking[k] = by_origin[key]
                k += 1
        if not any(r == "system" for r, _ in pairs) and name:
            pairs.insert(0, ("system", f"You are {name}."))
        out.append(_messages_conversation(cid, pairs, thinking))
    return out


def _sharegpt(unit: Unit) -> list[Conversation]:
    d, uid = unit.data, unit.id
    return [_messages_conversation(uid, _message_list(uid, _need(d, "conversations", list, uid), "from", "value"))]


_CONVERTERS = {"her_jax": _her_jax, "her_messages": _her_messages, "her_full": _her_full, "sharegpt": _sharegpt,
               "coser_scene": _coser_test_scene, "coser_book": _coser_book}


def unit_conversations(unit: Unit) -> list[Conversation]:
    """The training conversations of a unit; FormatError (naming the unit) if it is malformed."""
    try:
        return _CONVERTERS[unit.kind](unit)
    except FormatError as e:
        raise e if e.record else e.in_record(unit.id) from None
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # a shape we did not anticipate
        raise FormatError("malformed_record", f"{type(e).__name__}: {e}", record=unit.id) from None


def valid_units(paths, report: Report) -> Iterator[tuple[Unit, list[Conversation]]]:
    """(unit, conversations) for every unit that parses; the others are counted in `report`."""
    for unit in iter_units(paths, report):
        try:
            convs = unit_conversations(unit)
        except FormatError as e:
            report.reject(e)
            continue
        report.conversations += len(convs)
        report.turns += sum(c.num_turns for c in convs)
        yield unit, convs


def load(paths) -> tuple[list[tuple[Unit, list[Conversation]]], Report]:
    """Every valid unit with its conversations, and the report of what was rejected and why."""
    report = Report()
    return list(valid_units(paths, report)), report
