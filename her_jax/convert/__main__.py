"""python -m her_jax.convert from-hf | to-hf — move Qwen3 weights between HF folders and Orbax.

  from-hf --hf DIR --out CKPT [--dtype float32|bfloat16] [--force]
      HF folder (config.json + safetensors [+ tokenizer]) -> Orbax checkpoint with the model
      config (and the tokenizer files, when the folder has them).
  to-hf --checkpoint CKPT --out DIR [--dtype ...] [--tokenizer DIR] [--max-shard-size 5GB]
        [--push-to-hub OWNER/NAME [--private]]
      Orbax checkpoint -> HF folder that transformers loads; optionally published to the Hub
      (token from HF_TOKEN or the huggingface_hub login; never printed or stored).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("her_jax.convert")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m her_jax.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-hf", help="HF model folder -> Orbax checkpoint")
    a.add_argument("--hf", required=True, help="HF model folder (config.json + *.safetensors)")
    a.add_argument("--out", required=True, help="checkpoint folder to create")
    a.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="parameter dtype (default: the checkpoint's)")
    a.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    b = sub.add_parser("to-hf", help="Orbax checkpoint -> HF model folder")
    b.add_argument("--checkpoint", required=True, help="checkpoint folder written by from-hf or training")
    b.add_argument("--out", required=True, help="HF folder to write")
    b.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="stored dtype (default: the original HF dtype, else the parameter dtype)")
    b.add_argument("--tokenizer", help="copy tokenizer files from this folder (default: those in the checkpoint)")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    b.add_argument("--push-to-hub", metavar="OWNER/NAME", help="upload the folder to this Hub repository")
    b.add_argument("--private", action="store_true", help="create the Hub repository as private")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("her_jax").setLevel(logging.INFO)

    import jax
    from flax import nnx

    from her_jax.convert.hf import ConversionError, load_hf, save_hf
    from her_jax.convert.hub import HubError, push_to_hub
    from her_jax.data.tokenizer import tokenizer_files
    from her_jax.model.config import ConfigError
    from her_jax.parallel.mesh import initialize_distributed, make_mesh
    from her_jax.train.checkpoint import CheckpointMismatchError, load_model, restore_tokenizer, save_model

    initialize_distributed()
    mesh = make_mesh()
    try:
        if args.command == "from-hf":
            if os.path.exists(args.out) and not args.force:
                raise ConversionError(f"{args.out} exists; pass --force to overwrite it")
            model = load_hf(args.hf, mesh=mesh, dtype=args.dtype)
            try:
                tokenizer_files(args.hf)
                tokenizer = args.hf
            except FileNotFoundError:
                tokenizer = None
                log.warning("%s has no tokenizer files; the checkpoint will not carry a tokenizer", args.hf)
            path = save_model(model, args.out, tokenizer_dir=tokenizer, force=args.force)
            n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
            log.info("wrote %s (%s parameters, %s)", path, f"{n:,}", model.config.param_dtype)
        else:
            model = load_model(args.checkpoint, mesh=mesh)
            out = save_hf(model, args.out, tokenizer_dir=args.tokenizer, max_shard_size=args.max_shard_size,
                          dtype=args.dtype)
            if args.tokenizer is None and jax.process_index() == 0:
                if not restore_tokenizer(args.checkpoint, out):
                    log.warning("the checkpoint carries no tokenizer; pass --tokenizer DIR for a complete HF folder")
            log.info("wrote %s", out)
            if args.push_to_hub:
                url = push_to_hub(out, args.push_to_hub, private=args.private)
                log.info("pushed to %s", url)
    except (ConversionError, ConfigError, CheckpointMismatchError, HubError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
