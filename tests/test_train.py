"""`python -m her_jax.train`: config, exact accumulation, resume after kill -9, SIGTERM, non-finite
guard, two processes, and the run folder a user gets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from her_jax.train.config import ConfigError, load_config

TINY = ["progress=false", "data.seq_len=1024", "eval_batches=1", "eval_every=2", "checkpoint_every=2",
        "model.overrides={hidden_size: 32, head_dim: 8, intermediate_size: 64, num_hidden_layers: 2}"]
ONE_DEVICE = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}


def metrics(run) -> dict[int, dict]:
    """step -> the last record written for it."""
    out = {}
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r
    return out


def train_cmd(run, *extra):
    return [sys.executable, "-m", "her_jax.train", f"output_dir={run}", *TINY, *extra]


# -- config -----------------------------------------------------------------------------------------

def test_config_errors_name_the_key(tmp_path):
    assert load_config().steps == 45 and load_config().model.preset == "qwen3-tiny"
    cfg = load_config(None, ["steps=5", "optim.lr=1e-4", "data.sources=[a.jsonl, b.jsonl]", "mesh.fsdp=2"])
    assert (cfg.steps, cfg.optim.lr, cfg.data.sources, cfg.mesh.fsdp) == (5, 1e-4, ("a.jsonl", "b.jsonl"), 2)
    for override, message in (("optim.lrr=1", "unknown config key 'optim.lrr'"), ("steps=abc", "steps: expected int"),
                              ("steps=0", "steps: expected a positive integer"),
                              ("data.mode=triple", "data.mode: expected one of"),
                              ("data.layer_weights.speech=-1", "layer_weights.speech"),
                              ("micro_batches=3", "not divisible by micro_batches=3"),
                              ("model.dtype=float8", "model.dtype"), ("stage=rl", "stage"), ("nokey", "key=value"),
                              ("model.hf=x", "model.overrides: only a preset"),
                              ("model.overrides={hidden_size:32}", "unknown Qwen3Config field 'hidden_size:32'")):
        extra = ["model.overrides={hidden_size: 32}"] if override == "model.hf=x" else []
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override, *extra])
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    names = sorted(n for n in os.listdir(root) if n.endswith(".yaml"))
    assert {"default.yaml", "qwen3_32b_sft_v5p.yaml"} <= set(names)
    for name in names:
        load_config(os.path.join(root, name))
    assert load_config(os.path.join(root, "default.yaml")) == load_config()


def test_cli_reports_config_errors(capsys):
    from her_jax.train.__main__ import main

    assert main(["steps=-3"]) == 2
    assert "config error: steps" in capsys.readouterr().err


# -- in-process: accumulation and the non-finite guard -----------------------------------------------

def _trainer(tmp_path, name, *extra):
    from her_jax.train.sft import Trainer

    cfg = load_config(None, [f"output_dir={tmp_path / name}", *TINY, "eval_fraction=0", "tensorboard=false",
                             "plot=false", *extra])
    return Trainer(cfg)


def test_accumulation_equals_one_large_batch(tmp_path):
    """4 micro-batches of 2 rows give the same step as one batch of 8 rows (loss and parameters)."""
    import jax

    from her_jax.train.checkpoint import load_model

    for micro in (1, 4):
        subprocess.run(train_cmd(tmp_path / f"m{micro}", "steps=1", "data.batch_size=8", f"micro_batches={micro}",
                                 "eval_fraction=0", "tensorboard=false", "plot=false"),
                       env=ONE_DEVICE, check=True, capture_output=True, timeout=600)
    one, four = metrics(tmp_path / "m1")[1], metrics(tmp_path / "m4")[1]
    assert one["batch_fingerprint"] == four["batch_fingerprint"] and one["trained_tokens"] == four["trained_tokens"] > 0
    assert abs(one["loss"] - four["loss"]) <= 1e-6 * abs(one["loss"])
    assert abs(one["grad_norm"] - four["grad_norm"]) <= 1e-6 * abs(one["grad_norm"])
    for a, b in zip(*(jax.tree.leaves(nnx.state(load_model(tmp_path / f"m{m}"))) for m in (1, 4))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    import jax
    import jax.numpy as jnp

    from her_jax.train import sft
    from her_jax.train.sft import NonFiniteError

    extra = ["data.batch_size=8", "max_nonfinite=2", "eval_fraction=0"]
    subprocess.run(train_cmd(tmp_path / "run", "steps=2", *extra, "tensorboard=false", "plot=false"), env=ONE_DEVICE,
                   check=True, capture_output=True, timeout=600)  # two good steps, checkpointed
    from her_jax.train.checkpoint import load_model

    good = jax.tree.leaves(nnx.state(load_model(tmp_path / "run" / "checkpoints" / "2")))
    real_loss = sft.sft_loss

    def poisoned(model, batch, **kw):
        out = real_loss(model, batch, **kw)
        return out._replace(loss_sum=out.loss_sum * jnp.nan)

    monkeypatch.setattr(sft, "sft_loss", poisoned)
    resumed = _trainer(tmp_path, "run", "steps=10", *extra, "mesh={data: 1, fsdp: 8, tensor: 1}")  # another mesh
    assert resumed.iteration == 2
    assert resumed.state[0]["layers"]["mlp"]["up_proj"][...].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", None)
    with pytest.raises(NonFiniteError, match="2 consecutive steps with a non-finite"):
        resumed.run()
    assert resumed.checkpoints.latest_step() == 2  # nothing saved after the good state
    for a, b in zip(good, jax.tree.leaves(jax.device_get(resumed.state[0]))):
        np.testing.assert_array_equal(np.asarray(a), b)  # the bad steps changed nothing
    records = metrics(tmp_path / "run")
    assert records[3]["finite"] is False and records[4]["finite"] is False


# -- subprocesses: kill -9 and resume, SIGTERM, two processes ------------------------------------------

def test_kill_and_resume_continue_exactly(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(train_cmd(full, "steps=6"), env=ONE_DEVICE, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(train_cmd(killed, "steps=6"), env=ONE_DEVICE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for the committed step-2 checkpoint and step 3 to be logged
        if (killed / "checkpoints" / "2").is_dir() and (killed / "metrics.jsonl").exists() and 3 in metrics(killed):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 in metrics(killed) and 6 not in metrics(killed)
    subprocess.run(train_cmd(killed, "steps=6"), env=ONE_DEVICE, check=True, capture_output=True, timeout=600)
    a, b = metrics(full), metrics(killed)
    for step in range(3, 7):
        assert b[step]["batch_fingerprint"] == a[step]["batch_fingerprint"], step  # same data, none repeated
        assert abs(b[step]["loss"] - a[step]["loss"]) <= 1e-6 * abs(a[step]["loss"]), step
    assert a[6]["eval_loss"] == pytest.approx(b[6]["eval_loss"], rel=1e-6)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(run, "steps=10000", "checkpoint_every=10000"), env=ONE_DEVICE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and metrics(run)):
        time.sleep(0.2)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:]
    assert time.time() - sent < 30
    steps = sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit())
    assert steps and steps[-1] == max(metrics(run))
    assert "stopped early (SIGTERM)" in out


def test_two_processes_train_and_checkpoint(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2"}
    cmd = train_cmd(run, "steps=2", "data.batch_size=4", "mesh={data: 1, fsdp: 4, tensor: 2}", "eval_fraction=0")
    procs = [subprocess.Popen(cmd, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
    assert sorted(metrics(run)) == [1, 2]
    assert (run / "checkpoints" / "2").is_dir() and (run / "final").is_dir()
    assert "done: step 2/2" in outs[0] and "done:" not in outs[1]  # process 0 reports


# -- the run folder ------------------------------------------------------------------------------------

def test_run_folder_exports_to_transformers(tmp_path):
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from her_jax.convert.__main__ import main as convert

    run = tmp_path / "run"
    subprocess.run(train_cmd(run, "steps=2"), env=ONE_DEVICE, check=True, capture_output=True, timeout=600)
    assert {"metrics.jsonl", "tensorboard", "checkpoints", "final", "loss.png"} <= set(os.listdir(run))
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run / "tensorboard"))
    record = metrics(run)[2]
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "loss/system_thinking", "loss/speech", "eval_loss"} <= set(record)
    assert convert(["to-hf", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0  # the run folder
    model = Qwen3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok("<|im_start|>assistant\n<system_thinking>", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_training_starts_from_an_hf_folder(tmp_path):
    from her_jax.convert.hf import save_hf
    from her_jax.model import init_model, preset

    config = preset("qwen3-tiny").replace(hidden_size=32, head_dim=8, intermediate_size=64, num_hidden_layers=2)
    save_hf(init_model(config, seed=5), tmp_path / "hf", progress=False)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "her_jax.train", f"output_dir={run}", "progress=false", "data.seq_len=1024",
           f"model.hf={tmp_path / 'hf'}", "steps=1", "eval_fraction=0", "tensorboard=false", "plot=false"]
    subprocess.run(cmd, env=ONE_DEVICE, check=True, capture_output=True, timeout=600)
    first = metrics(run)[1]
    assert 5 < first["loss"] < 20 and first["finite"]


def test_wandb_needs_the_package(tmp_path, monkeypatch):
    import builtins

    from her_jax.train.metrics import MetricsWriter

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "wandb"
                        else real_import(name, *a, **k))
    with pytest.raises(RuntimeError, match="wandb_project is set but the wandb package is not installed"):
        MetricsWriter(str(tmp_path), tensorboard=False, wandb_project="her")
