"""Generation speed: her_jax's sampler against transformers' `generate`, same model, same machine.

A tiny-but-real Qwen3 (4 layers, width 512, 8 query / 4 KV heads x 64, the real 151,936-token
vocabulary, untied head, float32) is built in transformers, converted to her_jax through the HF
folder, and both generate for the same batch of prompts: batch 8, 64-token prompts, exactly 256
new tokens (no early stop), temperature 1 sampling with no top-k/top-p on both sides. Each side
runs once to warm up (compilation); then the two sides take turns for --repeats runs each, in this
one process, and each side's median counts.
Ends with one JSON line: her_jax_tokens_per_s, hf_tokens_per_s, speedup.
With --device gpu both sides run on the first CUDA GPU (f32 matrix products at full precision on
both: no TF32).

    python benchmarks/generate.py [--repeats 3] [--batch 8] [--new-tokens 256] [--device cpu|gpu]
                                  [--unstack-layers auto|on|off]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

MODEL = dict(vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False,
             rms_norm_eps=1e-6, rope_theta=1_000_000.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--unstack-layers", choices=("auto", "on", "off"), default="auto",
                   help="her_jax decode with per-layer weight copies (auto: everywhere but TPU)")
    args = p.parse_args()
    os.environ["JAX_PLATFORMS"] = "cpu" if args.device == "cpu" else "cuda"

    import jax
    import numpy as np
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from her_jax.convert.hf import load_hf
    from her_jax.rl.sampler import SamplingParams, generate

    torch_device = "cpu" if args.device == "cpu" else "cuda"
    if args.device == "gpu":
        jax.config.update("jax_default_matmul_precision", "highest")
        torch.backends.cuda.matmul.allow_tf32 = False
    unstack = {"auto": None, "on": True, "off": False}[args.unstack_layers]
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(Qwen3Config(**MODEL)).eval()
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 151_000, size=(args.batch, args.prompt)).astype(np.int64)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_hf(folder)
    hf = hf.to(torch_device)
    device = jax.devices()[0]
    print(f"model: 4 layers, width 512, vocab 151,936, float32; batch {args.batch}, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens; jax {jax.__version__} on {device.platform} ({device.device_kind}), "
          f"torch {torch.__version__} on {torch_device}"
          + (f" with {torch.get_num_threads()} threads" if torch_device == "cpu" else ""))

    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, stop_tokens=())

    def run_ours(seed):
        out = generate(ours, prompts.tolist(), params, seed=seed, unstack_layers=unstack)
        assert (out.lengths == args.new_tokens).all()
        return out.tokens.size

    def run_hf(seed):
        torch.manual_seed(seed)
        ids = torch.from_numpy(prompts).to(torch_device)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              eos_token_id=None, pad_token_id=0)
        out = out.cpu()  # waits for the GPU
        assert out.shape == (args.batch, args.prompt + args.new_tokens)
        return (out.shape[1] - args.prompt) * out.shape[0]

    sides = {"her_jax": run_ours, "hf": run_hf}
    warm, speeds = {}, {name: [] for name in sides}
    for name, fn in sides.items():
        start = time.perf_counter()
        fn(0)
        warm[name] = time.perf_counter() - start
    for r in range(args.repeats):  # alternate the sides, so a slow spell of the machine hits both
        for name, fn in sides.items():
            start = time.perf_counter()
            n = fn(r + 1)
            speeds[name].append(n / (time.perf_counter() - start))
    results = {name: float(np.median(s)) for name, s in speeds.items()}
    print(f"{'':<10}{'warm-up s':>10}{'tokens/s (median of ' + str(args.repeats) + ')':>28}   each run")
    for name in sides:
        print(f"{name:<10}{warm[name]:>10.1f}{results[name]:>28.1f}   "
              + " ".join(f"{x:.1f}" for x in speeds[name]))
    out = {"her_jax_tokens_per_s": round(results["her_jax"], 1), "hf_tokens_per_s": round(results["hf"], 1),
           "speedup": round(results["her_jax"] / results["hf"], 2), "batch": args.batch,
           "new_tokens": args.new_tokens, "platform": device.platform, "device": device.device_kind,
           "unstack_layers": args.unstack_layers}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
