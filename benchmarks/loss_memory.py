"""Temporary memory of the LM-head loss step (forward + backward): naive logits vs the fused kernels.

Compiles `value_and_grad` of a token-weighted NLL for V = 151,936 and reads
`memory_analysis().temp_size_in_bytes` (compile only, nothing runs):
- on this CPU: naive (full f32 logits + log_softmax) vs `xla_chunked`, bf16 inputs, H = 1,024,
  T = 8,192 and 32,768 (KERNELS.md targets: fused <= 1.2 / 2.0 GiB, growth <= 2.0), plus the
  Qwen3-32B head H = 5,120 at T = 8,192 with a bf16 and with an f32 (master-weight) head;
- for a TPU v5p chip (AOT, when libtpu is installed): naive vs `xla_chunked` vs `pallas_tpu`.

    python benchmarks/loss_memory.py

Ends with one JSON line of the figures (GiB).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")  # quiet libtpu on CPU hosts
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from her_jax.kernels.dual_layer_loss import token_stats  # noqa: E402

V = 151936
GIB = 2**30


def naive(x, w, y, wt):
    z = jnp.einsum("th,vh->tv", x, w, preferred_element_type=jnp.float32)
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1)[:, 0] * wt)


def fused(impl):
    def loss(x, w, y, wt):
        return -jnp.sum(token_stats(x, w, y, impl=impl).logprob * wt)
    return loss


def temp_gib(fn, t, h, w_dtype=jnp.bfloat16, sharding=None) -> float:
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    args = (sds((t, h), jnp.bfloat16), sds((V, h), w_dtype), sds((t,), jnp.int32), sds((t,), jnp.float32))
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes / GIB


def main() -> None:
    out = {}
    print(f"{'where':<10}{'H':>6}{'T':>8}{'head':>6}  {'implementation':<14}{'temp GiB':>10}")
    for t in (8192, 32768):
        for name, fn in (("naive", naive), ("fused", fused("xla_chunked"))):
            gib = temp_gib(fn, t, 1024)
            out[f"{name}_temp_gib_{t // 1024}k"] = round(gib, 3)
            print(f"{'cpu':<10}{1024:>6}{t:>8}{'bf16':>6}  {name if name == 'naive' else 'xla_chunked':<14}{gib:>10.3f}")
    for w_dtype, tag in ((jnp.bfloat16, "bf16"), (jnp.float32, "f32")):
        gib = temp_gib(fused("xla_chunked"), 8192, 5120, w_dtype)
        out[f"fused_temp_gib_8k_h5120_{tag}_head"] = round(gib, 3)
        print(f"{'cpu':<10}{5120:>6}{8192:>8}{tag:>6}  {'xla_chunked':<14}{gib:>10.3f}")
    out["naive_temp_gib_8k_h5120"] = round(temp_gib(naive, 8192, 5120), 3)
    print(f"{'cpu':<10}{5120:>6}{8192:>8}{'bf16':>6}  {'naive':<14}{out['naive_temp_gib_8k_h5120']:>10.3f}")
    out["growth_32k_over_8k"] = round(out["fused_temp_gib_32k"] / out["fused_temp_gib_8k"], 3)

    try:
        from her_jax.parallel.topology import parse_slice

        devices = parse_slice("v5p-8").devices()
    except RuntimeError as e:
        print(f"(no TPU AOT figures: {e})")
    else:
        chip = jax.sharding.SingleDeviceSharding(devices[0])
        for h, t in ((1024, 8192), (1024, 32768), (5120, 8192)):
            for name, fn in (("naive", naive), ("xla_chunked", fused("xla_chunked")), ("pallas_tpu", fused("pallas_tpu"))):
                gib = temp_gib(fn, t, h, sharding=chip)
                out[f"tpu_v5p_{name}_temp_gib_{t // 1024}k_h{h}"] = round(gib, 3)
                print(f"{'tpu v5p':<10}{h:>6}{t:>8}{'bf16':>6}  {name:<14}{gib:>10.3f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
