"""Supervised fine-tuning on dual-view rows: the sharded train step, checkpoints, metrics, resume.

The step is built from a mesh (so the same code runs on CPU devices and AOT-compiles for TPU
topologies): micro-batches are scanned and their (loss sum, weight sum) and gradient sums added,
so accumulation gives exactly the gradient of one large batch; AdamW with warm-up + cosine and
global-norm clipping; a step whose loss or gradient is not finite changes nothing and is counted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from her_jax.data.format import LAYERS
from her_jax.data.pipeline import Pipeline
from her_jax.model import Qwen3, init_model, preset
from her_jax.parallel import initialize_distributed, make_mesh
from her_jax.parallel.rules import DEFAULT_RULES, path_name, state_shardings
from her_jax.train.config import RunConfig
from her_jax.train.loss import sft_loss
from her_jax.train.metrics import MetricsWriter, flops_per_token, peak_flops, plot_losses

log = logging.getLogger("her_jax.train")
REPORTED_LAYERS = LAYERS[1:]  # every layer but context


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


# -- model, optimizer, step ---------------------------------------------------------------------------

def build_model(cfg: RunConfig, mesh) -> Qwen3:
    runtime = dict(param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype, remat=cfg.model.remat,
                   attention_impl=cfg.model.attention_impl)
    if cfg.model.hf:
        from her_jax.convert.hf import load_hf

        return load_hf(cfg.model.hf, mesh=mesh, dtype=cfg.model.param_dtype, compute_dtype=cfg.model.dtype,
                       remat=cfg.model.remat, attention_impl=cfg.model.attention_impl,
                       progress=jax.process_index() == 0)
    if cfg.model.checkpoint:
        from her_jax.train.checkpoint import load_model

        return load_model(cfg.model.checkpoint, mesh=mesh, **runtime)
    config = preset(cfg.model.preset, **runtime).replace(**dict(cfg.model.overrides))
    return init_model(config, mesh=mesh, seed=cfg.model.init_seed)


def make_optimizer(cfg: RunConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = cfg.optim
    warmup = max(1, round(o.warmup_ratio * cfg.steps))
    schedule = optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(cfg.steps, warmup + 1),
                                                  end_value=o.lr * o.min_lr_ratio)

    def decay_mask(params):  # no weight decay on norm scales and biases
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not any(str(getattr(k, "key", "")).endswith(("norm", "layernorm", "bias")) for k in path),
            params)

    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm),
                     optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask))
    return tx, schedule


@dataclasses.dataclass
class Step:
    """The jitted train and eval steps and the shardings of their inputs."""

    train: callable
    eval: callable
    batch_sharding: NamedSharding
    state_shardings: object


def make_steps(cfg: RunConfig, mesh, graphdef, abstract_state, tx, schedule) -> Step:
    """Train and eval steps for `mesh` (a real mesh, or a TPU topology mesh for AOT checks).
    The state is (params, optimizer state); the batch is a dict of [micro, rows, tokens] arrays."""
    shardings = state_shardings(abstract_state, mesh, DEFAULT_RULES)
    batch_sharding = NamedSharding(mesh, P(None, ("data", "fsdp"), None))
    pallas_loss = cfg.loss_impl in ("pallas_tpu", "pallas_interpret") or (
        cfg.loss_impl == "auto" and jax.default_backend() == "tpu")
    loss_kw = dict(loss_impl=cfg.loss_impl, z_loss=cfg.z_loss, label_smoothing=cfg.label_smoothing,
                   mesh=mesh if pallas_loss else None)

    def loss_fn(params, batch):
        out = sft_loss(nnx.merge(graphdef, params), batch, **loss_kw)
        return out.loss_sum, out

    def train_step(state, batch):
        params, opt_state = state

        def micro(acc, mb):
            (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
            return jax.tree.map(jnp.add, acc, (grads, out)), None

        first = jax.tree.map(lambda a: a[0], batch)
        zeros = jax.tree.map(jnp.zeros_like, (params, jax.eval_shape(lambda p, b: loss_fn(p, b)[1], params, first)))
        (grads, out), _ = jax.lax.scan(micro, zeros, batch)
        denom = jnp.maximum(out.weight_sum, 1.0)  # the global weight: accumulation is exact
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = out.loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        count = optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]  # updates applied so far
        updates, new_opt = tx.update(grads, opt_state, params)
        new_state = (optax.apply_updates(params, updates), new_opt)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        metrics = dict(loss=loss, grad_norm=grad_norm, lr=schedule(count), finite=finite,
                       weight_sum=out.weight_sum, layer_nll=out.layer_nll, layer_count=out.layer_count)
        return new_state, metrics

    def eval_step(state, batch):
        params, _ = state
        outs = [loss_fn(params, jax.tree.map(lambda a, i=i: a[i], batch))[1] for i in range(batch["tokens"].shape[0])]
        return jax.tree.map(lambda *xs: sum(xs), *outs)

    train = jax.jit(train_step, donate_argnums=0, out_shardings=(shardings, None))
    return Step(train, jax.jit(eval_step), batch_sharding, shardings)


# -- checkpoints ----------------------------------------------------------------------------------------

def _manager(directory: str, cfg: RunConfig) -> ocp.CheckpointManager:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for name in ("params", "opt_state"):
        registry.add(name, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
        registry.add(name, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
    for name in ("model_config", "train"):
        registry.add(name, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
        registry.add(name, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, enable_async_checkpointing=True,
                                           create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, handler_registry=registry)


def _flat(tree) -> dict:
    """A pytree as a flat {path: leaf} dict (Orbax-friendly for optimizer states of any shape)."""
    return {path_name(path) or "_": leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(like, flat: dict):
    return jax.tree.unflatten(jax.tree.structure(like), list(flat[k] for k in _flat(like)))


# -- the loop -------------------------------------------------------------------------------------------

class Trainer:
    """Runs `cfg`: builds or resumes the state, trains, evaluates, checkpoints, writes metrics."""

    def __init__(self, cfg: RunConfig):
        initialize_distributed()
        self.cfg = cfg
        self.main = jax.process_index() == 0
        self.mesh = make_mesh(cfg.mesh)
        os.makedirs(cfg.output_dir, exist_ok=True)
        with jax.set_mesh(self.mesh):
            model = build_model(cfg, self.mesh)
        self.model_config = model.config
        self.graphdef, params = nnx.split(model)
        tx, self.schedule = make_optimizer(cfg)
        state = (params, tx.init(params))
        self.steps = make_steps(cfg, self.mesh, self.graphdef, state, tx, self.schedule)
        self.state = jax.device_put(state, self.steps.state_shardings)
        pc, pi = jax.process_count(), jax.process_index()
        self.train_data = Pipeline(cfg.data, pi, pc, split="train", eval_fraction=cfg.eval_fraction)
        # Every process reads the whole (small) eval split: identical rows on all hosts average out.
        eval_cfg = dataclasses.replace(cfg.data, num_epochs=None, shuffle=False, batch_size=cfg.data.batch_size // pc)
        self.eval_data = (Pipeline(eval_cfg, 0, 1, split="eval", eval_fraction=cfg.eval_fraction)
                          if cfg.eval_fraction > 0 else None)
        self.data_iter = iter(self.train_data)
        self.checkpoints = _manager(os.path.join(cfg.output_dir, "checkpoints"), cfg)
        self.iteration = 0  # batches consumed
        self.nonfinite = 0
        self.rng = jax.random.key_data(jax.random.key(cfg.seed))
        self._stop = False
        self._restore()

    # state I/O
    def _restore(self) -> None:
        step = self.checkpoints.latest_step()
        if step is None:
            return
        meta = self.checkpoints.restore(step, args=ocp.args.Composite(train=ocp.args.JsonRestore()))["train"]
        stored = meta["model_arch"]
        if stored != self.model_config.arch_dict():
            raise ValueError(f"{self.cfg.output_dir}: its checkpoints hold a different model ({stored}); "
                             "use a new output_dir or the same model")
        params, opt_state = self.state
        target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), self.state,
                              self.steps.state_shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
        restored = self.checkpoints.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(nnx.to_pure_dict(target[0])),
            opt_state=ocp.args.StandardRestore(_flat(target[1]))))
        nnx.replace_by_pure_dict(params, restored["params"])
        self.state = (params, _unflat(opt_state, restored["opt_state"]))
        self.iteration = meta["iteration"]
        self.nonfinite = meta["nonfinite"]
        self.rng = np.asarray(meta["rng"], np.uint32)
        self.data_iter.set_state(meta["data_state"][jax.process_index()])
        if self.main:
            log.info("resumed from %s at step %d", self.cfg.output_dir, step)

    def save(self, wait: bool = False) -> None:
        params, opt_state = self.state
        data_states = _gather_json(self.data_iter.get_state())
        meta = {"iteration": self.iteration, "nonfinite": self.nonfinite, "rng": np.asarray(self.rng).tolist(),
                "data_state": data_states, "model_arch": self.model_config.arch_dict(), "config": self.cfg.to_dict()}
        self.checkpoints.save(self.iteration, args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(params)), opt_state=ocp.args.StandardSave(_flat(opt_state)),
            model_config=ocp.args.JsonSave(self.model_config.to_json_dict()), train=ocp.args.JsonSave(meta)),
            force=True)
        if wait:
            self.checkpoints.wait_until_finished()

    # batches
    def _global_batch(self, local: dict, micro: int) -> dict:
        def one(a):
            a = a.reshape(micro, a.shape[0] // micro, *a.shape[1:])
            return jax.make_array_from_process_local_data(self.steps.batch_sharding, a)

        return {k: one(v) for k, v in local.items()}

    def evaluate(self) -> float | None:
        if self.eval_data is None:
            return None
        total_loss = total_weight = 0.0
        for i, local in zip(range(self.cfg.eval_batches), iter(self.eval_data)):
            with jax.set_mesh(self.mesh):
                out = self.steps.eval(self.state, self._global_batch(local, self.cfg.micro_batches))
            total_loss += float(out.loss_sum)
            total_weight += float(out.weight_sum)
        return total_loss / total_weight if total_weight else None

    # main loop
    def run(self) -> dict:
        cfg = self.cfg
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        metrics = MetricsWriter(cfg.output_dir, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project,
                                config=cfg.to_dict(), active=self.main)
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        flops = flops_per_token(self.model_config, cfg.data.seq_len) * tokens_per_step
        peak = peak_flops(jax.devices()[0].device_kind)
        bar = None
        if self.main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.iteration, desc="sft", unit="step")
        last = {}
        try:
            while self.iteration < cfg.steps and not self._stop_agreed():
                local = next(self.data_iter)
                batch = self._global_batch(local, cfg.micro_batches)
                start = time.perf_counter()
                with jax.set_mesh(self.mesh):
                    self.state, m = self.steps.train(self.state, batch)
                m = jax.device_get(m)
                seconds = time.perf_counter() - start
                self.iteration += 1
                self.nonfinite = 0 if m["finite"] else self.nonfinite + 1
                record = self._record(m, local, seconds, tokens_per_step, flops, peak)
                if self.iteration % cfg.eval_every == 0 or self.iteration == cfg.steps:
                    record["eval_loss"] = self.evaluate()
                if self.iteration % cfg.log_every == 0 or "eval_loss" in record or not m["finite"]:
                    metrics.write(self.iteration, record)
                last = record
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                if self.nonfinite >= cfg.max_nonfinite:
                    raise NonFiniteError(
                        f"{self.nonfinite} consecutive steps with a non-finite loss or gradient (last at step "
                        f"{self.iteration}); stopping. The last checkpoint in {cfg.output_dir}/checkpoints holds "
                        "the last good state. Lower optim.lr or check the data.")
                if m["finite"] and (self.iteration % cfg.checkpoint_every == 0 or self.iteration == cfg.steps):
                    self.save()
            if self._stop:
                if self.main:
                    log.warning("SIGTERM: saving a checkpoint at step %d and stopping", self.iteration)
                if self.nonfinite == 0:
                    self.save(wait=True)
        finally:
            self.checkpoints.wait_until_finished()
            signal.signal(signal.SIGTERM, previous)
            if bar is not None:
                bar.close()
            metrics.close()
        if self.iteration >= cfg.steps:
            self._finish()
        return last

    def _record(self, m, local, seconds, tokens_per_step, flops, peak) -> dict:
        counts, nll = np.asarray(m["layer_count"]), np.asarray(m["layer_nll"])
        record = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                  "finite": bool(m["finite"]), "trained_tokens": float(m["weight_sum"]),
                  "tokens_per_s": tokens_per_step / seconds, "step_seconds": seconds,
                  "batch_fingerprint": int(np.bitwise_xor.reduce(local["tokens"].astype(np.int64).ravel() * 2654435761
                                                                 % (1 << 31)))}
        for i, name in enumerate(LAYERS):
            if name in REPORTED_LAYERS and counts[i] > 0:
                record[f"loss/{name}"] = float(nll[i] / counts[i])
        if peak is not None:
            record["mfu"] = flops / seconds / (peak * jax.device_count())
        return record

    def _finish(self) -> None:
        """Params-only export checkpoint (with the tokenizer) and the loss plot."""
        from her_jax.data.tokenizer import default_tokenizer_dir
        from her_jax.train.checkpoint import save_model

        model = nnx.merge(self.graphdef, self.state[0])
        tokenizer = self.cfg.data.tokenizer or default_tokenizer_dir()
        save_model(model, os.path.join(self.cfg.output_dir, "final"), tokenizer_dir=tokenizer, force=True)
        if self.main and self.cfg.plot:
            plot_losses(self.cfg.output_dir)

    def _on_sigterm(self, signum, frame) -> None:
        self._stop = True

    def _stop_agreed(self) -> bool:
        """Whether any process got SIGTERM: all stop (and checkpoint) at the same step, so none is
        left waiting in a collective of a step the others never run."""
        if jax.process_count() == 1:
            return self._stop
        from jax.experimental import multihost_utils

        self._stop = bool(np.any(multihost_utils.process_allgather(np.array([self._stop]))))
        return self._stop


def _gather_json(local_state) -> list:
    """Every process's data-iterator state (each process restores its own)."""
    if jax.process_count() == 1:
        return [local_state]
    import json

    from jax.experimental import multihost_utils

    raw = json.dumps(local_state).encode()
    width = int(np.max(multihost_utils.process_allgather(np.array([len(raw)]))))
    gathered = multihost_utils.process_allgather(np.frombuffer(raw.ljust(width), np.uint8))
    return [json.loads(bytes(row).decode().strip()) for row in gathered]
