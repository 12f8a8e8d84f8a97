"""The quickstart notebook runs top to bottom (tiny settings) so it cannot rot."""

from __future__ import annotations

import json
import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    monkeypatch.setenv("HER_JAX_QUICKSTART_STEPS", "2")
    monkeypatch.setenv("HER_JAX_QUICKSTART_OVERRIDES", json.dumps([
        "data.seq_len=1024", "tensorboard=false",
        "model.overrides={hidden_size: 32, head_dim: 8, intermediate_size: 64, num_hidden_layers: 2}"]))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = ["".join(o.get("text", "") + str(o.get("data", {}).get("text/html", "")) for o in c.get("outputs", []))
               for c in nb.cells if c.cell_type == "code"]
    assert "'loss'" in outputs[1]
    assert 'title="system_thinking"' in outputs[3]
    assert "config.json" in outputs[4] and "Qwen3ForCausalLM loaded" in outputs[4]
    assert os.path.exists(tmp_path / "runs" / "quickstart" / "hf" / "model.safetensors")
