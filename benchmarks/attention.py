"""Dual-view flash attention: memory growth with sequence length, and blocks skipped on real rows.

1. Compiled temporaries of attention forward+backward (Qwen3-0.6B heads: 16 query / 8 kv heads of
   128, bf16, one row) for a TPU v5p chip (AOT from this CPU host; needs libtpu), dense XLA
   attention vs the Pallas kernel, T = 4k ... 32k: dense grows with T^2, flash with T.
2. The share of (q block, kv block) pairs the skip table marks fully hidden on real dual-view rows:
   the bundled corpus (system thinking on every turn) and the CoSER data (../shared/data/coser),
   packed into 8,192-token rows, for block sizes 128, 256, 512; the causal-only share is given
   for comparison.

    python benchmarks/attention.py

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from her_jax.kernels.dual_view_attention import block_table, dense_attention, flash_attention, visibility_mask  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
COSER = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "coser"))
GIB = 2**30


def memory_growth(out: dict) -> None:
    from her_jax.parallel.topology import parse_slice

    try:
        devices = parse_slice("v5p-8").devices()
    except RuntimeError as e:
        print(f"(no TPU memory figures: {e})")
        return
    chip = jax.sharding.SingleDeviceSharding(devices[0])
    n, k, h = 16, 8, 128

    def loss(impl):
        def f(q, kk, v, doc, view, pos):
            if impl == "dense":
                idx = jnp.arange(q.shape[1])
                o = dense_attention(q, kk, v, visibility_mask(idx, idx, doc, doc, view, view), h ** -0.5)
            else:
                o = flash_attention(q, kk, v, doc, view, pos, scale=h ** -0.5)
            return jnp.sum(o.astype(jnp.float32))
        return f

    print(f"{'T':>12}{'dense GiB':>12}{'flash GiB':>12}   (TPU v5p, fwd+bwd temporaries, one row)")
    for t in (4096, 8192, 16384, 32768):
        sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=chip)
        args = (sds((1, t, n, h), jnp.bfloat16), sds((1, t, k, h), jnp.bfloat16), sds((1, t, k, h), jnp.bfloat16),
                *(sds((1, t), jnp.int32) for _ in range(3)))
        row = []
        for impl in ("dense", "flash"):
            try:
                c = jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2))).lower(*args).compile()
                gib = round(c.memory_analysis().temp_size_in_bytes / GIB, 4)
            except Exception as e:  # an HBM overflow at compile time is a result too
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                gib = "exceeds HBM"
            out[f"tpu_v5p_{impl}_temp_gib_{t // 1024}k"] = gib
            row.append(gib)
        print("".join(f"{x:>12}" for x in (t, *row)))
    out["flash_growth_32k_over_8k"] = round(out["tpu_v5p_flash_temp_gib_32k"] / out["tpu_v5p_flash_temp_gib_8k"], 3)


def skipped_blocks(out: dict) -> None:
    from her_jax.data.packing import pack, sequences
    from her_jax.data.render import Renderer
    from her_jax.data.sources import load
    from her_jax.data.tokenizer import load_tokenizer

    renderer = Renderer(load_tokenizer())
    sets = {"sample": ["sample"]}
    if os.path.isdir(COSER):
        sets["coser"] = [os.path.join(COSER, n) for n in ("final", "test_set.json", "sft_sharegpt.json")]
    print(f"\n{'data':<8}{'block':>7}{'skipped':>10}{'causal-only':>13}{'fully visible':>15}   (share of block pairs)")
    for name, paths in sets.items():
        units, _ = load(paths)
        seqs = [s for _, cs in units for c in cs for s in sequences(renderer.render(c), "dual_view", max_len=8192)]
        rows = list(pack(seqs, 8192, num_bins=64))
        doc = jnp.asarray(np.stack([r["doc_ids"] for r in rows]))
        view = jnp.asarray(np.stack([r["view_ids"] for r in rows]))
        pos = jnp.asarray(np.stack([r["positions"] for r in rows]))
        for block in (128, 256, 512):
            table = np.asarray(block_table(doc, view, pos, block))
            nb = 8192 // block
            causal_skip = (nb * (nb - 1) / 2) / nb ** 2
            skip, full = float((table == 0).mean()), float((table == 2).mean())
            out[f"{name}_skipped_share_b{block}"] = round(skip, 4)
            out[f"{name}_visible_share_b{block}"] = round(full, 4)
            print(f"{name:<8}{block:>7}{skip:>10.3f}{causal_skip:>13.3f}{full:>15.3f}")


def main() -> None:
    out: dict = {}
    memory_growth(out)
    skipped_blocks(out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
