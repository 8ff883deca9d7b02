"""flaxnets.nnx: the linen models as NNX modules give the same numbers, train, and convert back."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flaxnets
from flaxnets import nnx as nnx_models
from flaxnets.layers import sow

NAME, SIZE, CLASSES = "resnet18", 32, 10
LABELS = jnp.array([3, 7])
LINEN = flaxnets.create_model(NAME, num_classes=CLASSES)


@jax.jit
def linen_eval(variables, x):
    return LINEN.apply(variables, x, train=False)


@nnx.jit
def nnx_eval(model, x):
    return model(x, train=False)


@nnx.jit
def train_step(model, optimizer, x, labels):
    def loss_fn(model):
        logits = model(x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.key(1), (2, SIZE, SIZE, 3), jnp.float32)


@pytest.fixture(scope="module")
def variables():
    """Linen variables with non-trivial running statistics, drawn with NumPy.

    The shapes come from the NNX random-init path traced abstractly (no init compile).
    """
    shapes = jax.eval_shape(
        lambda: nnx_models.to_linen_variables(
            nnx_models.create_model(NAME, num_classes=CLASSES, input_size=SIZE, rngs=nnx.Rngs(0))
        )
    )
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        kind = path[-1].key
        if kind == "kernel":
            values = rng.normal(0.0, np.prod(leaf.shape[:-1]) ** -0.5, leaf.shape)
        elif kind == "var":
            values = rng.uniform(0.5, 1.5, leaf.shape)
        else:  # "mean", "bias", "scale"
            values = (kind == "scale") + 0.1 * rng.normal(size=leaf.shape)
        return values.astype(leaf.dtype)

    return jax.tree.map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def trained(variables, images):
    """An NNX model after five SGD steps on a fixed batch, and its losses."""
    model = nnx_models.create_model(NAME, num_classes=CLASSES, variables=variables)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    losses = [float(train_step(model, optimizer, images, LABELS)) for _ in range(5)]
    return model, losses


def test_eval_logits_match_linen(variables, images):
    model = nnx_models.create_model(NAME, num_classes=CLASSES, variables=variables)
    assert isinstance(model, nnx.Module)
    logits = nnx_eval(model, images)
    assert logits.shape == (2, CLASSES)
    np.testing.assert_allclose(logits, linen_eval(variables, images), rtol=1e-5, atol=1e-5)


def test_training_lowers_loss(trained):
    _, losses = trained
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses


def test_batch_stats_change_in_training_only(variables, images, trained):
    model = nnx_models.create_model(NAME, num_classes=CLASSES, variables=variables)
    nnx_eval(model, images)
    after_eval = nnx_models.to_linen_variables(model)
    jax.tree.map(np.testing.assert_array_equal, after_eval, variables)
    after_training = nnx_models.to_linen_variables(trained[0])["batch_stats"]
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), after_training, variables["batch_stats"])
    assert all(jax.tree.leaves(changed))


def test_to_linen_variables_round_trip(trained, variables, images):
    model, _ = trained
    back = nnx_models.to_linen_variables(model)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    np.testing.assert_allclose(linen_eval(back, images), nnx_eval(model, images), rtol=1e-5, atol=1e-5)
    reloaded = nnx_models.create_model(NAME, num_classes=CLASSES, variables=back)
    jax.tree.map(np.testing.assert_array_equal, nnx_models.to_linen_variables(reloaded), back)


@pytest.mark.parametrize(
    "name, num_classes, change, message",
    [
        ("resnet34", CLASSES, None, "missing"),
        (NAME, 5, None, "wrong shape"),
        (NAME, CLASSES, "extra", "unexpected"),
    ],
)
def test_mismatched_variables_raise(variables, name, num_classes, change, message):
    if change == "extra":
        variables = {**variables, "intermediates": {"stem": jnp.zeros(3)}}
    with pytest.raises(ValueError, match=message) as error:
        nnx_models.create_model(name, num_classes=num_classes, variables=variables)
    assert "\n" not in str(error.value)


def test_pretrained_and_variables_together_raise(variables):
    with pytest.raises(ValueError, match="not both"):
        nnx_models.create_model(NAME, num_classes=CLASSES, variables=variables, pretrained=True)


def _ramp(key, shape, dtype=jnp.float32):
    """A deterministic non-constant initialiser: eager random inits compile slowly on CPU."""
    return jnp.linspace(-1.0, 1.0, int(np.prod(shape)), dtype=dtype).reshape(shape)


class _AuxHead(nn.Module):
    @nn.compact
    def __call__(self, x):
        logits = nn.Dense(3, kernel_init=_ramp, name="fc")(x)
        sow(self, "aux_logits", "logits", logits)
        return logits


class _Tiny(nn.Module):
    """BatchNorm, dropout and a GoogLeNet-style sown auxiliary head, at the cost of a few Dense."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(32, kernel_init=_ramp, name="fc1")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = nn.Dropout(0.5, deterministic=not train)(x)
        if train or self.is_initializing():  # as GoogLeNet's auxiliary heads
            _AuxHead(name="aux1")(x)
        return nn.Dense(3, kernel_init=_ramp, name="fc2")(x)


def test_dropout_keys_differ_between_training_calls_and_aux_logits_are_kept():
    x = jax.random.normal(jax.random.key(3), (4, 8))
    model = nnx_models.Model(_Tiny(), rngs=nnx.Rngs(0)).lazy_init(x)
    np.testing.assert_array_equal(model(x), model(x))
    assert not np.allclose(model(x, train=True), model(x, train=True))

    traces = []

    @nnx.jit
    def forward(model, x):
        traces.append(1)
        return model(x, train=True)

    outputs = [forward(model, x) for _ in range(3)]
    assert not np.allclose(outputs[0], outputs[1]) and not np.allclose(outputs[1], outputs[2])
    assert len(traces) == 1
    # Linen's sow appends; the module keeps only the last call's value.
    (value,) = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx_models.AuxLogits)))
    assert value.shape == (4, 3)
    aux = nnx_models.pop_aux_logits(model)
    assert list(aux) == ["aux1"] and aux["aux1"].shape == (4, 3)
    assert nnx_models.pop_aux_logits(model) == {}
