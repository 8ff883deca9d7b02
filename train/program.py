"""What a run compiles: the model, the optimizer, the mesh, the shardings and the jitted steps.

:func:`build_program` is shared by ``python -m train`` (on the attached devices) and by
``--plan`` (on devices of a TPU topology or GPU target that is not attached), so a plan compiles
exactly the program a run would. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import flaxnets
from flaxnets.pretrained import classifier_mask
from train.optim import make_optimizer, make_schedule
from train.recipes import Recipe
from train.steps import TrainState, create_state, eval_step, train_step, train_step_compiler_options


def build_model(recipe: Recipe, num_classes: int, precision: str, **options: Any) -> nn.Module:
    """The recipe's model with its overrides (and ``options``, e.g. the weights'), for ``num_classes`` and the precision."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision must be fp32 or bf16, not {precision!r}")
    fields = {f.name for f in dataclasses.fields(flaxnets.model_info(recipe.model).module)}
    overrides = {}
    if recipe.dropout_rate is not None and "dropout_rate" in fields:
        overrides["dropout_rate"] = recipe.dropout_rate
    if recipe.zero_init_residual and "zero_init_residual" in fields:
        overrides["zero_init_residual"] = True
    if recipe.frozen_bn and "frozen_bn" in fields:
        overrides["frozen_bn"] = True
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    return flaxnets.create_model(recipe.model, num_classes=num_classes, dtype=dtype, **{**options, **overrides})


@dataclasses.dataclass(frozen=True)
class Program:
    """A run's compiled pieces over one data-parallel mesh.

    Attributes:
      model: the Flax module.
      tx: the optax optimizer.
      schedule: step -> learning rate.
      image_size: the training resolution.
      ema: the state keeps an average of the weights (the recipe's ``ema_decay``).
      replicated: the state's sharding (every device holds all of it).
      data_sharding: the batch's sharding (its leading axis split over the devices).
      train: jitted ``(state, batch) -> (state, metrics)``; the state is donated.
      eval: jitted ``(state, batch) -> sums``; ``use_ema`` is static.
    """

    model: nn.Module
    tx: optax.GradientTransformation
    schedule: Callable[[int], Any]
    image_size: int
    ema: bool
    replicated: NamedSharding
    data_sharding: NamedSharding
    train: Any
    eval: Any

    def init_state(self, seed: int) -> TrainState:
        """The initial state, placed on every device."""
        return jax.device_put(create_state(self.model, self.tx, self.image_size, seed, self.ema), self.replicated)

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and shardings, with nothing allocated (for compiling ahead)."""
        shapes = jax.eval_shape(lambda: create_state(self.model, self.tx, self.image_size, 0, self.ema))
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), shapes)

    def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """A global training batch as the input pipeline delivers it: uint8 images, int32 labels."""
        size = self.image_size
        return {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8, sharding=self.data_sharding),
                "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=self.data_sharding)}


def build_program(recipe: Recipe, *, num_classes: int, image_size: int, steps_per_epoch: int, precision: str,
                  devices: Sequence[jax.Device], mean: Sequence[float], std: Sequence[float],
                  model_options: dict[str, Any] | None = None) -> Program:
    """The model, optimizer and jitted steps of ``recipe`` on a one-axis ``data`` mesh of ``devices``.

    ``mean``/``std`` normalise the uint8 batches inside the steps; ``model_options`` are extra
    model fields (those of pretrained weights).
    """
    model = build_model(recipe, num_classes, precision, **(model_options or {}))
    schedule = make_schedule(recipe, steps_per_epoch)
    needs_head = recipe.freeze_backbone or recipe.head_lr_multiplier != 1.0
    tx = make_optimizer(recipe, schedule, classifier_mask(model, image_size) if needs_head else None)
    mesh = Mesh(np.array(devices), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    mean, std = tuple(mean), tuple(std)
    step_fn = functools.partial(train_step, num_classes=num_classes, label_smoothing=recipe.label_smoothing,
                                aux_loss_weight=recipe.aux_loss_weight, ema_decay=recipe.ema_decay,
                                image_mean=mean, image_std=std)
    jit_train = jax.jit(step_fn, in_shardings=(replicated, data_sharding), out_shardings=(replicated, replicated),
                        donate_argnums=0, compiler_options=train_step_compiler_options(devices[0].platform))
    jit_eval = jax.jit(functools.partial(eval_step, image_mean=mean, image_std=std),
                       in_shardings=(replicated, data_sharding), out_shardings=replicated, static_argnames="use_ema")
    return Program(model=model, tx=tx, schedule=schedule, image_size=image_size, ema=recipe.ema_decay is not None,
                   replicated=replicated,
                   data_sharding=data_sharding, train=jit_train, eval=jit_eval)
