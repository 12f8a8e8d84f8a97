"""Fit table: which Qwen3 SFT runs fit which TPU slices, from AOT compiles on this host (libtpu).

For each (model, slice, sequence length) it compiles the trainer's step with `her_jax.aot` and
records per-chip memory, the HBM margin and compiled / model FLOPs. Prints a table, writes it as
Markdown between the markers in README.md (with --write), and ends with one JSON line.

    python benchmarks/tpu_fit.py [--write] [--only 32b]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOC = os.path.join(ROOT, "README.md")
BEGIN, END = "<!-- tpu_fit:begin -->", "<!-- tpu_fit:end -->"

# (config, slice, preset or None = the config's model, overrides)
ROWS = [
    ("qwen3_0.6b_single_host.yaml", "v5p-8", "qwen3-0.6b", []),
    ("qwen3_0.6b_single_host.yaml", "v6e-8", "qwen3-0.6b", ["micro_batches=1"]),
    ("qwen3_8b_sft_v5p.yaml", "v5p-8", None, []),
    ("qwen3_8b_sft_v5p.yaml", "v6e-16", None, ["model.remat=full", "data.batch_size=16"]),
    ("qwen3_14b_sft_v5e.yaml", "v5e-64", None, []),
    ("qwen3_32b_sft_v5p.yaml", "v5p-32", None, []),
    ("qwen3_32b_sft_v5p.yaml", "v5p-32", None, ["model.remat=full"]),
    ("qwen3_32b_sft_v5p.yaml", "v5p-32", None, ["model.remat=mlp_offload"]),
    ("qwen3_32b_sft_v5p_32k.yaml", "v5p-64", None, []),
    ("qwen3_32b_sft_v6e.yaml", "v6e-128", None, []),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"write the table into {os.path.relpath(DOC, ROOT)}")
    p.add_argument("--only", help="rows whose config or slice contains this text")
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    from her_jax.aot import analyse
    from her_jax.train.config import load_config

    results = []
    header = (f"{'model':<11}{'slice':<9}{'seq':>7}{'rows':>6}{'remat':>13}{'GiB/chip':>10}{'HBM':>6}{'margin':>8}"
              f"{'FLOPs c/m':>11}{'pallas':>8}  config")
    print(header)
    for config, topology, preset, overrides in ROWS:
        if args.only and args.only not in config and args.only not in topology:
            continue
        start = time.perf_counter()
        cfg = load_config(os.path.join(ROOT, "configs", config), overrides)
        r = analyse(cfg, topology, preset_name=preset)
        row = {"config": config + "".join(f" {o}" for o in overrides), "slice": topology, "model": r.model,
               "seq_len": r.seq_len, "rows": r.batch_size, "micro_batches": r.micro_batches, "remat": r.remat,
               "per_device_gib": round(r.per_device_gib, 2), "hbm_gib": r.hbm_gib, "margin": round(r.margin, 3),
               "host_gib": round(r.host_gib, 2), "flops_ratio": r.flops_ratio and round(r.flops_ratio, 3),
               "pallas_calls": r.pallas_calls, "fits": r.fits, "seconds": round(time.perf_counter() - start, 1)}
        results.append(row)
        ratio = f"{row['flops_ratio']:.3f}" if row["flops_ratio"] else "-"
        if r.error:
            row["error"] = r.error
            print(f"  does not fit: {r.error[:300]}")
        print(f"{row['model']:<11}{topology:<9}{r.seq_len:>7}{r.batch_size:>6}{r.remat:>13}"
              f"{row['per_device_gib']:>10.2f}{r.hbm_gib:>6.0f}{100 * r.margin:>7.1f}%{ratio:>11}"
              f"{r.pallas_calls:>8}  {row['config']}", flush=True)
    if args.write:
        write_doc(results)
    print(json.dumps({"rows": results}))
    return 0


def _key(config: str, topology: str) -> str:
    return f"{topology} `{config}`"


def write_doc(results: list[dict]) -> None:
    """Rows measured now replace their old lines; rows not measured this time (--only) stay."""
    text = open(DOC, encoding="utf-8").read()
    head, rest = text.split(BEGIN, 1)
    table, tail = rest.split(END, 1)
    old = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 12 and cells[11].startswith("`"):
            old[_key(cells[11].strip("`"), cells[1])] = line
    new = {}
    for r in results:
        ratio = f"{r['flops_ratio']:.3f}" if r["flops_ratio"] else "-"
        fit = (f"{r['per_device_gib']:.2f} | {r['hbm_gib']:.0f} | {100 * r['margin']:.1f} %" if r["fits"] else
               f"does not fit | {r['hbm_gib']:.0f} | -")
        new[_key(r["config"], r["slice"])] = (
            f"| {r['model']} | {r['slice']} | {r['seq_len']:,} | {r['rows']} | {r['remat']} | {fit} | "
            f"{r['host_gib']:.1f} | {ratio} | {r['pallas_calls']} | `{r['config']}` |")
    order = [_key(c + "".join(f" {o}" for o in ov), t) for c, t, _, ov in ROWS]
    lines = [BEGIN, "", "| model | slice | tokens per row | rows per step | remat | GiB per chip | HBM GiB | margin | "
             "host GiB per chip | compiled / model FLOPs | Pallas calls | config |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    lines += [new.get(k) or old[k] for k in order if k in new or k in old]
    lines += ["", END]
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(head + "\n".join(lines) + tail)


if __name__ == "__main__":
    sys.exit(main())
