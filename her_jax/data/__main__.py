"""python -m her_jax.data inspect | prepare | show — look at role-play data the way training sees it.

  inspect FILE... [--json] [--tokenizer DIR]
      records, units, conversations, turns, trained tokens per layer, single-turn vs dual-view
      token totals, and rejected records by reason (with the first message of each reason).
  prepare FILE... --out DIR
      validate and write the accepted units as a TFDS array_record dataset (+ report JSON).
  show FILE [--index N] [--turn K] [--html OUT.html] [--tokenizer DIR]
      one rendered single-turn sample, coloured by layer.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys


def _inspect(paths, tokenizer_path, as_json: bool) -> int:
    from her_jax.data.format import LAYERS
    from her_jax.data.packing import dual_view_sequences, single_turn_sequences
    from her_jax.data.render import RenderedTurn, Renderer
    from her_jax.data.sources import load
    from her_jax.data.tokenizer import load_tokenizer

    units, report = load(paths)
    renderer = Renderer(load_tokenizer(tokenizer_path))
    per_layer, single, dual, with_system = collections.Counter(), 0, 0, 0
    for _, convs in units:
        for conv in convs:
            rendered = renderer.render(conv)
            for piece in rendered.pieces:
                if isinstance(piece, RenderedTurn):
                    per_layer.update(LAYERS[int(x)] for x in piece.target.layers)
                    with_system += piece.private
            single += sum(len(s["tokens"]) for s in single_turn_sequences(rendered))
            dual += sum(len(s["tokens"]) for s in dual_view_sequences(rendered))
    summary = {**report.to_json(), "turns_with_system_thinking": with_system,
               "trained_tokens_per_layer": {layer: per_layer.get(layer, 0) for layer in LAYERS[1:]},
               "single_turn_tokens": single, "dual_view_tokens": dual,
               "token_ratio": round(single / dual, 4) if dual else None}
    if as_json:
        print(json.dumps(summary, ensure_ascii=False))
        return 0
    print(f"records {summary['records']}  units {summary['units']}  conversations {summary['conversations']}  "
          f"trained turns {summary['turns']} ({with_system} with system thinking)")
    print("trained tokens per layer:")
    for layer, n in summary["trained_tokens_per_layer"].items():
        print(f"  {layer:<16} {n:>10,}")
    print(f"tokens: single-turn {single:,}  dual-view {dual:,}  ratio {summary['token_ratio']}")
    print(f"rejected {summary['rejected_total']}" + ("" if not summary["rejected"] else ":"))
    for reason, n in summary["rejected"].items():
        print(f"  {reason:<26} {n:>6}   e.g. {summary['examples'][reason]}")
    return 0


def _show(path, index: int, turn: int, html_out, tokenizer_path) -> int:
    from her_jax.data.render import RenderedTurn, Renderer, Tokens, show
    from her_jax.data.sources import load
    from her_jax.data.tokenizer import load_tokenizer

    units, report = load([path])
    convs = [c for _, cs in units for c in cs]
    if not convs:
        print(f"error: no usable conversation in {path}: {report.to_json()['rejected']}", file=sys.stderr)
        return 1
    if not 0 <= index < len(convs):
        print(f"error: --index {index}: {path} has conversations 0..{len(convs) - 1}", file=sys.stderr)
        return 1
    tok = load_tokenizer(tokenizer_path)
    rendered = Renderer(tok).render(convs[index])
    turns = [i for i, p in enumerate(rendered.pieces) if isinstance(p, RenderedTurn)]
    k = turn if turn >= 0 else len(turns) + turn
    if not 0 <= k < len(turns):
        print(f"error: --turn {turn}: conversation {convs[index].id} has {len(turns)} trained turns", file=sys.stderr)
        return 1
    parts = [p if isinstance(p, Tokens) else Tokens.concat([p.header, p.history, p.newline])
             for p in rendered.pieces[:turns[k]]]
    target = rendered.pieces[turns[k]]
    sample = Tokens.concat([*parts, target.header, target.target])
    print(f"{convs[index].id}: turn {k + 1} of {len(turns)}, {len(sample)} tokens")
    if html_out:
        with open(html_out, "w", encoding="utf-8") as f:
            f.write(show(tok, sample, html=True))
        print(f"wrote {html_out}")
    else:
        print(show(tok, sample))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m her_jax.data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("inspect", help="counts, tokens per layer, rejects by reason")
    a.add_argument("files", nargs="+", help="data files or folders ('sample' = the bundled corpus)")
    a.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    a.add_argument("--tokenizer", help="HF tokenizer folder (default: offline Qwen3)")
    b = sub.add_parser("prepare", help="validate and write a TFDS array_record dataset")
    b.add_argument("files", nargs="+")
    b.add_argument("--out", required=True, help="output folder")
    c = sub.add_parser("show", help="print one rendered sample coloured by layer")
    c.add_argument("file")
    c.add_argument("--index", type=int, default=0, help="conversation number (default 0)")
    c.add_argument("--turn", type=int, default=-1, help="trained turn, 0-based; negative counts from the end")
    c.add_argument("--html", help="write an HTML file instead of printing")
    c.add_argument("--tokenizer")
    args = p.parse_args(argv)
    try:
        if args.command == "inspect":
            return _inspect(args.files, args.tokenizer, args.json)
        if args.command == "show":
            return _show(args.file, args.index, args.turn, args.html, args.tokenizer)
        from her_jax.data.prepared import prepare

        report = prepare(args.files, args.out)
        print(json.dumps(report.to_json(), ensure_ascii=False, indent=2))
        return 0
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
