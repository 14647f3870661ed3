"""`reparam train` in Flax (NNX): data parallel with jax.sharding over every device (the batch
axis sharded over a 1-D mesh, parameters, batch statistics and optimizer state replicated).
The step is one nnx.jit (gradient, optax update, BN statistics, EMA) over the global batch
array, so the BatchNorm means and variances inside it are over the global batch: XLA adds the
cross-device reductions.
Several hosts: `initialize_hosts` (jax.distributed.initialize) first; each host then feeds its
contiguous part of every global batch (jax.make_array_from_process_local_data).

The recipe is reparam_core.training's, as in the PyTorch trainer: weight decay added to the
gradient of the conv and linear weights (tr.decayed_keys, minus the custom-L2 kernels), then
Nesterov momentum (optax.trace, PyTorch's SGD recursion), then -lr; label smoothing
(optax.smooth_labels). `cfg.init` (a neutral train-form state) gives the same starting weights
as the other trainers; without it the model starts from its nnx.Rngs(cfg.seed) initialisation.
Process 0 writes the files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax  # type: ignore[import-untyped]  # optax 0.2 ships no py.typed
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reparam_core import training as tr
from reparam_core.blocks.schema import state_schema
from reparam_core.errors import CheckpointError
from reparam_core.weights.layouts import flax_key

from .api import predict
from .blocks import RepModule
from .layers import DropoutStream
from .models import create_model
from .state import export_state, load_state

StepCallback = Callable[[int, int, float, float], None]
EpochCallback = Callable[[dict[str, Any]], None]


def initialize_hosts(endpoint: str, num_hosts: int, host: int) -> None:
    """jax.distributed.initialize for a run over `num_hosts` hosts (coordinator at
    HOST:PORT)."""
    jax.distributed.initialize(coordinator_address=endpoint, num_processes=num_hosts, process_id=host)


def _key(path: tuple) -> str:
    """The Flax key of a pytree path of an nnx.State (the `.value` attribute dropped)."""
    parts = [getattr(p, "key", getattr(p, "idx", None)) for p in path if not isinstance(p, jax.tree_util.GetAttrKey)]
    return ".".join(str(p) for p in parts)


def _decay_mask(params: nnx.State, decayed: set[str]) -> Any:
    """True where plain weight decay applies: the Flax keys of tr.decayed_keys (by role, so a
    parameter whose Flax shape differs from the official one is treated as in PyTorch)."""
    return jax.tree_util.tree_map_with_path(lambda path, p: _key(path) in decayed, params)


def _cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    """Mean cross-entropy against (1 - s) one-hot + s / K targets."""
    target = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), target).mean()


def reseed_dropout(model: nnx.Module, seed: int | jax.Array, step: int | jax.Array) -> None:
    """Set the dropout stream's key to a function of (seed, step), as the torch and MegEngine
    trainers seed theirs: the masks of a step do not depend on what ran before it, so a resumed
    run draws the masks of the uninterrupted one. A model without dropout is left as it is."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    for _, module in nnx.iter_graph(model):
        if isinstance(module, DropoutStream):
            module.reseed(key)


def _flat(tree: Any, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}.{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(tree))}


def _unflat(arrays: dict[str, np.ndarray], prefix: str, like: Any) -> Any:
    leaves, treedef = jax.tree.flatten(like)
    try:
        new = [arrays[f"{prefix}.{i}"] for i in range(len(leaves))]
    except KeyError as e:
        raise CheckpointError(f"--resume: the checkpoint has no {e.args[0]}") from None
    if any(a.shape != np.shape(b) for a, b in zip(new, leaves)):
        raise CheckpointError(f"--resume: the checkpoint's {prefix} shapes differ from the model's")
    return jax.tree.unflatten(treedef, new)


def train(
    cfg: tr.TrainConfig,
    data: tr.Dataset,
    *,
    resume: bool = False,
    on_step: StepCallback | None = None,
    on_epoch: EpochCallback | None = None,
) -> dict[str, Any]:
    """Train `cfg.model` (train form) on `data` over every JAX device; same files and summary
    as backends.torch.train.train."""
    devices = jax.devices()
    world, rank, hosts = len(devices), jax.process_index(), jax.process_count()
    tr.check_supported(cfg, hosts)
    if cfg.global_batch % world:
        raise tr.TrainError(f"--global-batch {cfg.global_batch} is not divisible by the {world} devices")
    mesh = Mesh(np.asarray(devices), ("data",))
    replicated, sharded = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    sched = tr.make_schedule(cfg, len(data.train_idx))
    model = create_model(cfg.model, num_classes=len(data.classes), rngs=nnx.Rngs(cfg.seed))
    spec = model.spec
    init = tr.initial_state(cfg, spec)
    if init is not None:
        load_state(model, init)
    schema = state_schema(spec, "train")
    l2_kernels = {flax_key(k, schema[k]) for k in tr.custom_l2_kernels(spec)}
    aux = tr.has_aux_heads(spec)
    params, stats = nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)
    parts = [optax.clip_by_global_norm(cfg.clip)] if cfg.clip else []
    tx = optax.chain(
        *parts,
        optax.add_decayed_weights(cfg.wd, _decay_mask(params, {flax_key(k, schema[k]) for k in tr.decayed_keys(spec)})),
        optax.trace(decay=cfg.momentum, nesterov=cfg.momentum > 0),
    )
    opt_state = tx.init(params)
    ema = (params, stats) if cfg.ema else None
    decay = cfg.ema or 0.0  # ema <- decay * ema + (1 - decay) * now
    point = tr.resume_point(cfg, sched, resume)
    if resume:
        nnx.update(model, _unflat(point.arrays, "params", params), _unflat(point.arrays, "stats", stats))
        opt_state = _unflat(point.arrays, "opt", opt_state)
        if ema is not None:
            ema = _unflat(point.arrays, "ema", ema)
    start, sums, records = point.start, point.sums, point.records
    nnx.update(model, jax.device_put(nnx.state(model), replicated))
    opt_state, ema = jax.device_put((opt_state, ema), replicated)

    def loss_fn(m: RepModule, x: jax.Array, y: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        outs = m.forward_with_aux(x) if aux else {"main": m(x)}
        losses = {h: _cross_entropy(v, y, cfg.label_smoothing) for h, v in outs.items()}
        loss = losses["main"] + tr.AUX_WEIGHT * sum(v for h, v in losses.items() if h != "main")
        if l2_kernels:
            loss = loss + 0.5 * cfg.wd * m.custom_l2()
        return loss, (losses["main"], (outs["main"].argmax(-1) == y).sum())

    @nnx.jit
    def step_fn(
        m: RepModule, opt: Any, e: Any, x: jax.Array, y: jax.Array, lr: jax.Array, step: jax.Array
    ) -> tuple[Any, Any, jax.Array, jax.Array]:
        reseed_dropout(m, cfg.seed, step)
        grads, (main, correct) = nnx.grad(loss_fn, has_aux=True)(m, x, y)
        p = nnx.state(m, nnx.Param)
        updates, opt = tx.update(grads, opt, p)
        nnx.update(m, jax.tree.map(lambda a, u: a - lr * u, p, updates))
        if e is not None:
            now = (nnx.state(m, nnx.Param), nnx.state(m, nnx.BatchStat))
            e = jax.tree.map(lambda a, b: decay * a + (1.0 - decay) * b, e, now)
        return opt, e, main, correct

    x_val, y_val = data.val()
    stop = tr.StopFlag()
    done, stopped = start, False

    def host_model(p: Any, s: Any) -> RepModule:
        """A copy of the model on the host with parameters p and batch statistics s."""
        graphdef, *states = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        other = jax.device_get(states[2:])  # the variables that are neither parameters nor statistics
        copy: RepModule = nnx.merge(graphdef, jax.device_get(p), jax.device_get(s), *other)
        return copy

    def val_figures(p: Any, s: Any) -> tuple[float, float]:
        """(loss, accuracy) on the validation split with parameters p and batch statistics s."""
        host = host_model(p, s)
        return tr.evaluate(lambda xb: predict(host, xb), x_val, y_val)

    def current() -> tuple[Any, Any]:
        return nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)

    try:
        for step, epoch, _, lr, xb, yb, prep_s in tr.local_batches(cfg, sched, data, start, rank, hosts):
            t0 = time.perf_counter() - prep_s
            x = jax.make_array_from_process_local_data(sharded, xb.transpose(0, 2, 3, 1))
            y = jax.make_array_from_process_local_data(sharded, yb.astype(np.int32))
            opt_state, ema, main, correct = step_fn(model, opt_state, ema, x, y, jnp.float32(lr), jnp.uint32(step))
            main_loss = float(main)
            sums.add(main_loss, int(correct), cfg.global_batch)
            sums.seconds += time.perf_counter() - t0
            done = step + 1
            if rank == 0 and on_step:
                on_step(done, sched.total, main_loss, cfg.global_batch)
            end_of_epoch = tr.is_epoch_end(sched, step)
            stopped = stop.requested and step < sched.total - 1
            if not (end_of_epoch or stopped):
                continue
            if rank == 0 and end_of_epoch:
                val_loss, val_acc = val_figures(*current())
                val = {"val_loss": val_loss, "val_acc": val_acc}
                if ema is not None:
                    val["val_acc_ema"] = val_figures(*ema)[1]
                tr.log_epoch(cfg, records, tr.epoch_record(epoch, done, sums, lr, val, world), on_epoch)
            if rank == 0:
                params, stats = current()
                arrays = {
                    **_flat(params, "params"),
                    **_flat(stats, "stats"),
                    **_flat(opt_state, "opt"),
                    **(_flat(ema, "ema") if ema is not None else {}),
                }
                tr.checkpoint(cfg, done, arrays, sums, end_of_epoch)
            sums = tr.EpochSums()
            if stopped:
                break
        return tr.summarize(
            cfg,
            data,
            spec,
            "flax",
            steps=done,
            stopped=stopped,
            rank=rank,
            world=world,
            records=records,
            final_state=lambda: export_state(host_model(*(ema if ema is not None else current()))),
        )
    finally:
        stop.restore()


__all__ = ["train", "initialize_hosts"]
