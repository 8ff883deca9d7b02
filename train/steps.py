"""The training state and the pure, jit-able training and evaluation steps."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from flaxnets.initialize import run_compiled_init
from flaxnets.layers import IMAGENET_MEAN, IMAGENET_STD


class TrainState(struct.PyTreeNode):
    """Everything a run needs to continue exactly: weights, statistics, optimizer and bookkeeping.

    Attributes:
      step: optimizer steps taken.
      params: model parameters (float32).
      batch_stats: BatchNorm running statistics (empty dict for models without BN).
      opt_state: optax state.
      ema_params: Polyak/EMA average of ``params``; an empty dict when the recipe keeps none (a
        copy of the weights would cost a parameter-sized buffer and a copy every step).
      rng: PRNG key data (uint32) for dropout.
      lr_scale: multiplier of the scheduled lr (the plateau rule divides it by 10).
      plateau_best: best eval top-1 seen by the plateau rule.
      plateau_bad_epochs: evals since it last improved.
      apply_fn, tx: the model's apply and the optimizer (static).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array
    lr_scale: jax.Array
    plateau_best: jax.Array
    plateau_bad_epochs: jax.Array
    apply_fn: Any = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def create_state(model: nn.Module, tx: optax.GradientTransformation, image_size: int, seed: int,
                 ema: bool = False) -> TrainState:
    """Initialises weights (the model's own initialisers) and the optimizer for NHWC inputs;
    ``ema``: also an average of the weights (starting as a copy)."""
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))

    # One compiled program: run eagerly, the initialisers dispatch (and compile) op by op, over a
    # hundred small programs for a ResNet.
    def arrays(key):
        variables = model.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32))
        params = variables["params"]
        # ema_params is a separate buffer: the jitted step donates the state, and one buffer
        # must not be donated twice.
        average = jax.tree.map(jnp.copy, params) if ema else {}
        return params, variables.get("batch_stats", {}), tx.init(params), average

    params, batch_stats, opt_state, ema_params = run_compiled_init(arrays, init_key)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema_params=ema_params,
        rng=dropout_key,
        lr_scale=jnp.ones((), jnp.float32),
        plateau_best=jnp.full((), -1.0, jnp.float32),
        plateau_bad_epochs=jnp.zeros((), jnp.int32),
        apply_fn=model.apply,
        tx=tx,
    )


def normalize_images(images: jax.Array, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
    """uint8 pixels to ``(x / 255 - mean) / std`` in float32, on the device; float input passes through.

    The input pipeline sends uint8 (a quarter of float32's bytes); XLA fuses this into the first
    convolution's input, and the model casts it to its compute dtype.
    """
    if images.dtype != jnp.uint8:
        return images
    scale = 1.0 / (255.0 * jnp.asarray(std, jnp.float32))
    return images.astype(jnp.float32) * scale - jnp.asarray(mean, jnp.float32) / jnp.asarray(std, jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy with optional label smoothing, in float32."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing) if smoothing else (
        jax.nn.one_hot(labels, num_classes))
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    num_classes: int,
    label_smoothing: float = 0.0,
    aux_loss_weight: float = 0.0,
    ema_decay: float | None = None,
    image_mean: tuple[float, ...] = IMAGENET_MEAN,
    image_std: tuple[float, ...] = IMAGENET_STD,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a (global) batch; returns the new state and its loss/accuracy/lr.

    ``batch["image"]`` is uint8 (normalised here with ``image_mean``/``image_std``) or an
    already normalised float array.

    BatchNorm statistics are computed over the whole global batch (the batch axis is sharded
    and XLA reduces across devices). Auxiliary classifiers (GoogLeNet) add ``aux_loss_weight``
    times their cross-entropy.
    """
    dropout_key = jax.random.fold_in(state.rng, state.step)
    images = normalize_images(batch["image"], image_mean, image_std)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats} if state.batch_stats else {"params": params}
        logits, updates = state.apply_fn(
            variables, images, train=True, rngs={"dropout": dropout_key},
            mutable=["batch_stats", "aux_logits"],
        )
        loss = cross_entropy(logits, batch["label"], num_classes, label_smoothing)
        for aux in jax.tree.leaves(updates.get("aux_logits", {})):
            loss = loss + aux_loss_weight * cross_entropy(aux, batch["label"], num_classes, label_smoothing)
        return loss, (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: u * state.lr_scale, updates)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema_decay is not None:
        ema = optax.incremental_update(params, ema, 1.0 - ema_decay)
    metrics = {"loss": loss, "top1": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, ema_params=ema)
    return new_state, metrics


def train_step_compiler_options(platform: str) -> dict[str, Any]:
    """XLA options for compiling :func:`train_step` with its state donated on ``platform``.

    On the CPU, XLA's default copy insertion copies every weight that the backward pass reads and
    the update then overwrites in place (109 copies, 128 MiB, in a ResNet-50 step at batch 16),
    because nothing in the data flow orders the read before the write. Its region analysis proves
    the order and drops them (ResNet-50: 8 copies left in all); the results are bit-identical
    (``tests/test_train_step.py``). Other backends keep their defaults: their plans were compiled
    without it and were not checked with it.
    """
    return {"xla_cpu_copy_insertion_use_region_analysis": True} if platform == "cpu" else {}


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, use_ema: bool = False,
              image_mean: tuple[float, ...] = IMAGENET_MEAN,
              image_std: tuple[float, ...] = IMAGENET_STD) -> dict[str, jax.Array]:
    """Sums of correct top-1/top-5 predictions and of examples over the batch's real (masked) rows.

    Images as in :func:`train_step`: uint8 (normalised here) or normalised float.
    """
    params = state.ema_params if use_ema else state.params
    variables = {"params": params, "batch_stats": state.batch_stats} if state.batch_stats else {"params": params}
    logits = state.apply_fn(variables, normalize_images(batch["image"], image_mean, image_std), train=False)
    mask = batch.get("mask", jnp.ones(batch["label"].shape, bool))
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    correct5 = jnp.any(top5 == batch["label"][:, None], axis=-1)
    correct1 = jnp.argmax(logits, -1) == batch["label"]
    return {"top1": jnp.sum(correct1 & mask), "top5": jnp.sum(correct5 & mask), "count": jnp.sum(mask)}
