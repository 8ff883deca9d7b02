"""DenseNet-BC (Huang et al. 2016): dense blocks of BN-ReLU-conv1x1-BN-ReLU-conv3x3, compression 0.5.

Intermediate features (see :func:`flaxnets.extract_features`): ``stem`` (stride 4), ``stage1``
... ``stage4`` (each dense block's output before its transition; strides 4, 8, 16, 32) and
``pre_logits``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxnets.layers import (
    ModuleFactory,
    Window,
    avg_pool,
    batch_norm,
    bias_free_conv,
    check_images,
    global_avg_pool,
    max_pool,
    smallest_input,
    sow,
)
from flaxnets.registry import register


class DenseLayer(nn.Module):
    """BN-ReLU-conv 1x1 (``bn_size * growth_rate``) -> BN-ReLU-conv 3x3 (``growth_rate``), concatenated."""

    growth_rate: int
    bn_size: int
    conv: ModuleFactory
    norm: ModuleFactory

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.relu(self.norm(name="norm1")(x))
        y = self.conv(self.bn_size * self.growth_rate, (1, 1), name="conv1")(y)
        y = nn.relu(self.norm(name="norm2")(y))
        y = self.conv(self.growth_rate, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
        return jnp.concatenate([x, y], axis=-1)


class Transition(nn.Module):
    """BN-ReLU-conv 1x1 to ``features`` channels, then 2x2/2 average pooling."""

    features: int
    conv: ModuleFactory
    norm: ModuleFactory

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(self.norm(name="norm")(x))
        x = self.conv(self.features, (1, 1), name="conv")(x)
        return avg_pool(x, 2, 2)


class DenseNet(nn.Module):
    """DenseNet-BC on NHWC images; returns float32 logits.

    Attributes:
      block_sizes: dense layers per block, e.g. ``(6, 12, 24, 16)`` for DenseNet-121.
      growth_rate: k, channels each layer adds.
      stem_features: channels of the 7x7 stem conv (2k).
      bn_size: bottleneck width multiplier (4k channels in the 1x1 conv).
      compression: channel factor of each transition (0.5 for "-BC").
      num_classes: classifier outputs.
      dtype: compute dtype; parameters are ``param_dtype``.
      param_dtype: parameter dtype.
      frozen_bn: BatchNorm normalises with its running statistics and leaves them unchanged even
        when ``train`` is True (fine-tuning with frozen statistics); dropout still follows ``train``.
    """

    block_sizes: tuple[int, ...] = (6, 12, 24, 16)
    growth_rate: int = 32
    stem_features: int = 64
    bn_size: int = 4
    compression: float = 0.5
    num_classes: int = 1000
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    frozen_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_images(x, self)
        conv = bias_free_conv(self.dtype, self.param_dtype)
        norm = batch_norm(train and not self.frozen_bn, self.dtype, param_dtype=self.param_dtype)

        x = x.astype(self.dtype)
        x = conv(self.stem_features, (7, 7), strides=2, padding=((3, 3), (3, 3)), name="conv0")(x)
        x = nn.relu(norm(name="norm0")(x))
        x = max_pool(x, 3, 2, padding=1)
        sow(self, "intermediates", "stem", x)
        for block, num_layers in enumerate(self.block_sizes, start=1):
            for layer in range(1, num_layers + 1):
                x = DenseLayer(self.growth_rate, self.bn_size, conv, norm, name=f"denseblock{block}_layer{layer}")(x)
            sow(self, "intermediates", f"stage{block}", x)
            if block < len(self.block_sizes):
                features = int(x.shape[-1] * self.compression)
                x = Transition(features, conv, norm, name=f"transition{block}")(x)
        x = nn.relu(norm(name="norm5")(x))
        x = global_avg_pool(x)
        sow(self, "intermediates", "pre_logits", x)
        x = nn.Dense(
            self.num_classes, bias_init=nn.initializers.zeros,
            dtype=self.dtype, param_dtype=self.param_dtype, name="classifier",
        )(x)
        return x.astype(jnp.float32)

    @nn.nowrap
    def min_input_size(self, train: bool = True, dense: bool = False) -> tuple[int, str]:
        """The smallest square input side, and why: the unpadded 2x2/2 transition pools must fit."""
        transitions = len(self.block_sizes) - 1
        windows = (Window(7, 2, 3), Window(3, 2, 1), *[Window(2, 2)] * transitions)
        return smallest_input(windows), f"its stride-4 stem and {transitions} unpadded 2x2/2 average-pool transitions"


_VARIANTS: dict[str, dict[str, Any]] = {
    "densenet121": dict(block_sizes=(6, 12, 24, 16)),
    "densenet161": dict(block_sizes=(6, 12, 36, 24), growth_rate=48, stem_features=96),
    "densenet169": dict(block_sizes=(6, 12, 32, 32)),
    "densenet201": dict(block_sizes=(6, 12, 48, 32)),
}
for _name, _fields in _VARIANTS.items():
    register(_name, DenseNet, family="densenet", input_size=224, aliases=(f"d{_name[8:]}",), **_fields)
