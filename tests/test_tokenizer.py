"""The offline Qwen3 tokenizer equals the official one."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from her_jax.data.tokenizer import default_tokenizer_dir, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def reference(shared_data):
    return load_tokenizer(os.path.join(shared_data, "qwen3_tokenizer"))


def test_facts(tok):
    assert len(tok) == 151669 and tok.is_fast
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]) == \
        [151643, 151644, 151645, 151667, 151668]
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert tok("Hello world!")["input_ids"] == [9707, 1879, 0]
    assert tok("你好，世界！")["input_ids"] == [108386, 3837, 99489, 6313]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False) \
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_files_equal_the_official_vocabulary(shared_data):
    built = default_tokenizer_dir()
    for name in ("vocab.json", "merges.txt"):
        digest = lambda folder: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
        assert digest(built) == digest(os.path.join(shared_data, "qwen3_tokenizer")), name


def test_added_tokens_equal_the_official_config(tok, shared_data):
    official = json.load(open(os.path.join(shared_data, "qwen3_tokenizer", "tokenizer_config.json")))
    ours = {int(i): (t.content, t.special) for i, t in tok.added_tokens_decoder.items()}
    assert ours == {int(i): (t["content"], t["special"]) for i, t in official["added_tokens_decoder"].items()}


def test_encodes_the_whole_coser_test_set_like_the_reference(tok, reference, shared_data):
    scenes = json.load(open(os.path.join(shared_data, "coser", "test_set.json"), encoding="utf-8"))
    texts = []
    for s in scenes:
        texts += [s["scenario"], s["plot"]["summary"], *s["character_profiles"].values()]
        texts += [d["message"] for d in s["dialogues"]]
        texts += [k.get("thought", "") for k in s["key_characters"]]
    texts += ["<|im_start|>user\n<think>x</think>Hello<|im_end|>\n", "\r\n\t  é e\u0301 \u3000 👩‍👩‍👧 ok", ""]
    ours, theirs = tok(texts)["input_ids"], reference(texts)["input_ids"]
    mismatches = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert len(texts) > 3000 and not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {texts[mismatches[0]][:80]!r}"
    assert sum(map(len, ours)) > 300_000


def test_round_trips_through_save_pretrained(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    text = "<|im_start|>assistant\n<system_thinking>plan</system_thinking>Ines: <role_action>nods</role_action>Yes.<|im_end|>"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.decode(tok(text)["input_ids"]) == text


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
