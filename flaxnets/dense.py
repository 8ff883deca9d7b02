"""Dense (fully convolutional) evaluation of whole images of any size, as VGG's paper tests."""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import flax.linen as nn
import jax

from flaxnets.features import check_call


def dense_logits(model: nn.Module, variables: Mapping[str, Any], images: jax.Array) -> jax.Array:
    """Class scores of whole NHWC images at any resolution, averaged over positions.

    VGG and AlexNet apply their FC layers as convolutions over the last feature map (the first
    FC layer's kernel read as a 7x7 or 6x6 convolution) and average the class score map; the
    other families end in global average pooling followed by a linear layer, which already is
    the average of their score map, so their plain forward pass is used. At a model's training
    resolution the result equals ``model.apply(variables, images, train=False)``.

    Raises:
      TypeError, ValueError: as :func:`flaxnets.extract_features`, for the model, variables and images.
    """
    check_call(model, variables, "dense_logits")
    if "dense" in inspect.signature(type(model).__call__).parameters:
        return model.apply(variables, images, train=False, dense=True)
    return model.apply(variables, images, train=False)
