"""Metrics: metrics.jsonl, TensorBoard, optional Weights & Biases, the loss plot, FLOP estimates."""

from __future__ import annotations

import json
import math
import os

from her_jax.model.config import Qwen3Config

# bf16 dense peak FLOP/s per device, by `jax.Device.device_kind` (vendor figures).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU7x": 2307e12,
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
}


def flops_per_token(config: Qwen3Config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward): 6 x the matmul parameters (layers
    and the output head; the embedding lookup is free) plus causal attention: per layer, scores and
    values cost 4 x query width x context forward, with an average context of seq_len / 2."""
    c = config
    q_width, kv_width = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (2 * q_width + 2 * kv_width) + 3 * c.hidden_size * c.intermediate_size
    matmul = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size
    attention = 2 * c.num_hidden_layers * q_width * (seq_len / 2)
    return 6.0 * matmul + 6.0 * attention


def peak_flops(device_kind: str) -> float | None:
    return PEAK_FLOPS.get(device_kind)


class MetricsWriter:
    """Writes on process 0 only; other processes get a writer that does nothing."""

    def __init__(self, output_dir: str, *, tensorboard: bool = True, wandb_project: str | None = None,
                 config: dict | None = None, active: bool = True):
        self.active = active
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = self._wandb = None
        if not active:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("wandb_project is set but the wandb package is not installed "
                                   "(pip install wandb), or unset wandb_project") from None
            self._wandb = wandb.init(project=wandb_project, config=config, dir=output_dir)

    def write(self, step: int, values: dict) -> None:
        if not self.active:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step" and math.isfinite(v)}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        if not self.active:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def read_metrics(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(output_dir: str, out_name: str = "loss.png") -> str | None:
    """Training loss, per-layer losses and eval loss against step, as a PNG in the run folder."""
    rows = read_metrics(output_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        return tuple(zip(*pts)) if pts else None

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        if s := series(key):
            left.plot(*s, style, label=key)
    left.set_xlabel("step"), left.set_ylabel("loss (nats / token)"), left.legend(), left.set_title("loss")
    for key in sorted({k for r in rows for k in r if k.startswith("loss/")}):
        if s := series(key):
            right.plot(*s, label=key.split("/", 1)[1])
    right.set_xlabel("step"), right.set_title("per-layer loss"), right.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(output_dir, out_name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
