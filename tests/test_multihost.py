"""Two JAX processes on loopback (4 CPU devices each) load, run and export one sharded model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
from helpers import assert_bit_exact, hf_logits, hf_model, hf_tensors, rel_err, save_hf_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_load_run_and_export(tmp_path, rng):
    hf = hf_model(13, vocab_size=128, hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    folder = save_hf_model(hf, tmp_path / "hf")
    tokens = rng.integers(0, 128, (8, 10)).astype(np.int32)
    np.save(tmp_path / "tokens.npy", tokens)

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    worker = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, worker, str(i), str(port), folder, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"

    assert rel_err(np.load(tmp_path / "logits.npy"), hf_logits(hf, tokens)) <= 1e-4
    assert_bit_exact(hf_tensors(folder), hf_tensors(tmp_path / "export"))
