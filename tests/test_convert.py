"""HF <-> her_jax conversion: bit-exact round trips, transformers reloads, named errors, CLI, Hub."""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from helpers import assert_bit_exact, forward, hf_logits, hf_model, hf_tensors, rel_err, save_hf_model

from her_jax.convert.hf import ConversionError, load_hf, save_hf
from her_jax.convert.safetensors_stream import (
    Entry, SafetensorsError, SafetensorsReader, StreamWriter, parse_size, plan_shards,
)


@pytest.mark.parametrize("overrides", [
    dict(tie_word_embeddings=True),
    dict(attention_bias=True, num_attention_heads=8, num_key_value_heads=2, head_dim=8, hidden_size=40),
])
def test_round_trip_is_bit_exact_and_reloads(tmp_path, rng, overrides):
    from transformers import Qwen3ForCausalLM

    hf = hf_model(1, **overrides)
    src = save_hf_model(hf, tmp_path / "src")
    model = load_hf(src, progress=False)
    out = save_hf(model, tmp_path / "out", progress=False)
    assert_bit_exact(hf_tensors(src), hf_tensors(out))

    tokens = rng.integers(0, 128, (2, 10))
    reloaded = Qwen3ForCausalLM.from_pretrained(out).eval()
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf, tokens))
    config_in, config_out = (json.loads(open(os.path.join(d, "config.json")).read()) for d in (src, out))
    for key in set(config_in) - {"transformers_version"}:
        assert config_out[key] == config_in[key], key


def test_bf16_checkpoint_round_trips_through_f32_params(tmp_path, rng):
    """A bf16 HF checkpoint loaded as f32 master weights exports back to the identical bf16 bytes."""
    import torch

    hf = hf_model(2).to(torch.bfloat16)
    src = save_hf_model(hf, tmp_path / "src")
    model = load_hf(src, dtype="float32", progress=False)
    assert model.config.param_dtype == "float32" and model.config.hf_dtype == "bfloat16"
    out = save_hf(model, tmp_path / "out", progress=False)
    tensors = hf_tensors(out)
    assert all(t.dtype == ml_dtypes.bfloat16 for t in tensors.values())
    assert_bit_exact(hf_tensors(src), tensors)
    assert json.loads(open(os.path.join(out, "config.json")).read())["dtype"] == "bfloat16"


def test_sharded_export_with_index_reloads(tmp_path, rng):
    from transformers import Qwen3ForCausalLM

    hf = hf_model(3, num_hidden_layers=3)
    model = load_hf(save_hf_model(hf, tmp_path / "src"), progress=False)
    out = save_hf(model, tmp_path / "out", max_shard_size="40KB", progress=False)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    tensors = hf_tensors(out)
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    sizes = [os.path.getsize(os.path.join(out, f)) for f in files]
    biggest = max(t.nbytes for t in tensors.values())
    assert all(s <= max(40_000, biggest) + 4096 for s in sizes)
    # ... and loads back, through our reader and through transformers.
    assert_bit_exact(hf_tensors(tmp_path / "src"), tensors)
    tokens = rng.integers(0, 128, (1, 8))
    np.testing.assert_array_equal(forward(load_hf(out, progress=False), tokens), forward(model, tokens))
    np.testing.assert_array_equal(hf_logits(Qwen3ForCausalLM.from_pretrained(out).eval(), tokens),
                                  hf_logits(hf, tokens))


def test_export_of_a_random_init_model_loads_in_transformers(tmp_path, rng):
    from transformers import Qwen3ForCausalLM

    from her_jax.model import init_model, preset

    model = init_model(preset("qwen3-test"), seed=4)
    out = save_hf(model, tmp_path / "out", dtype="float32", progress=False)
    tokens = rng.integers(0, 512, (2, 6))
    theirs = hf_logits(Qwen3ForCausalLM.from_pretrained(out).eval(), tokens)
    assert rel_err(forward(model, tokens), theirs) <= 1e-4


# -- errors that name what went wrong ------------------------------------------------------------

@pytest.fixture
def src(tmp_path):
    return save_hf_model(hf_model(0, tie_word_embeddings=False), tmp_path / "src")


def rewrite(folder, mutate):
    """Rewrite model.safetensors after `mutate(dict)`."""
    path = os.path.join(folder, "model.safetensors")
    tensors = safetensors.numpy.load_file(path)
    mutate(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(src):
    rewrite(src, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(ConversionError, match=r"missing.*model\.layers\.1\.self_attn\.k_norm\.weight"):
        load_hf(src, progress=False)


def test_unused_tensor(src):
    rewrite(src, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
    with pytest.raises(ConversionError, match=r"not used.*rotary_emb\.inv_freq"):
        load_hf(src, progress=False)


def test_wrong_shape(src):
    rewrite(src, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.ones((95, 64), np.float32)}))
    with pytest.raises(ConversionError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' "
                                              r"has shape \[95, 64\], the config needs \[96, 64\]"):
        load_hf(src, progress=False)


def test_integer_tensor(src):
    rewrite(src, lambda t: t.update({"model.norm.weight": np.ones(64, np.int32)}))
    with pytest.raises(ConversionError, match=r"'model\.norm\.weight' has dtype I32"):
        load_hf(src, progress=False)


def test_tied_duplicate_head_is_accepted_only_when_equal(tmp_path):
    folder = save_hf_model(hf_model(0, tie_word_embeddings=True), tmp_path / "tied")
    rewrite(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    load_hf(folder, progress=False)
    rewrite(folder, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    with pytest.raises(ConversionError, match="lm_head.weight differs"):
        load_hf(folder, progress=False)


def test_corrupt_files_are_named(src):
    path = os.path.join(src, "model.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(SafetensorsError, match=r"model\.safetensors: tensor '.*': data_offsets"):
        load_hf(src, progress=False)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(SafetensorsError, match="header length"):
        load_hf(src, progress=False)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(SafetensorsError, match="not valid JSON"):
        load_hf(src, progress=False)


def test_index_pointing_at_a_missing_file(tmp_path):
    hf = hf_model(0)
    model = load_hf(save_hf_model(hf, tmp_path / "src"), progress=False)
    out = save_hf(model, tmp_path / "out", max_shard_size=30_000, progress=False)
    os.remove(os.path.join(out, "model-00002-of-" + sorted(os.listdir(out))[-2][-17:]))
    with pytest.raises(SafetensorsError, match="does not exist"):
        load_hf(out, progress=False)


def test_not_a_folder(tmp_path):
    with pytest.raises(ConversionError, match="expected an HF model folder"):
        load_hf(tmp_path / "nope", progress=False)


# -- the streaming writer/reader on their own ------------------------------------------------------

def test_stream_writer_output_is_read_by_safetensors(tmp_path, rng):
    arrays = {"a": rng.standard_normal((3, 5)).astype(np.float32),
              "b": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
              "c": rng.standard_normal((2, 1, 3)).astype(np.float16), "empty": np.zeros((0, 4), np.float32)}
    entries = [Entry(k, {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[str(v.dtype)], v.shape)
               for k, v in arrays.items()]
    path = str(tmp_path / "x.safetensors")
    with StreamWriter(path, entries) as w:
        for k, v in arrays.items():
            w.write(k, v)
    assert_bit_exact(arrays, safetensors.numpy.load_file(path))
    reader = SafetensorsReader(path)
    assert_bit_exact(arrays, {k: reader.read(k) for k in reader.tensors})
    with pytest.raises(SafetensorsError, match="expected tensor 'a'"):
        StreamWriter(str(tmp_path / "y.safetensors"), entries).write("b", arrays["b"])


def test_shard_planning_and_sizes():
    entries = [Entry(str(i), "F32", (n,)) for i, n in enumerate([10, 10, 50, 5, 5])]  # 40, 40, 200, 20, 20 bytes
    assert [[e.name for e in s] for s in plan_shards(entries, 250)] == [["0", "1"], ["2", "3", "4"]]
    assert [[e.name for e in s] for s in plan_shards(entries, 100)] == [["0", "1"], ["2"], ["3", "4"]]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("five gigs")


# -- CLI and Hub -----------------------------------------------------------------------------------

def test_cli_round_trip_with_tokenizer(tmp_path, rng, shared_data):
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from her_jax.convert.__main__ import main
    from her_jax.convert.hf import copy_tokenizer

    hf = hf_model(7)
    src = save_hf_model(hf, tmp_path / "src")
    copy_tokenizer(os.path.join(shared_data, "qwen3_tokenizer"), src)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    assert main(["from-hf", "--hf", src, "--out", ckpt]) == 0
    assert main(["from-hf", "--hf", src, "--out", ckpt]) == 1  # exists, no --force
    assert main(["to-hf", "--checkpoint", ckpt, "--out", out, "--max-shard-size", "50KB"]) == 0
    assert_bit_exact(hf_tensors(src), hf_tensors(out))
    tokens = rng.integers(0, 128, (1, 9))
    np.testing.assert_array_equal(hf_logits(Qwen3ForCausalLM.from_pretrained(out).eval(), tokens),
                                  hf_logits(hf, tokens))
    text = "<|im_start|>user\nHello, Othello.<|im_end|>"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == AutoTokenizer.from_pretrained(src)(text)["input_ids"]


class FakeHubApi:
    """Stands in for the remote Hub service."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], sorted(os.listdir(kw["folder_path"]))))


def test_push_to_hub_uses_env_token_without_leaking_it(tmp_path, monkeypatch, capsys, caplog):
    import huggingface_hub

    from her_jax.convert import hub
    from her_jax.convert.__main__ import main
    from her_jax.model import init_model, preset
    from her_jax.train.checkpoint import save_model

    secret = "hf_" + "x" * 30
    monkeypatch.setenv("HF_TOKEN", secret)
    fake, tokens_seen = FakeHubApi(), []

    def make_api(token=None):
        tokens_seen.append(token)
        return fake

    monkeypatch.setattr(huggingface_hub, "HfApi", make_api)
    ckpt = save_model(init_model(preset("qwen3-test")), tmp_path / "ckpt")
    out = tmp_path / "out"
    assert main(["to-hf", "--checkpoint", ckpt, "--out", str(out), "--push-to-hub", "me/her-test", "--private"]) == 0
    assert tokens_seen == [secret]
    assert fake.calls[0] == ("create_repo", "me/her-test", {"repo_type": "model", "private": True, "exist_ok": True})
    assert fake.calls[1][0] == "upload_folder" and "config.json" in fake.calls[1][2]
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err + caplog.text
    for root, _, files in os.walk(out):
        for f in files:
            assert secret.encode() not in open(os.path.join(root, f), "rb").read()

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(hub.HubError, match="set HF_TOKEN"):
        hub.push_to_hub(out, "me/her-test")
    with pytest.raises(hub.HubError, match="expected 'owner/name'"):
        hub.push_to_hub(out, "no-owner", api=fake)
