"""Named intermediate features, for using any flaxnets model as a backbone."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax


def extract_features(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: jax.Array,
    *,
    names: tuple[str, ...] | None = None,
    train: bool = False,
    **apply_kwargs: Any,
) -> dict[str, jax.Array]:
    """Runs ``model`` on ``x`` and returns its named intermediate features.

    Every model sows its stage outputs into the ``"intermediates"`` collection: ResNet/ResNeXt,
    DenseNet and Xception give ``stem`` and ``stage1`` ... ``stage4`` (strides up to 32, as
    detection backbones expect), VGG and AlexNet ``stage1`` ... ``stage5``,
    GoogLeNet ``stem``, ``inception3`` ... ``inception5``; all give ``pre_logits``.

    Args:
      model: a module from :func:`flaxnets.create_model`.
      variables: its variables (``params`` and, where it has BatchNorm, ``batch_stats``).
      x: NHWC input batch.
      names: the features to return (all when None); an unknown name raises ``KeyError``.
      train: run in training mode (then pass ``rngs={"dropout": key}`` for dropout models);
        BatchNorm statistics updates are discarded.
      **apply_kwargs: forwarded to ``model.apply``.

    Returns:
      A dict from feature name to array, in the order the model computes them. The logits are
      under ``"logits"``.

    Raises:
      TypeError: ``model`` is not a module, ``variables`` not the dict ``model.init`` returned,
        ``names`` a single string, or ``x`` not a float array.
      ValueError: ``x`` of the wrong rank, layout (NCHW) or size for the model.

    Example::

        feats = extract_features(model, variables, images, names=("stage2", "stage3", "stage4"))
    """
    check_call(model, variables, "extract_features")
    if isinstance(names, str) or (names is not None and not all(isinstance(n, str) for n in names)):
        raise TypeError(f"names must be a tuple of feature names, e.g. ({names!r},); got {names!r}")
    mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
    logits, state = model.apply(variables, x, train=train, mutable=mutable, **apply_kwargs)
    features = {key: values[0] for key, values in state["intermediates"].items()}
    features["logits"] = logits
    if names is None:
        return features
    missing = [n for n in names if n not in features]
    if missing:
        raise KeyError(f"{type(model).__name__} has no feature(s) {missing}; it has {list(features)}")
    return {n: features[n] for n in names}


def check_call(model: Any, variables: Any, caller: str) -> None:
    """Raises a one-line ``TypeError`` unless ``model`` is a module and ``variables`` what its ``init`` returned."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller} expects a model from flaxnets.create_model; got {type(model).__name__}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        keys = sorted(map(str, variables)) if isinstance(variables, Mapping) else []
        got = f"keys {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}" if keys else type(variables).__name__
        raise TypeError(f"{caller} expects the variables model.init returned ({{'params': ..., ...}}); got {got}: "
                        "pass the whole dict, not variables['params']")
