"""The dual-layer turn format: parsing, normalisation, CoSER conversion, visibility, malformed input."""

from __future__ import annotations

import pytest

from her_jax.data.format import (
    CONVERSATION_START, FormatError, Segment, Utterance, character_history, coser_to_her, parse_any, parse_turn,
)

NAME = "Ines Calder"
FULL = (f"<system_thinking>Context: Tomas presses. Goal: refuse.</system_thinking>{NAME}: "
        "<role_thinking>A third. Father would have thrown him out</role_thinking>"
        "<role_action>sets the pear down</role_action>Then you had better hope the weather holds.")


def test_full_turn():
    t = parse_turn(FULL, NAME)
    assert t.system_thinking == "Context: Tomas presses. Goal: refuse."
    assert t.name == NAME
    assert t.segments == (Segment("role_thinking", "A third. Father would have thrown him out"),
                          Segment("role_action", "sets the pear down"),
                          Segment("speech", "Then you had better hope the weather holds."))
    assert t.render() == FULL
    assert t.render(system_thinking=False) == FULL[FULL.index(NAME):]
    assert t.visible_text() == "<role_action>sets the pear down</role_action>Then you had better hope the weather holds."


def test_name_detection_and_optional_system_thinking():
    t = parse_turn(f"{NAME}: Hello<role_action>waves</role_action>")
    assert (t.system_thinking, t.name) == (None, NAME)
    assert parse_turn("Hello there.", NAME).name is None  # no prefix: rendering adds it
    assert parse_turn("李雷：你好<role_action>挥手</role_action>").name == "李雷"
    assert parse_turn("Look: this is speech", speaker=NAME).segments[0].text == "Look: this is speech"


@pytest.mark.parametrize("legacy", [
    "<system_think>plan</system_think>X: <long_role_thinking>deep thought</long_role_thinking>hi",
    "<System Thinking>plan</system_thinking>X: <role_think>deep thought</role_think>hi",
    "< system_thinking >plan</ system_thinking>X: <role_thinking>deep thought</role_thinking><role_speech>hi</role_speech>",
])
def test_legacy_spellings_are_normalised(legacy):
    t = parse_turn(legacy, "X")
    assert t.render() == "<system_thinking>plan</system_thinking>X: <role_thinking>deep thought</role_thinking>hi"


def test_coser_markup_converts():
    assert coser_to_her("[I must stay calm.] Good evening. (bows slightly) Sit.") == \
        "<role_thinking>I must stay calm.</role_thinking>Good evening. <role_action>bows slightly</role_action>Sit."
    t = parse_any("[Hm.] (nods) Yes.", "Edgar")
    assert [s.kind for s in t.segments] == ["role_thinking", "role_action", "speech"]


def test_other_characters_see_actions_and_speech_only():
    u = Utterance(NAME, parse_turn(FULL, NAME))
    assert u.seen_by_others() == f"{NAME}: <role_action>sets the pear down</role_action>Then you had better hope the weather holds."
    assert Utterance("X", parse_turn("<role_thinking>only thinking</role_thinking>", "X")).seen_by_others() == ""


def test_history_rules():
    tomas = Utterance("Tomas", parse_turn("<role_thinking>secret</role_thinking><role_action>smiles</role_action>Well?"))
    env = Utterance("Environment", None, "Rain falls.")
    mine = lambda s: Utterance(NAME, parse_turn(f"<system_thinking>plan {s}</system_thinking>{NAME}: {s}", NAME))
    msgs = character_history([env, tomas, mine("one"), tomas, env, mine("two")], NAME)
    assert [m.role for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[0].content == CONVERSATION_START + "Environment: Rain falls.\n\nTomas: <role_action>smiles</role_action>Well?"
    assert msgs[2].content == "Tomas: <role_action>smiles</role_action>Well?\n\nEnvironment: Rain falls."
    # History form drops the character's own system thinking but keeps the rest.
    assert msgs[1].turn.render(speaker=NAME, system_thinking=False) == f"{NAME}: one"
    # Speaking first: the system message is followed directly by the character's turn.
    first = character_history([mine("one"), tomas, mine("two")], NAME)
    assert [m.role for m in first] == ["assistant", "user", "assistant"]
    assert not first[1].content.startswith(CONVERSATION_START)


# -- malformed input: always a FormatError with a reason, never another exception ---------------------

MALFORMED = {
    "not_text": None,
    "not_text ": 12,
    "invalid_unicode": "hi \ud800 there",
    "control_character": "hello\x00world",
    "special_token": "hi<|im_end|>",
    "special_token ": "<|endoftext|>",
    "empty_turn": "   \n ",
    "qwen_think_block": "<think>hm</think>X: hi",
    "unknown_tag": "<role_thought>x</role_thought>hi",
    "malformed_tag": '<role_action type="wave">waves</role_action>',
    "nested_tag": "<role_thinking>a<role_action>b</role_action></role_thinking>",
    "orphan_closing_tag": "hi</role_action>",
    "mismatched_closing_tag": "<role_thinking>x</role_action>",
    "unclosed_tag": "<role_action>waves and never stops",
    "multiple_system_thinking": "<system_thinking>a</system_thinking>X: hi<system_thinking>b</system_thinking>",
    "system_thinking_not_first": "X: hi<system_thinking>late</system_thinking>",
    "empty_system_thinking": "<system_thinking>  </system_thinking>X: hi",
    "empty_segment": "<role_action> </role_action>hi",
    "empty_response": "<system_thinking>plan</system_thinking>X: ",
    "unclosed_bracket": "[I wonder what he means",
    "nested_bracket": "[I wonder (frowns) what]",
    "mismatched_bracket": "[I wonder) what]",
    "stray_bracket": "Well) then.",
    "empty_segment  ": "[] hello",
}


@pytest.mark.parametrize("reason", sorted(MALFORMED))
def test_malformed_turns_are_rejected_with_a_reason(reason):
    with pytest.raises(FormatError) as err:
        parse_any(MALFORMED[reason], "X")
    assert err.value.reason == reason.strip()
    assert reason.strip() in str(err.value)
    assert err.value.in_record("book.jsonl:7").record == "book.jsonl:7"
    assert str(err.value.in_record("book.jsonl:7")).startswith("record book.jsonl:7: ")


def test_random_mutations_raise_only_format_errors(rng):
    """Fuzz: slices, splices and insertions of tag fragments into valid turns."""
    pieces = ["<role_thinking>", "</role_thinking>", "<role_action>", "</role_action>", "<system_thinking>",
              "</system_thinking>", "<", ">", "[", "]", "(", ")", "Name: ", "：", "<|im_end|>", "\x00", "\ud800",
              "<think>", "</", "<role_speech>", "<long_role_thinking>", " ", "\n", "é", "你好"]
    for _ in range(3000):
        text = FULL
        for _ in range(int(rng.integers(1, 4))):
            i, j = sorted(rng.integers(0, len(text) + 1, 2))
            op = rng.integers(3)
            if op == 0:
                text = text[:i] + text[j:]
            elif op == 1:
                text = text[:i] + pieces[int(rng.integers(len(pieces)))] + text[i:]
            else:
                text = text[i:j] or text
        speaker = NAME if rng.integers(2) else None
        try:
            turn = parse_any(text, speaker)
        except FormatError as e:
            assert e.reason and isinstance(e.position, (int, type(None)))
        else:
            assert turn.segments  # a parsed turn always has a response
            if speaker is not None:  # its canonical form parses back to itself
                again = parse_turn(turn.render(speaker=speaker), speaker)
                assert (again.system_thinking, again.segments) == (turn.system_thinking, turn.segments), text
