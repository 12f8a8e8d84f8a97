"""TPU readiness on this CPU host: slice names, the multi-slice mesh, the golden parameter layout
of Qwen3-32B on v5p-64, and `python -m her_jax.aot` compiling the trainer's step for a TPU slice
(skipped only without libtpu)."""

from __future__ import annotations

import json
import os

import pytest
from helpers import tpu_devices

from her_jax import aot
from her_jax.parallel.rules import MESH_AXES, make_rules, partition_specs
from her_jax.parallel.topology import TopologyError, parse_slice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "sharding_qwen3_32b_v5p64.json")


@pytest.mark.parametrize("name, topology, chips, slices", [
    ("v5p-8", "v5:2x2x1", 4, 1), ("v5p-32", "v5:2x2x4", 16, 1), ("v5p-64", "v5:2x4x4", 32, 1),
    ("v6e-64", "v6e:8x8", 64, 1), ("v5e-256", "v5e:16x16", 256, 1), ("v5litepod-16", "v5e:4x4", 16, 1),
    ("2xv5p-64", "v5:2x4x4", 32, 2), ("v4-16", "v4:2x2x2", 8, 1)])
def test_slice_names_map_to_cloud_topologies(name, topology, chips, slices):
    s = parse_slice(name)
    assert (s.topology_name, s.chips, s.num_slices, s.num_devices) == (topology, chips, slices, chips * slices)


@pytest.mark.parametrize("name, needle", [("v5p-6", "power of two"), ("v7-8", "unknown generation"),
                                          ("v5e-2", "1, 4, 8"), ("tpu", "expected a name like")])
def test_bad_slice_names_say_what_was_expected(name, needle):
    with pytest.raises(TopologyError, match=needle):
        parse_slice(name)


def _layout(mesh_shape, rules=None):
    from flax import nnx

    from her_jax.model import abstract_model, preset
    from her_jax.train.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "qwen3_32b_sft_v5p_32k.yaml"))
    config = preset("qwen3-32b", param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype)
    _, state = nnx.split(abstract_model(config))
    return cfg, partition_specs(state, mesh_shape, **({"rules": rules} if rules else {}))


def _differences(golden: dict, got: dict) -> list[str]:
    names = sorted(set(golden) | set(got))
    return [f"{n}: golden {golden.get(n)} now {got.get(n)}" for n in names if golden.get(n) != got.get(n)]


def test_qwen3_32b_layout_on_v5p_64_matches_the_golden_snapshot():
    cfg, _ = _layout({a: 1 for a in MESH_AXES})
    mesh_shape = dict(zip(MESH_AXES, cfg.mesh.resolve(parse_slice("v5p-64").num_devices)))
    _, got = _layout(mesh_shape)
    if os.environ.get("HER_UPDATE_GOLDEN"):
        with open(GOLDEN, "w", encoding="utf-8") as f:
            json.dump({"model": "qwen3-32b", "topology": "v5p-64", "mesh": mesh_shape, "params": got}, f, indent=1,
                      sort_keys=True)
            f.write("\n")
    with open(GOLDEN, encoding="utf-8") as f:
        golden = json.load(f)
    assert golden["mesh"] == mesh_shape, "the 32k config's mesh changed; rerun with HER_UPDATE_GOLDEN=1 if meant"
    diff = _differences(golden["params"], got)
    assert not diff, ("parameter layout changed (rerun with HER_UPDATE_GOLDEN=1 if meant):\n" + "\n".join(diff))
    # Every weight of every layer is sharded (FSDP), nothing is silently replicated but norms.
    assert len(got) == 14  # embedding, head, final norm and 11 per layer
    for name, entry in got.items():
        sharded = any(p is not None for p in entry["spec"])
        assert sharded == (not name.endswith("norm")), name
    # The comparison does catch a changed rule.
    _, changed = _layout(mesh_shape, make_rules({"embed": None, "mlp": "fsdp"}))
    assert any("mlp" in line for line in _differences(golden["params"], changed))


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(ROOT, "configs"))
                                         if n.startswith("qwen3_") and "single_host" not in n))
def test_pod_configs_resolve_their_model_and_kernels_without_the_weights(name):
    from her_jax.train.config import load_config

    cfg = aot._target_config(load_config(os.path.join(ROOT, "configs", name)))
    config = aot.model_config_for(cfg)  # /mnt/models/Qwen3-32B is not here: the preset of that name
    assert os.path.basename(cfg.model.hf).lower().replace("qwen3-", "") in name
    assert config.num_hidden_layers in (36, 40, 64) and config.attention_impl == "pallas_tpu"
    assert cfg.loss_impl == "pallas_tpu" and cfg.model.dtype == "bfloat16"


def _small_config(tmp_path, **data):
    text = ("stage: sft\nmodel:\n  preset: qwen3-0.6b\n  param_dtype: float32\n  dtype: bfloat16\n  remat: full\n"
            "  overrides: {num_hidden_layers: 2, hidden_size: 256, intermediate_size: 512, num_attention_heads: 4,"
            " num_key_value_heads: 2, head_dim: 128, vocab_size: 16384}\n"
            f"data: {{seq_len: {data.get('seq_len', 512)}, batch_size: {data.get('batch_size', 8)}}}\n"
            "mesh: {data: 1, fsdp: -1, tensor: 1}\n")
    path = tmp_path / "small.yaml"
    path.write_text(text)
    return str(path)


def test_aot_compiles_the_train_step_for_v5p_with_pallas_and_counts_flops(tmp_path, capsys):
    tpu_devices("v5p")  # skips without libtpu
    code = aot.main(["--config", _small_config(tmp_path), "--topology", "v5p-8", "--json"])
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and report["fits"] is True, out
    assert report["attention_impl"] == "pallas_tpu" and report["loss_impl"] == "pallas_tpu"  # auto, resolved for TPU
    # Forward, dQ and dK/dV attention kernels; forward, dX and dW loss kernels (+ the remat forward).
    assert report["pallas_calls"] >= 6
    assert 0 < report["per_device_gib"] < report["hbm_gib"]
    assert abs(report["margin"] - (1 - report["per_device_gib"] / report["hbm_gib"])) < 1e-9
    # Compiled FLOPs cover every layer (the scan body counted once would be far below the model's
    # 6N) and full remat recomputes the forward: between 1x and 1.6x the model estimate.
    assert 1.0 < report["flops_ratio"] < 1.6, report


def test_aot_reports_a_step_that_does_not_fit(tmp_path, capsys):
    tpu_devices("v5e")
    # 16 GiB v5e chips; 64 rows of 32k tokens over 4 chips cannot fit.
    config = _small_config(tmp_path, seq_len=32768, batch_size=64)
    code = aot.main(["--config", config, "--topology", "v5e-4", "--no-flops", "--json",
                     "model.attention_impl=dense", "loss_impl=reference"])
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert code == 1 and report["fits"] is False, out
    assert "does NOT fit" in out and report["error"]


def test_aot_min_margin_and_bad_input(tmp_path, capsys):
    tpu_devices("v5p")
    config = _small_config(tmp_path)
    assert aot.main(["--config", config, "--topology", "v5p-8", "--no-flops", "--min-margin", "0.9999"]) == 1
    assert "below --min-margin" in capsys.readouterr().out
    assert aot.main(["--config", config, "--topology", "v5p-6"]) == 2
    assert "power of two" in capsys.readouterr().err


def test_multi_slice_mesh_puts_only_the_data_axis_across_slices():
    tpu_devices("v5p")
    import numpy as np

    from her_jax.parallel import MeshConfig, make_mesh

    devices = parse_slice("2xv5p-8").devices()
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1), devices=devices)
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert (slices[0] == 0).all() and (slices[1] == 1).all()
    with pytest.raises(ValueError, match="multiple of 2"):
        make_mesh(MeshConfig(data=1, fsdp=-1), devices=devices)
