"""Tokenizer files: what an HF model folder carries besides weights and config."""

from __future__ import annotations

import os

# The files transformers reads to rebuild a Qwen3 tokenizer (any subset may be present).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                      "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def tokenizer_files(folder: str | os.PathLike) -> list[str]:
    """Paths of the HF tokenizer files present in `folder`; an error naming the folder if none are."""
    folder = os.fspath(folder)
    found = [os.path.join(folder, n) for n in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(folder, n))]
    if not found:
        raise FileNotFoundError(f"{folder}: no tokenizer files found (looked for {', '.join(HF_TOKENIZER_FILES)})")
    return found
