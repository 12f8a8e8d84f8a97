"""python -m her_jax.train — the training entry point (SFT lands with issue 5)."""

import sys


def main() -> int:
    print("her_jax.train: SFT training is not implemented yet (it lands with the SFT issue). "
          "Available now: the Qwen3 model (her_jax.model), HF conversion (python -m her_jax.convert).",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
