"""The training step as the trainer compiles it on the CPU: donated weights are updated in place."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from train import program as program_module
from train.recipes import DEFAULT_RECIPE, get_recipe
from train.steps import create_state, train_step, train_step_compiler_options


class _ConvNet(nn.Module):
    """Two convolutions, BatchNorm and a classifier: every weight but the first is read by the
    backward pass before the update overwrites it."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.Conv(16, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(10)(x.mean((1, 2)))


def _weight_copies(compiled) -> int:
    return len(re.findall(r"copy\(%\S*params", compiled.as_text()))


def test_the_cpu_options_drop_the_weight_copies_and_change_no_number():
    model = _ConvNet()
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (8, 12, 12, 3)), jnp.uint8),
             "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}
    initial = create_state(model, tx, 12, seed=0)
    lowered = jax.jit(lambda s, b: train_step(s, b, num_classes=10), donate_argnums=0).lower(initial, batch)
    default, tuned = lowered.compile(), lowered.compile(compiler_options=train_step_compiler_options("cpu"))
    assert _weight_copies(default) >= 2 and _weight_copies(tuned) == 0
    results = []
    for compiled in (default, tuned):
        state = jax.tree.map(jnp.copy, initial)  # the step donates its input
        for _ in range(3):
            state, metrics = compiled(state, batch)
        results.append(jax.tree.leaves((state.params, state.batch_stats, state.opt_state)) + [metrics["loss"]])
    assert all(np.array_equal(a, b) for a, b in zip(*results))
    assert train_step_compiler_options("tpu") == train_step_compiler_options("gpu") == {}


def test_the_trainer_compiles_its_step_with_the_options_of_its_devices(monkeypatch):
    seen = []
    real_jit = jax.jit

    def spy(fun, **kwargs):
        seen.append(kwargs.get("compiler_options"))
        return real_jit(fun, **kwargs)

    monkeypatch.setattr(program_module.jax, "jit", spy)
    program_module.build_program(get_recipe(DEFAULT_RECIPE), num_classes=10, image_size=32, steps_per_epoch=10,
                                 precision="fp32", devices=jax.devices()[:1], mean=(0.5,) * 3, std=(0.25,) * 3)
    assert train_step_compiler_options("cpu") in seen
