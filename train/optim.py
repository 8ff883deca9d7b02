"""Learning-rate schedules and optimizers of the recipes, built from optax."""

from __future__ import annotations

import jax
import optax

from train.recipes import Recipe


def make_schedule(recipe: Recipe, steps_per_epoch: int) -> optax.Schedule:
    """The recipe's learning rate as a function of the step (before any plateau reduction)."""
    lr = recipe.scaled_lr()
    total = recipe.epochs * steps_per_epoch
    warmup = int(recipe.warmup_epochs * steps_per_epoch)
    if recipe.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif recipe.schedule == "step":
        boundaries = {m * steps_per_epoch - warmup: recipe.decay_factor for m in recipe.milestones}
        main = optax.piecewise_constant_schedule(lr, boundaries)
    elif recipe.schedule == "exponential":
        period = max(1, int(round(recipe.decay_every_epochs * steps_per_epoch)))
        main = optax.exponential_decay(lr, period, recipe.decay_factor, staircase=True)
    elif recipe.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(1, total - warmup))
    else:
        raise ValueError(f"unknown schedule {recipe.schedule!r}; use constant, step, exponential or cosine")
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _decay_mask(params):
    """Weight decay on kernels (ndim > 1) only: not on biases or BatchNorm scales."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(recipe: Recipe, schedule: optax.Schedule) -> optax.GradientTransformation:
    """L2 weight decay added to the gradient, then SGD with (Nesterov) momentum, as PyTorch's SGD."""
    return optax.chain(
        optax.add_decayed_weights(recipe.weight_decay, mask=_decay_mask),
        optax.sgd(schedule, momentum=recipe.momentum or None, nesterov=recipe.nesterov),
    )
