"""Recipes: each preset's optimizer and schedule are the paper's; overrides; the plateau rule."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import recipes
from train.optim import make_optimizer, make_schedule
from train.recipes import get_recipe, list_recipes, override, recipe_for_model

SPE = 100  # steps per epoch used for the checks


def lr_at(name, *steps, **changes):
    recipe = dataclasses.replace(get_recipe(name), **changes)
    schedule = make_schedule(recipe, SPE)
    return [float(schedule(s)) for s in steps]


def test_resnet_step_schedule():
    # lr 0.1 x batch/256, divided by 10 at epochs 30 and 60.
    assert lr_at("resnet50_sgd-step_90e_imagenet", 0, 30 * SPE - 1, 30 * SPE, 60 * SPE, 89 * SPE) == pytest.approx(
        [0.1, 0.1, 0.01, 0.001, 0.001])
    assert lr_at("resnet50_sgd-step_90e_imagenet", 0, batch_size=1024) == pytest.approx([0.4])
    assert get_recipe("resnet50_sgd-step_90e_imagenet").weight_decay == 1e-4


def test_densenet_nesterov_step():
    recipe = get_recipe("densenet121_nesterov-step_90e_imagenet")
    assert recipe.nesterov and recipe.momentum == 0.9 and recipe.weight_decay == 1e-4
    assert lr_at(recipe.name, 0, 30 * SPE, 60 * SPE) == pytest.approx([0.1, 0.01, 0.001])
    # Two Nesterov steps on a constant gradient, against PyTorch's SGD(nesterov=True) by hand.
    recipe = dataclasses.replace(recipe, weight_decay=0.0)
    tx = make_optimizer(recipe, optax.constant_schedule(0.1))
    params = {"w": jnp.ones((2, 2))}
    state = tx.init(params)
    g, m, lr = 0.5, 0.9, 0.1
    first, state = tx.update({"w": jnp.full((2, 2), g)}, state, params)
    second, state = tx.update({"w": jnp.full((2, 2), g)}, state, params)
    buf1 = g
    buf2 = m * buf1 + g
    np.testing.assert_allclose(first["w"], -lr * (g + m * buf1), rtol=1e-6)
    np.testing.assert_allclose(second["w"], -lr * (g + m * buf2), rtol=1e-6)


def test_googlenet_four_percent_every_eight_epochs():
    recipe = get_recipe("googlenet_sgd-exp_250e_imagenet")
    assert recipe.aux_loss_weight == 0.3 and recipe.ema_decay is not None  # Polyak averaging
    assert lr_at(recipe.name, 0, 8 * SPE - 1, 8 * SPE, 16 * SPE) == pytest.approx([0.01, 0.01, 0.0096, 0.01 * 0.96**2])


def test_xception_094_every_two_epochs():
    recipe = get_recipe("xception_sgd-exp_100e_imagenet")
    assert (recipe.weight_decay, recipe.ema_decay is not None) == (1e-5, True)
    assert lr_at(recipe.name, 0, 2 * SPE, 4 * SPE) == pytest.approx([0.045, 0.045 * 0.94, 0.045 * 0.94**2])


@pytest.mark.parametrize("name", ["alexnet_sgd-plateau_90e_imagenet", "vgg16_sgd-plateau_74e_imagenet"])
def test_alexnet_vgg_constant_lr_with_plateau(name):
    recipe = get_recipe(name)
    assert (recipe.lr, recipe.momentum, recipe.weight_decay) == (0.01, 0.9, 5e-4)
    assert recipe.plateau_patience > 0 and recipe.plateau_max_reductions == 3
    assert lr_at(name, 0, 50 * SPE) == pytest.approx([0.01, 0.01])


def test_modern_warmup_cosine():
    recipe = get_recipe("resnet50_sgd-cosine-ls-ema_100e_imagenet")
    assert recipe.label_smoothing == 0.1 and recipe.ema_decay is not None
    lrs = lr_at(recipe.name, 0, 5 * SPE // 2, 5 * SPE, 100 * SPE)
    assert lrs == pytest.approx([0.0, 0.05, 0.1, 0.0], abs=1e-6)


def test_every_preset_builds_an_optimizer():
    params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}
    for name in list_recipes():
        recipe = get_recipe(name)
        make_schedule(recipe, 10)  # every schedule builds
        tx = make_optimizer(recipe, optax.constant_schedule(1.0), head={"kernel": False, "bias": False})
        updates, _ = tx.update(jax_zeros(params), tx.init(params), params)
        # Weight decay reaches kernels only.
        assert float(jnp.abs(updates["bias"]).max()) == 0.0
        assert (float(jnp.abs(updates["kernel"]).max()) > 0) == (recipe.weight_decay > 0)


def test_the_head_learns_faster_and_a_frozen_backbone_not_at_all():
    params = {"head": jnp.ones((3, 2)), "body": jnp.ones((3, 3))}
    head = {"head": True, "body": False}
    grads = {k: jnp.ones_like(v) for k, v in params.items()}
    recipe = dataclasses.replace(get_recipe("finetune_sgd-cosine_10e"), weight_decay=0.0, head_lr_multiplier=10.0)
    tx = make_optimizer(recipe, optax.constant_schedule(0.01), head=head)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["head"], -0.1, rtol=1e-6)
    np.testing.assert_allclose(updates["body"], -0.01, rtol=1e-6)
    frozen = make_optimizer(dataclasses.replace(recipe, freeze_backbone=True), optax.constant_schedule(0.01), head=head)
    updates, _ = frozen.update(grads, frozen.init(params), params)
    assert float(jnp.abs(updates["body"]).max()) == 0.0 and float(updates["head"][0, 0]) == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="classifier mask"):
        make_optimizer(recipe, optax.constant_schedule(0.01))


def jax_zeros(tree):
    return {k: jnp.zeros_like(v) for k, v in tree.items()}


def test_override_parses_by_field_type():
    recipe = override(get_recipe(recipes.DEFAULT_RECIPE),
                      ["epochs=3", "lr=0.2", "nesterov=true", "milestones=2,4", "ema_decay=none", "model=resnet34"])
    assert (recipe.epochs, recipe.lr, recipe.nesterov, recipe.milestones, recipe.ema_decay, recipe.model) == (
        3, 0.2, True, (2, 4), None, "resnet34")
    with pytest.raises(ValueError, match="Recipe field"):
        override(recipe, ["learning_rate=1"])
    with pytest.raises(ValueError, match="cannot read 'many' as int"):
        override(recipe, ["epochs=many"])


def test_unknown_recipe_and_model_recipe():
    with pytest.raises(KeyError, match="resnet50_sgd-step_90e_imagenet"):
        get_recipe("resnet50_sgd-step_90e_imagnet")
    assert recipe_for_model("resnext50").model == "resnext50_32x4d"
    assert recipe_for_model("resnext50").name.startswith("resnext50")
    assert recipe_for_model("vgg19_bn").augmentation == "vgg"


def test_plateau_rule_divides_by_ten_at_most_three_times():
    from train.steps import TrainState
    from train.trainer import _plateau

    recipe = dataclasses.replace(get_recipe("vgg16_sgd-plateau_74e_imagenet"), plateau_patience=2)
    state = TrainState(step=0, params={}, batch_stats={}, opt_state=(), ema_params={}, rng=None,
                       lr_scale=jnp.ones(()), plateau_best=jnp.full((), -1.0), plateau_bad_epochs=jnp.zeros((), int),
                       apply_fn=None, tx=None)
    scales = []
    for top1 in [0.5, 0.6, 0.6, 0.59, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]:
        state = _plateau(state, top1, recipe)
        scales.append(round(float(state.lr_scale), 6))
    assert scales == [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001]
