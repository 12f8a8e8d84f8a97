"""The fused LM-head loss on a GPU: correctness and speed of `pallas_gpu` against `xla_chunked` and
the naive full-logits loss, side by side in one run (needs a CUDA GPU; nothing to run on CPU).

For V = 151,936 and T = 8,192 tokens in bf16, at Qwen3 hidden sizes 1,024 / 4,096 / 5,120:
- correctness: log-prob, log-sum-exp and entropy of each implementation against an f32 reference
  (full logits at `highest` matmul precision from the same bf16 inputs), relative max error;
- time of the forward alone (what RL's old-policy / reference log-probs use) and of
  forward + backward (SFT), median of --repeats after a warm-up, and each time as a ratio to
  `xla_chunked`'s;
- temporary memory of the compiled forward + backward (`memory_analysis`).
The Pallas kernel is called directly, so a kernel that does not compile shows as an error here
instead of the dispatcher's silent fall-back. Exit 1 when a check fails. Ends with one JSON line.
With --sweep, instead: the forward time of the Pallas kernel for each tile configuration
(tokens x vocab x hidden tile, warps, pipeline stages), fastest first, per hidden size.

    JAX_PLATFORMS=cuda python benchmarks/loss_gpu.py [--repeats 10] [--tokens 8192] [--sweep]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

V = 151936
GIB = 2**30
# Max error relative to the largest reference value. The inputs are exact bf16 values and every
# implementation accumulates in f32, so only f32 rounding separates them (H100: <= 3.3e-6 seen).
TOL = {"logprob": 1e-4, "lse": 1e-4, "entropy": 1e-4}


def problem(h: int, tokens: int):
    """bf16 hidden states [T, H], a bf16 head [V, H] and targets [T], seeded by H."""
    import jax
    import jax.numpy as jnp

    k1, k2, k3 = jax.random.split(jax.random.key(h), 3)
    x = jax.random.normal(k1, (tokens, h), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(k2, (V, h), jnp.float32) * h ** -0.5).astype(jnp.bfloat16)
    return x, w, jax.random.randint(k3, (tokens,), 0, V, jnp.int32)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 4096, 5120])
    p.add_argument("--sweep", action="store_true", help="time the kernel's tile configurations instead")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from her_jax.kernels import dual_layer_loss as dll

    if jax.default_backend() not in ("gpu", "cuda", "rocm"):
        print(f"loss_gpu: needs a GPU backend, found {jax.default_backend()!r}", file=sys.stderr)
        return 2
    dev = jax.devices()[0]
    print(f"{dev.device_kind}; jax {jax.__version__}; T={args.tokens}, V={V}, bf16 inputs")
    gpu_kernel = dll._kernel_module("pallas_gpu")

    def stats_fn(impl):
        if impl == "pallas_gpu":
            return lambda x, w, y: gpu_kernel.token_stats(x, w, y, vocab_size=V, scale=1.0, entropy=True)
        if impl == "naive":
            return lambda x, w, y: dll.reference_token_stats(x, w, y, vocab_size=V, temperature=1.0, entropy=True)
        return lambda x, w, y: dll.token_stats(x, w, y, entropy=True, impl=impl)

    def timed(fn, *a):
        jax.block_until_ready(fn(*a))
        ts = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*a))
            ts.append(time.perf_counter() - start)
        return float(np.median(ts)) * 1e3

    if args.sweep:
        return sweep(args, gpu_kernel, timed)

    rows, ok = [], True
    for h in args.hidden:
        x, w, y = problem(h, args.tokens)
        with jax.default_matmul_precision("highest"):
            ref = jax.jit(lambda x, w, y: dll.reference_token_stats(x.astype(jnp.float32), w.astype(jnp.float32), y,
                                                                    vocab_size=V, temperature=1.0, entropy=True))(x, w, y)
        for impl in ("pallas_gpu", "xla_chunked", "naive"):
            row = {"hidden": h, "impl": impl}
            f = stats_fn(impl)
            try:
                fwd = jax.jit(lambda x, w, y, f=f: jax.lax.stop_gradient(f(x, w, y)))
                loss = lambda x, w, y, f=f: jnp.sum(f(x, w, y).logprob)
                step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
                out = fwd(x, w, y)
                for name in TOL:
                    a, b = np.asarray(getattr(out, name), np.float64), np.asarray(getattr(ref, name), np.float64)
                    row[f"err_{name}"] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
                    ok &= bool(row[f"err_{name}"] <= TOL[name])
                row["fwd_ms"] = timed(fwd, x, w, y)
                row["fwd_bwd_ms"] = timed(step, x, w, y)
                mem = step.lower(x, w, y).compile().memory_analysis()
                row["temp_gib"] = round(mem.temp_size_in_bytes / GIB, 3) if mem is not None else None
            except Exception as e:  # noqa: BLE001 - report which implementation failed and go on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                ok &= impl == "naive"  # the naive loss may legitimately run out of memory
            rows.append(row)
        base = next(r for r in rows if r["hidden"] == h and r["impl"] == "xla_chunked")
        for r in rows:
            if r["hidden"] == h and "fwd_ms" in r and "fwd_ms" in base:
                r["fwd_vs_chunked"] = round(r["fwd_ms"] / base["fwd_ms"], 3)
                r["fwd_bwd_vs_chunked"] = round(r["fwd_bwd_ms"] / base["fwd_bwd_ms"], 3)

    print(f"{'H':>5} {'impl':<12}{'fwd ms':>9}{'x chunked':>10}{'fwd+bwd ms':>12}{'x chunked':>10}{'temp GiB':>10}"
          f"{'err lp':>10}{'err lse':>10}{'err ent':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['hidden']:>5} {r['impl']:<12}{r['error']}")
            continue
        print(f"{r['hidden']:>5} {r['impl']:<12}{r['fwd_ms']:>9.2f}{r.get('fwd_vs_chunked', 0):>10.3f}"
              f"{r['fwd_bwd_ms']:>12.2f}{r.get('fwd_bwd_vs_chunked', 0):>10.3f}{r['temp_gib'] or 0:>10.3f}"
              f"{r['err_logprob']:>10.1e}{r['err_lse']:>10.1e}{r['err_entropy']:>10.1e}")
    print(json.dumps({"device": dev.device_kind, "tokens": args.tokens, "checks_pass": ok, "rows": rows}))
    return 0 if ok else 1


def sweep(args, gpu_kernel, timed) -> int:
    import itertools

    import jax
    import jax.numpy as jnp

    best = {}
    for h in args.hidden:
        x, w, y = problem(h, args.tokens)
        results = []
        for bt, bv, bh, warps, stages in itertools.product((64, 128), (64, 128, 256), (64, 128), (4, 8), (2, 3)):
            if h % bh or bt * bv > 128 * 128 or (bt * bv == 128 * 128 and warps == 4):
                continue
            cfg = dict(block_t=bt, block_v=bv, block_h=bh, num_warps=warps, num_stages=stages)
            fwd = jax.jit(lambda x, w, y, cfg=cfg: jax.lax.stop_gradient(
                gpu_kernel.token_stats(x, w, y, vocab_size=V, scale=1.0, entropy=True, **cfg)))
            try:
                results.append((timed(fwd, x, w, y), cfg))
                print(f"  H={h} {results[-1][0]:8.2f} ms  {cfg}", flush=True)
            except Exception as e:  # noqa: BLE001 - a configuration the compiler rejects is skipped
                print(f"H={h} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        results.sort(key=lambda r: r[0])
        print(f"H={h}: {len(results)} configurations; fastest:")
        for ms, cfg in results[:6]:
            print(f"  {ms:8.2f} ms  {cfg}")
        default = next((ms for ms, cfg in results if cfg == dict(block_t=64, block_v=256, block_h=min(h & -h, 64),
                                                                   num_warps=8, num_stages=3)), None)
        # the fastest tiles must give the same numbers as the default ones
        outs = [gpu_kernel.token_stats(x, w, y, vocab_size=V, scale=1.0, entropy=True, **cfg)
                for cfg in (results[0][1], {})]
        diff = max(float(jnp.max(jnp.abs(getattr(outs[0], n) - getattr(outs[1], n)))) for n in TOL)
        print(f"  fastest vs default tiles: max abs difference {diff:.2e}")
        best[h] = {"ms": results[0][0], **results[0][1], "current_default_ms": default, "max_abs_diff": diff}
    print(json.dumps({"sweep": best}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
