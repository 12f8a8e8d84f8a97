"""python -m her_jax.train [--config FILE.yaml] [key=value ...] — train (SFT now; more stages later).

With no arguments: a tiny Qwen3 on the bundled sample corpus, on this machine, into runs/default.
Overrides use dotted keys with YAML values, e.g. `steps=200 data.seq_len=4096 optim.lr=1e-5`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m her_jax.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML run config (default: the built-in tiny CPU run)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys, YAML values")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("her_jax").setLevel(logging.INFO)

    from her_jax.train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from her_jax.train.sft import NonFiniteError, Trainer

    try:
        trainer = Trainer(cfg)
        last = trainer.run()
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if trainer.main:
        status = "stopped early (SIGTERM)" if trainer.iteration < cfg.steps else "done"
        print(f"{status}: step {trainer.iteration}/{cfg.steps}, loss {last.get('loss', float('nan')):.4f}"
              + (f", eval loss {last['eval_loss']:.4f}" if last.get("eval_loss") is not None else "")
              + f"\nrun folder: {os.path.abspath(cfg.output_dir)} (metrics.jsonl, tensorboard/, checkpoints/"
              + (", final/, loss.png)" if trainer.iteration >= cfg.steps else ")")
              + (f"\nexport: python -m her_jax.convert to-hf --checkpoint {cfg.output_dir}/final --out "
                 f"{cfg.output_dir}/hf" if trainer.iteration >= cfg.steps else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
