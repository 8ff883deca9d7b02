"""Learning-rate schedules and optimizers of the recipes, built from optax."""

from __future__ import annotations

from typing import Any

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


def make_optimizer(recipe: Recipe, schedule: optax.Schedule, head: Any = None) -> optax.GradientTransformation:
    """L2 weight decay added to the gradient, then SGD with (Nesterov) momentum, as PyTorch's SGD.

    ``head`` (a tree of bools like the params, True for the classifier: see
    ``flaxnets.pretrained.classifier_mask``) is needed when the recipe sets ``head_lr_multiplier``
    or ``freeze_backbone``: the head then runs at the multiplied rate, and a frozen backbone gets
    exactly zero updates (no decay, no momentum).
    """

    def sgd(lr: optax.Schedule) -> optax.GradientTransformation:
        return optax.chain(
            optax.add_decayed_weights(recipe.weight_decay, mask=_decay_mask),
            optax.sgd(lr, momentum=recipe.momentum or None, nesterov=recipe.nesterov),
        )

    if recipe.head_lr_multiplier == 1.0 and not recipe.freeze_backbone:
        return sgd(schedule)
    if head is None:
        raise ValueError("head_lr_multiplier and freeze_backbone need the classifier mask (head=...)")
    multiplier = recipe.head_lr_multiplier
    parts = {"head": sgd(lambda step: schedule(step) * multiplier),
             "backbone": optax.set_to_zero() if recipe.freeze_backbone else sgd(schedule)}
    return optax.multi_transform(parts, lambda params: jax.tree.map(lambda h: "head" if h else "backbone", head))
