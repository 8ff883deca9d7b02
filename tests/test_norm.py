"""flaxnets.norm.BatchNorm against flax.linen.BatchNorm, and its custom gradient against autodiff."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxnets.norm import BatchNorm, normalize_with_batch_stats

# Channels with a mean far from zero next to their spread, where a careless variance cancels.
_X = jax.random.normal(jax.random.key(0), (4, 5, 5, 6)) * jnp.arange(1.0, 7.0) + jnp.arange(-30.0, 30.0, 10.0)
_WEIGHTS = jax.random.normal(jax.random.key(1), _X.shape)


def _loss_and_grads(module, variables, x):
    """Loss, new batch_stats and gradients (x, params) of sum(relu(bn(x)) * weights) in training mode."""

    def loss(x, params):
        y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                  mutable=["batch_stats"])
        return jnp.sum(nn.relu(y) * _WEIGHTS), (y, updates["batch_stats"])

    (value, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, variables["params"])
    return y, stats, grads


@pytest.mark.parametrize("scale_init", [nn.initializers.ones, nn.initializers.constant(0.7)])
def test_batch_norm_matches_flax_in_training_and_eval(scale_init):
    ours = BatchNorm(use_running_average=False, momentum=0.9, scale_init=scale_init)
    reference = nn.BatchNorm(use_running_average=False, momentum=0.9, use_fast_variance=False, scale_init=scale_init)
    ours_vars, ref_vars = ours.init(jax.random.key(0), _X), reference.init(jax.random.key(0), _X)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), ours_vars) == jax.tree.map(lambda a: (a.shape, a.dtype), ref_vars)
    y, stats, grads = _loss_and_grads(ours, ours_vars, _X)
    ref_y, ref_stats, ref_grads = _loss_and_grads(reference, ref_vars, _X)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    evaluated = BatchNorm(use_running_average=True).apply({"params": ours_vars["params"], "batch_stats": stats}, _X)
    ref_evaluated = nn.BatchNorm(use_running_average=True).apply({"params": ref_vars["params"], "batch_stats": ref_stats}, _X)
    np.testing.assert_array_equal(evaluated, ref_evaluated)


def test_initialising_leaves_the_running_statistics_alone():
    variables = BatchNorm(use_running_average=False).init(jax.random.key(0), _X)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(6))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(6))


def test_custom_gradient_matches_autodiff_through_all_three_outputs():
    scale, bias = jnp.linspace(0.5, 1.5, 6), jnp.linspace(-1.0, 1.0, 6)

    def plain(x, scale, bias):
        mean = jnp.mean(x, (0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias, mean, var

    def loss(fn):
        def value(x, scale, bias):
            y, mean, var = fn(x, scale, bias)
            return jnp.sum(y * _WEIGHTS) + jnp.sum(mean * jnp.arange(6.0)) + jnp.sum(jnp.sqrt(var))
        return jax.grad(value, argnums=(0, 1, 2))

    got = loss(lambda x, s, b: normalize_with_batch_stats(x, s, b, 1e-5, jnp.float32))(_X, scale, bias)
    want = loss(plain)(_X, scale, bias)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_bfloat16_input_gives_bfloat16_output_and_gradient():
    x = _X.astype(jnp.bfloat16)
    module = BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
    variables = module.init(jax.random.key(0), x)
    y, stats, (grad_x, grad_params) = _loss_and_grads(module, variables, x)
    assert y.dtype == jnp.bfloat16 and grad_x.dtype == jnp.bfloat16
    assert stats["mean"].dtype == jnp.float32 and grad_params["scale"].dtype == jnp.float32
