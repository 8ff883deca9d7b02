"""Every flaxnets model as a Flax NNX module, through Flax's linen-to-NNX bridge.

A model is its linen module wrapped in :class:`flax.nnx.bridge.ToNNX`: the weights live in
``nnx.Param`` and ``nnx.BatchStat`` variables inside the module, which is called directly::

    model = flaxnets.nnx.create_model("resnet18", num_classes=10)
    logits = model(images, train=False)  # images: NHWC float32, labels: int32
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    optimizer.update(model, nnx.grad(lambda m: cross_entropy(m(images, train=True), labels).mean())(model))

(``cross_entropy`` is ``optax.softmax_cross_entropy_with_integer_labels``; wrap the step in
``nnx.jit`` for speed.) Weights go both ways: ``create_model(name, variables=...)`` loads a linen
``{"params", "batch_stats"}`` dict and :func:`to_linen_variables` gives one back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from flax.nnx import bridge

import flaxnets
from flaxnets import registry
from flaxnets.initialize import init_variables

# The NNX variable type the bridge gives GoogLeNet's sown "aux_logits" collection.
AuxLogits = nnx.variable_type_from_name("aux_logits", allow_register=True)


class Model(bridge.ToNNX):
    """A flaxnets linen model as an NNX module; build it with :func:`create_model`.

    ``model(x, train=False)`` returns the logits of an NHWC batch. ``model(x, train=True)``
    also updates the BatchNorm statistics held by the module and draws fresh dropout keys from
    its rngs (a ``"dropout"`` stream if the ``nnx.Rngs`` has one, else its ``"params"`` or
    default stream); GoogLeNet's auxiliary logits are kept for :func:`pop_aux_logits`.
    The wrapped linen module is ``model.to_nnx__module``; :func:`to_linen_variables` gives the
    variables to ``apply`` it with.
    """

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if not train:
            return super().__call__(x, train=False, mutable=False)
        # Linen's sow appends to what the module already holds: drop the previous call's values.
        nnx.pop(self, AuxLogits)
        return super().__call__(x, train=True, mutable=["batch_stats", "aux_logits"])


def create_model(
    name: str,
    *,
    variables: Mapping[str, Any] | None = None,
    num_classes: int = 1000,
    rngs: nnx.Rngs | None = None,
    input_size: int | None = None,
    pretrained: bool | str = False,
    **overrides: Any,
) -> Model:
    """Builds a registered model as an initialised NNX module.

    Args:
      name: a registry name or alias, as for :func:`flaxnets.create_model`.
      variables: linen variables (``{"params": ..., "batch_stats": ...}``) to load instead of a
        random init; they must have the model's exact structure and shapes. Values are cast to
        the model's parameter dtype.
      num_classes: size of the classifier output.
      rngs: keys for the random init (``"params"`` stream) and for dropout at training time
        (``"dropout"`` stream, else the ``"params"`` one); default ``nnx.Rngs(0)``.
      input_size: side of the square dummy batch the variable shapes are traced with; default
        the model's ``flaxnets.model_info(name).input_size``. It matters only for models whose
        shapes depend on the input, e.g. GoogLeNet's auxiliary heads.
      pretrained: load published weights through :func:`flaxnets.pretrained`: ``True`` for the
        default tag, or a tag (or checkpoint path); a ``num_classes`` other than the weights'
        gets a fresh classifier.
      **overrides: other fields of the linen module (``dtype=jnp.bfloat16``,
        ``dropout_rate=0.2``...), as for :func:`flaxnets.create_model`.

    Returns:
      A :class:`Model`: call it as ``model(x, train=...)``.

    Raises:
      ValueError: ``variables`` do not fit the model (the one-line message names the missing,
        unexpected and wrongly shaped entries), or both ``variables`` and ``pretrained`` given.
      KeyError, TypeError: unknown name or override, as for :func:`flaxnets.create_model`.
    """
    if pretrained:
        if variables is not None:
            raise ValueError("pass either pretrained= or variables=, not both")
        tag = None if pretrained is True else pretrained
        linen_model, variables = flaxnets.pretrained(name, tag=tag, num_classes=num_classes, **overrides)
    else:
        linen_model = registry.create_model(name, num_classes=num_classes, **overrides)
    rngs = nnx.Rngs(0) if rngs is None else rngs
    size = input_size or registry.model_info(name).input_size
    sample = jnp.zeros((1, size, size, 3), jnp.float32)
    if variables is None:
        variables = init_variables(linen_model, rngs.params(), size, train=False)
    # The bridge's lazy init, traced without computing anything, gives the module's layout;
    # the weights are then put in from `variables` and the rng state from a real fork of `rngs`.
    module = Model(linen_model, rngs=rngs)
    abstract = nnx.eval_shape(lambda m: m.lazy_init(sample, train=False), module)
    graphdef, params, batch_stats, _ = nnx.split(abstract, nnx.Param, nnx.BatchStat, ...)
    expected = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)}
    loaded = _conform(variables, expected, f"{registry.resolve_name(name)} (num_classes={num_classes})")
    nnx.replace_by_pure_dict(params, loaded.get("params", {}))
    nnx.replace_by_pure_dict(batch_stats, loaded.get("batch_stats", {}))
    return nnx.merge(graphdef, params, batch_stats, nnx.state(module))


def to_linen_variables(module: nnx.Module) -> dict[str, Any]:
    """Returns a module's weights as linen variables, for ``linen_model.apply``.

    The dict is ``{"params": ..., "batch_stats": ...}``, without ``"batch_stats"`` for models
    that have no BatchNorm, as ``linen_model.init`` returns it.
    """
    variables = {"params": nnx.to_pure_dict(nnx.state(module, nnx.Param))}
    batch_stats = nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))
    if batch_stats:
        variables["batch_stats"] = batch_stats
    return variables


def pop_aux_logits(module: nnx.Module) -> dict[str, jax.Array]:
    """Removes and returns the auxiliary logits of the last training-mode call.

    Only GoogLeNet built with ``aux_logits=True`` has them: ``{"aux1": ..., "aux2": ...}``;
    other models give ``{}``. Call it inside the loss function, after ``module(x, train=True)``.
    """
    sown = nnx.to_pure_dict(nnx.pop(module, AuxLogits))
    return {head: values["logits"][-1] for head, values in sown.items()}


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else np.shape(value)


def _conform(variables: Mapping[str, Any], expected: dict[str, Any], what: str) -> dict[str, Any]:
    """``variables`` cast to ``expected``'s dtypes; a one-line ValueError if they do not fit."""
    if not isinstance(variables, Mapping):
        raise ValueError(f"variables must be a dict of collections, got {type(variables).__name__}")
    given = traverse_util.flatten_dict(dict(variables), sep="/")
    wanted = traverse_util.flatten_dict(expected, sep="/")
    missing = sorted(wanted.keys() - given.keys())
    unexpected = sorted(given.keys() - wanted.keys())
    reshaped = [
        f"{key} {_shape(given[key])} != {_shape(wanted[key])}"
        for key in sorted(wanted.keys() & given.keys())
        if _shape(given[key]) != _shape(wanted[key])
    ]
    problems = [
        f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped))
        if items
    ]
    if problems:
        raise ValueError(f"variables do not fit {what}: {'; '.join(problems)}")
    cast = {key: jnp.asarray(given[key], wanted[key].dtype) for key in wanted}
    return traverse_util.unflatten_dict(cast, sep="/")
