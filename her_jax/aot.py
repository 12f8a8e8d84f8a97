"""python -m her_jax.aot --config RUN.yaml --topology v5p-32 [--json] — will this run fit a TPU slice?

Compiles the trainer's own train step (same model graph, shardings, kernels, remat, optimizer and
micro-batching) for a named TPU slice on this host, with libtpu and no TPU, and reports per chip:
arguments, temporaries and total memory against the chip's HBM, compiled FLOPs against the
model-FLOPs estimate, and whether the Pallas kernels are in the program. The TPU compiler runs for
real, so a program that overflows HBM or VMEM fails here as it would on the pod. Exit status: 0
fits, 1 does not fit (or below --min-margin), 2 bad input.

`cost_analysis()` counts a loop body once (the layer scan, and XLA's collective-matmul loops), so
FLOPs come from two extra compiles of one micro-batch with 1 and 2 unrolled layers and no
collective-matmul loops: compiled = F(1) + (L - 1) * (F(2) - F(1)), times the micro-batches.
Pallas kernels count through their cost estimates (the attention ones assume causal work).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time

log = logging.getLogger("her_jax.aot")
GIB = 2**30
# For the FLOP-counting compiles only: XLA:TPU turns an all-gather + matmul into a "windowed
# einsum" loop (collective matmul) whose body cost_analysis also counts once; without it every
# matmul is straight-line code (same arithmetic, only the overlap of communication differs).
COUNTING_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}
BATCH_FIELDS = {"tokens": "int32", "targets": "int32", "loss_weights": "float32", "layer_ids": "int32",
                "view_ids": "int32", "positions": "int32", "doc_ids": "int32"}


@dataclasses.dataclass
class AotReport:
    """What one compile says about a run config on a TPU slice (memory per chip, FLOPs per chip)."""

    topology: str
    topology_name: str
    num_devices: int
    num_slices: int
    mesh: dict
    model: str
    seq_len: int
    batch_size: int
    micro_batches: int
    attention_impl: str
    loss_impl: str
    remat: str
    argument_gib: float
    output_gib: float
    alias_gib: float
    temp_gib: float
    code_gib: float
    host_gib: float  # per chip, in the host's memory (offloaded activations)
    per_device_gib: float
    hbm_gib: float
    margin: float  # 1 - per_device / HBM
    fits: bool
    pallas_calls: int
    compiled_flops: float | None  # per chip, one train step
    model_flops: float  # per chip, one train step (6 N + causal attention)
    flops_ratio: float | None
    compile_seconds: float
    error: str | None = None

    def summary(self) -> str:
        lines = [
            f"{self.topology} ({self.topology_name}, {self.num_devices} chips"
            + (f", {self.num_slices} slices" if self.num_slices > 1 else "") + f"), mesh {self.mesh}",
            f"model {self.model}, {self.batch_size} rows x {self.seq_len} tokens, {self.micro_batches} micro-batch(es), "
            f"remat {self.remat}, attention {self.attention_impl}, loss {self.loss_impl}",
        ]
        if self.error:
            lines.append(f"does NOT fit: {self.error}")
            return "\n".join(lines)
        lines += [
            f"per chip: arguments {self.argument_gib:.2f} GiB + temporaries {self.temp_gib:.2f} GiB + outputs not "
            f"aliased {self.output_gib - self.alias_gib:.2f} GiB + code {self.code_gib:.2f} GiB "
            f"= {self.per_device_gib:.2f} GiB of {self.hbm_gib:.0f} GiB HBM (margin {100 * self.margin:.1f} %)",
            f"Pallas kernels in the program: {self.pallas_calls} custom call(s)",
        ]
        if self.host_gib:
            lines.append(f"host memory per chip (offloaded activations): {self.host_gib:.2f} GiB")
        if self.compiled_flops is not None:
            lines.append(f"FLOPs per chip and step: compiled {self.compiled_flops:.4g}, model {self.model_flops:.4g} "
                         f"(ratio {self.flops_ratio:.3f})")
        lines.append("fits" if self.fits else "does NOT fit")
        return "\n".join(lines)


def model_config_for(cfg, preset_name: str | None = None):
    """The architecture the run trains, from what this host can read: the HF folder's config.json
    or the checkpoint's model config when present, else a preset (`--preset`, or the one named
    like the folder, e.g. /mnt/models/Qwen3-32B -> qwen3-32b). Runtime fields come from the run."""
    from her_jax.model import Qwen3Config, preset
    from her_jax.model.config import HF_PRESETS

    m = cfg.model
    runtime = dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat,
                   attention_impl="pallas_tpu" if m.attention_impl == "auto" else m.attention_impl)
    if preset_name:
        if preset_name not in HF_PRESETS:
            raise ValueError(f"--preset: expected one of {sorted(HF_PRESETS)}, found {preset_name!r}")
        return preset(preset_name, **runtime)
    source = m.hf or m.checkpoint
    if source is None:
        return preset(m.preset, **runtime).replace(**dict(m.overrides))
    if m.hf and os.path.isfile(os.path.join(m.hf, "config.json")):
        return Qwen3Config.from_hf(m.hf, **runtime)
    if m.checkpoint and os.path.isdir(m.checkpoint):
        from her_jax.train.checkpoint import read_model_config, resolve

        return read_model_config(resolve(m.checkpoint)).replace(**runtime)
    guess = os.path.basename(os.path.normpath(source)).lower()
    if guess in HF_PRESETS:
        log.info("%s is not on this host; using the preset %s", source, guess)
        return preset(guess, **runtime)
    raise ValueError(f"model: {source} is not on this host and its name matches no preset; pass --preset "
                     f"(one of {sorted(HF_PRESETS)})")


def _target_config(cfg):
    """The run as it would resolve on a TPU: `auto` kernels become the Pallas TPU ones."""
    model = dataclasses.replace(cfg.model, attention_impl="pallas_tpu" if cfg.model.attention_impl == "auto"
                                else cfg.model.attention_impl)
    return dataclasses.replace(cfg, model=model, loss_impl="pallas_tpu" if cfg.loss_impl == "auto" else cfg.loss_impl)


def _compile(cfg, model_config, mesh, micro: int, rows: int, compiler_options: dict | None = None):
    """Lower and compile the trainer's train step for abstract inputs on `mesh`."""
    import jax
    from flax import nnx

    from her_jax.model import abstract_model
    from her_jax.train.sft import make_optimizer, make_steps

    graphdef, params = nnx.split(abstract_model(model_config))
    tx, schedule = make_optimizer(cfg)
    state = (params, jax.eval_shape(tx.init, params))
    steps = make_steps(cfg, mesh, graphdef, state, tx, schedule)
    abstract = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state,
                            steps.state_shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    batch = {k: jax.ShapeDtypeStruct((micro, rows, cfg.data.seq_len), dtype, sharding=steps.batch_sharding)
             for k, dtype in BATCH_FIELDS.items()}
    with jax.set_mesh(mesh):
        return steps.train.lower(abstract, batch).compile(compiler_options=compiler_options)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def analyse(cfg, topology: str, *, preset_name: str | None = None, flops: bool = True) -> AotReport:
    """Compile `cfg`'s train step for the TPU slice `topology` and measure it."""
    import jax

    from her_jax.parallel import make_mesh
    from her_jax.parallel.topology import parse_slice
    from her_jax.train.metrics import flops_per_token

    tpu = parse_slice(topology)
    cfg = _target_config(cfg)
    model_config = model_config_for(cfg, preset_name)
    mesh = make_mesh(cfg.mesh, devices=tpu.devices())
    rows = cfg.data.batch_size // cfg.micro_batches
    tokens = cfg.data.batch_size * cfg.data.seq_len
    report = dict(topology=topology, topology_name=tpu.topology_name, num_devices=tpu.num_devices,
                  num_slices=tpu.num_slices, mesh=dict(mesh.shape), model=_model_name(cfg, model_config),
                  seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, micro_batches=cfg.micro_batches,
                  attention_impl=model_config.attention_impl, loss_impl=cfg.loss_impl, remat=model_config.remat,
                  hbm_gib=tpu.hbm_gib,
                  model_flops=flops_per_token(model_config, cfg.data.seq_len) * tokens / tpu.num_devices)
    start = time.perf_counter()
    try:
        compiled = _compile(cfg, model_config, mesh, cfg.micro_batches, rows)
    except Exception as e:  # noqa: BLE001 - the compiler's verdict (HBM/VMEM exhaustion, sharding errors)
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        message = " ".join(str(e).split())
        return AotReport(**report, argument_gib=0.0, output_gib=0.0, alias_gib=0.0, temp_gib=0.0, code_gib=0.0,
                         host_gib=0.0,
                         per_device_gib=_required_gib(message) or float("nan"), margin=float("nan"), fits=False,
                         pallas_calls=0, compiled_flops=None, flops_ratio=None,
                         compile_seconds=time.perf_counter() - start, error=message[:400])
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    gib = lambda n: n / GIB  # noqa: E731
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    pallas = len(re.findall(r'custom_call_target="tpu_custom_call"', compiled.as_text()))
    compiled_flops = ratio = None
    if flops:
        one, two = (_flops(_compile(cfg, model_config.replace(num_hidden_layers=n, layer_types=(), scan_layers=False),
                                    mesh, 1, rows, COUNTING_OPTIONS)) for n in (1, 2))
        compiled_flops = (one + (model_config.num_hidden_layers - 1) * (two - one)) * cfg.micro_batches
        ratio = compiled_flops / report["model_flops"]
    jax.clear_caches()
    return AotReport(**report, argument_gib=gib(mem.argument_size_in_bytes), output_gib=gib(mem.output_size_in_bytes),
                     alias_gib=gib(mem.alias_size_in_bytes), temp_gib=gib(mem.temp_size_in_bytes),
                     code_gib=gib(mem.generated_code_size_in_bytes), per_device_gib=gib(total),
                     host_gib=gib(getattr(mem, "host_temp_size_in_bytes", 0) + getattr(mem, "host_argument_size_in_bytes", 0)),
                     margin=1.0 - gib(total) / tpu.hbm_gib, fits=gib(total) <= tpu.hbm_gib, pallas_calls=pallas,
                     compiled_flops=compiled_flops, flops_ratio=ratio, compile_seconds=seconds)


def _model_name(cfg, model_config) -> str:
    from her_jax.model.config import HF_PRESETS, preset

    for name in HF_PRESETS:
        if preset(name).arch_dict() == model_config.arch_dict():
            return name
    return cfg.model.hf or cfg.model.checkpoint or "custom"


def _required_gib(message: str) -> float | None:
    """The total the compiler asked for, from its HBM out-of-memory message."""
    m = re.search(r"required for HLO temporaries \(([\d.]+)([GM])\)", message) or \
        re.search(r"Used ([\d.]+)([GM]) of [\d.]+[GM] hbm", message)
    if not m:
        return None
    return float(m.group(1)) / (1024 if m.group(2) == "M" else 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m her_jax.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML run config (default: the built-in tiny run)")
    p.add_argument("--topology", required=True, help="TPU slice: v5p-32, v6e-64, v5e-256, 2xv5p-64, ...")
    p.add_argument("--preset", help="architecture preset when the config's model folder is not on this host")
    p.add_argument("--min-margin", type=float, default=0.0,
                   help="fail unless at least this fraction of HBM stays free (e.g. 0.2)")
    p.add_argument("--no-flops", action="store_true", help="skip the two extra compiles that count FLOPs")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run config, dotted keys")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("her_jax").setLevel(logging.INFO)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")  # silences libtpu on hosts without a TPU
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

    from her_jax.parallel.rules import ShardingError
    from her_jax.parallel.topology import TopologyError
    from her_jax.train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        report = analyse(cfg, args.topology, preset_name=args.preset, flops=not args.no_flops)
    except (ConfigError, TopologyError, ShardingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    ok = report.fits and not report.margin < args.min_margin
    if report.fits and not ok:
        print(f"margin {100 * report.margin:.1f} % is below --min-margin {100 * args.min_margin:.1f} %")
    if args.json:
        print(json.dumps(dataclasses.asdict(report)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
