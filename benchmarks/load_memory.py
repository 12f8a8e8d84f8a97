"""Peak host memory while loading an HF checkpoint: streaming `load_hf` vs `safetensors.numpy.load_file`.

Writes a synthetic Qwen3 checkpoint of about --size-gb (Qwen3-0.6B widths, real vocabulary,
untied head, enough layers to reach the size, bf16, sharded with an index), then loads it in a
fresh child process per loader and reads that process's peak RSS (`VmHWM`, which counts
memory-mapped file pages too; `ru_maxrss` would inherit the parent's peak across exec). Streaming must stay within model bytes + 3 x largest tensor +
300 MB: no second copy of the model at any moment.

    python benchmarks/load_memory.py [--size-gb 2.0] [--keep DIR]

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

MB = 10**6
GIB = 2**30


def synthetic_config(size_bytes: int) -> dict:
    from her_jax.model.config import HF_PRESETS

    base = {**HF_PRESETS["qwen3-0.6b"], "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    d, q, kv, f, v = (base["hidden_size"], base["num_attention_heads"] * 128, base["num_key_value_heads"] * 128,
                      base["intermediate_size"], base["vocab_size"])
    per_layer = 2 * (d * q * 2 + d * kv * 2 + 3 * d * f + 2 * d + 2 * 128)
    embeddings = 2 * (2 * v * d + d)
    return {**base, "num_hidden_layers": max(1, round((size_bytes - embeddings) / per_layer))}


def write_checkpoint(folder: str, config: dict) -> tuple[int, int]:
    """Random bf16 weights streamed to disk one tensor at a time; returns (total bytes, largest)."""
    import ml_dtypes

    from her_jax.convert.hf import export_plan, hf_shape
    from her_jax.convert.safetensors_stream import (
        Entry, StreamWriter, plan_shards, shard_file_names, write_index,
    )
    from her_jax.model import Qwen3Config, abstract_model
    from flax import nnx

    os.makedirs(folder, exist_ok=True)
    ours = Qwen3Config.from_hf(config)
    state = nnx.state(abstract_model(ours))
    entries = []
    for rule, name, layer in export_plan(ours):
        node = state
        for key in rule.ours.split("/"):
            node = node[key]
        shape = node.get_value().shape
        entries.append(Entry(name, "BF16", hf_shape(rule.layout, shape[layer is not None:])))
    shards = plan_shards(entries, 1 * 10**9)
    files = shard_file_names(len(shards))
    rng = np.random.default_rng(0)
    for file, shard in zip(files, shards):
        with StreamWriter(os.path.join(folder, file), shard) as w:
            for e in shard:
                w.write(e.name, (rng.standard_normal(e.shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16))
    if len(shards) > 1:
        write_index(folder, zip(files, shards))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return sum(e.nbytes for e in entries), max(e.nbytes for e in entries)


def _peak_rss() -> int:
    """High-water resident set of this process (file-backed and anonymous pages), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(folder: str, loader: str) -> None:
    """Runs in a fresh process: load with `loader`, print baseline and peak RSS as JSON."""
    import jax
    import psutil

    from her_jax.convert.hf import load_hf  # noqa: F401  (imports counted in the baseline)

    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if loader == "stream":
        model = load_hf(folder, progress=False)
        from flax import nnx

        arrays = jax.tree.leaves(nnx.state(model))
    else:  # the common one-liner: every tensor into host memory, then onto the device
        import safetensors.numpy

        host = {}
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                host.update(safetensors.numpy.load_file(os.path.join(folder, name)))
        arrays = [jax.device_put(a) for a in host.values()]
    jax.block_until_ready(arrays)
    seconds = time.perf_counter() - start
    loaded = sum(a.nbytes for a in arrays)
    peak = _peak_rss()
    print(json.dumps({"baseline_rss": baseline, "peak_rss": peak, "loaded_bytes": loaded, "seconds": seconds}))


def run_child(folder: str, loader: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, __file__, "--child", folder, loader], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{loader} loader failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size in GB (default 2.0)")
    p.add_argument("--keep", help="write the checkpoint here and keep it (default: a temporary folder)")
    p.add_argument("--child", nargs=2, metavar=("FOLDER", "LOADER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)

    config = synthetic_config(int(args.size_gb * 10**9))
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or os.path.join(tmp, "ckpt")
        model_bytes, largest = write_checkpoint(folder, config)
        stream = run_child(folder, "stream")
        plain = run_child(folder, "plain")
    bound = model_bytes + 3 * largest + 300 * MB
    assert stream["loaded_bytes"] == model_bytes == plain["loaded_bytes"]

    rows = [("checkpoint (bf16, %d layers)" % config["num_hidden_layers"], model_bytes),
            ("largest tensor", largest), ("bound: model + 3 x largest + 300 MB", bound),
            ("load_hf (streaming): peak RSS", stream["peak_rss"]),
            ("  of which baseline after imports", stream["baseline_rss"]),
            ("load_file + device_put: peak RSS", plain["peak_rss"])]
    for label, value in rows:
        print(f"{label:<40} {value / GIB:8.3f} GiB")
    print(f"{'load_hf seconds / plain seconds':<40} {stream['seconds']:8.2f} / {plain['seconds']:.2f}")
    print(json.dumps({
        "model_gib": round(model_bytes / GIB, 4),
        "largest_tensor_gib": round(largest / GIB, 4),
        "peak_rss_gib": round(stream["peak_rss"] / GIB, 4),
        "baseline_rss_gib": round(stream["baseline_rss"] / GIB, 4),
        "bound_gib": round(bound / GIB, 4),
        "within_bound": stream["peak_rss"] <= bound,
        "peak_over_model_plus_largest": round(stream["peak_rss"] / (model_bytes + largest), 4),
        "plain_peak_rss_gib": round(plain["peak_rss"] / GIB, 4),
        "plain_over_stream_peak": round(plain["peak_rss"] / stream["peak_rss"], 4),
    }))


if __name__ == "__main__":
    main()
