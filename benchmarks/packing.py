"""Dual-view packing on real role-play data: tokens saved, row fill, pipeline throughput.

Reads the CoSER data in ../shared/data/coser (per-book JSON, the test-set scenes and the ShareGPT
SFT export, converted to HER form) or the files given, and reports per source and in total:
- single_turn_tokens: tokens HER's one-sample-per-turn split encodes;
- dual_view_tokens: tokens dual-view packing encodes for the same training signal;
- token_ratio = single / dual (goal >= 2.0);
- packing_efficiency: share of real tokens in rows of --seq-len built by the pipeline's packer
  (goal >= 0.95);
- tokens_per_s_per_core: dual-view tokens produced (parse -> render -> sequences -> packed rows)
  per second of process CPU time (goal >= 50,000).

    python benchmarks/packing.py [FILES...] [--seq-len 8192] [--bins 64]

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
COSER = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "coser"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help="data files (default: the CoSER files in ../shared/data/coser)")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--bins", type=int, default=64, help="first-fit packing bins")
    args = p.parse_args()
    files = args.files or [os.path.join(COSER, n) for n in ("final", "test_set.json", "sft_sharegpt.json")]
    for f in files:
        if not os.path.exists(f):
            raise SystemExit(f"{f}: not found (the CoSER reference data lives in ../shared/data/coser)")

    import grain

    from her_jax.data.packing import efficiency, pack_dataset, sequences
    from her_jax.data.render import Renderer
    from her_jax.data.sources import load
    from her_jax.data.tokenizer import load_tokenizer

    renderer = Renderer(load_tokenizer())
    rows_out, totals = [], {"single": 0, "dual": 0, "convs": 0, "turns": 0, "rejected": 0, "too_long": 0}
    all_dual, cpu = [], 0.0
    for f in files:
        start = time.process_time()
        units, report = load([f])
        convs = [c for _, cs in units for c in cs]
        dual, too_long = [], 0
        for conv in convs:
            try:
                dual += sequences(renderer.render(conv), "dual_view", max_len=args.seq_len)
            except ValueError:  # FormatError('too_long')
                too_long += 1
        cpu += time.process_time() - start
        single = sum(len(s["tokens"]) for c in convs for s in sequences(renderer.render(c), "single_turn"))
        dual_tokens = sum(len(s["tokens"]) for s in dual)
        all_dual += dual
        rows_out.append((os.path.basename(f.rstrip("/")), len(convs), report.turns, single, dual_tokens,
                         sum(report.rejected.values()), too_long))
        for key, value in (("single", single), ("dual", dual_tokens), ("convs", len(convs)), ("turns", report.turns),
                           ("rejected", sum(report.rejected.values())), ("too_long", too_long)):
            totals[key] += value

    start = time.process_time()
    ds = grain.MapDataset.source(all_dual).shuffle(seed=0).to_iter_dataset()
    packed = list(pack_dataset(ds, args.seq_len, num_bins=args.bins))
    cpu += time.process_time() - start
    fill = efficiency(packed)

    print(f"{'source':<22}{'convs':>7}{'turns':>7}{'single-turn':>13}{'dual-view':>11}{'ratio':>7}"
          f"{'rejected':>10}{'too long':>10}")
    for name, n_conv, turns, single, dual_tokens, rejected, too_long in rows_out:
        print(f"{name:<22}{n_conv:>7}{turns:>7}{single:>13,}{dual_tokens:>11,}{single / max(dual_tokens, 1):>7.2f}"
              f"{rejected:>10}{too_long:>10}")
    ratio = totals["single"] / max(totals["dual"], 1)
    print(f"{'total':<22}{totals['convs']:>7}{totals['turns']:>7}{totals['single']:>13,}{totals['dual']:>11,}"
          f"{ratio:>7.2f}{totals['rejected']:>10}{totals['too_long']:>10}")
    lengths = np.array([len(s["tokens"]) for s in all_dual])
    print(f"dual-view sequences: {len(all_dual)}, length p50 {int(np.median(lengths))}, max {lengths.max()}; "
          f"{len(packed)} rows of {args.seq_len} ({args.bins} bins), fill {fill:.4f}; "
          f"{totals['dual'] / cpu:,.0f} tokens per CPU second")
    print(json.dumps({
        "single_turn_tokens": totals["single"],
        "dual_view_tokens": totals["dual"],
        "token_ratio": round(ratio, 4),
        "packing_efficiency": round(fill, 4),
        "tokens_per_s_per_core": round(totals["dual"] / cpu),
        "seq_len": args.seq_len,
        "conversations": totals["convs"],
        "turns": totals["turns"],
    }))


if __name__ == "__main__":
    main()
