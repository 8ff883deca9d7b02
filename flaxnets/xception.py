"""Xception (Chollet 2016): depthwise-separable convolutions with residual connections.

The layer layout follows the paper's Figure 5 as the common port (timm's ``legacy_xception``)
builds it: unpadded 3x3 stem convs, padded separable convs, 3x3/2 max pools closing the
downsampling blocks, BN after every conv and no ReLU between depthwise and pointwise.

Intermediate features (see :func:`flaxnets.extract_features`): ``stem`` (stride 2), ``stage1``
(4), ``stage2`` (8), ``stage3`` (16, end of the middle flow), ``stage4`` (32, last activation) and
``pre_logits``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxnets.layers import (
    ModuleFactory,
    Window,
    batch_norm,
    bias_free_conv,
    check_images,
    global_avg_pool,
    max_pool,
    smallest_input,
    sow,
)
from flaxnets.registry import register


class SeparableConv(nn.Module):
    """3x3 depthwise conv then 1x1 pointwise conv, both without bias, nothing in between."""

    features: int
    conv: ModuleFactory

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        x = self.conv(channels, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=channels, name="depthwise")(x)
        return self.conv(self.features, (1, 1), name="pointwise")(x)


class XceptionBlock(nn.Module):
    """``reps`` x (ReLU, separable conv, BN), then a 3x3/2 max pool if strided, plus a shortcut.

    Attributes:
      features: output channels.
      reps: separable convs in the block.
      strides: 1, or 2 to end with a max pool (and a 1x1/2 conv + BN shortcut).
      conv: conv factory; norm: BN factory.
      start_with_relu: the first block of the entry flow starts without ReLU.
      grow_first: widen at the first separable conv (else at the last, as in the exit flow).
    """

    features: int
    reps: int
    strides: int
    conv: ModuleFactory
    norm: ModuleFactory
    start_with_relu: bool = True
    grow_first: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        if self.grow_first:
            widths = [self.features] * self.reps
        else:
            widths = [in_features] * (self.reps - 1) + [self.features]
        y = x
        for i, width in enumerate(widths, start=1):
            if i > 1 or self.start_with_relu:
                y = nn.relu(y)
            y = SeparableConv(width, self.conv, name=f"sepconv{i}")(y)
            y = self.norm(name=f"bn{i}")(y)
        if self.strides != 1:
            y = max_pool(y, 3, self.strides, padding=1)
        if self.strides != 1 or in_features != self.features:
            x = self.conv(self.features, (1, 1), strides=self.strides, name="skip")(x)
            x = self.norm(name="skipbn")(x)
        return y + x


class Xception(nn.Module):
    """Xception on NHWC images (default 299x299); returns float32 logits.

    Attributes:
      middle_blocks: repetitions of the middle-flow block (8 in the paper).
      num_classes: classifier outputs.
      dropout_rate: dropout before the classifier (paper: 0.5 on ImageNet).
      dtype: compute dtype; parameters are ``param_dtype``.
      param_dtype: parameter dtype.
      frozen_bn: BatchNorm normalises with its running statistics and leaves them unchanged even
        when ``train`` is True (fine-tuning with frozen statistics); dropout still follows ``train``.
    """

    middle_blocks: int = 8
    num_classes: int = 1000
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    frozen_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_images(x, self)
        conv = bias_free_conv(self.dtype, self.param_dtype)
        norm = batch_norm(train and not self.frozen_bn, self.dtype, param_dtype=self.param_dtype)
        block = functools.partial(XceptionBlock, conv=conv, norm=norm)

        x = x.astype(self.dtype)
        x = nn.relu(norm(name="bn1")(conv(32, (3, 3), strides=2, padding="VALID", name="conv1")(x)))
        x = nn.relu(norm(name="bn2")(conv(64, (3, 3), padding="VALID", name="conv2")(x)))
        sow(self, "intermediates", "stem", x)
        # Entry flow.
        x = block(128, 2, 2, start_with_relu=False, name="block1")(x)
        sow(self, "intermediates", "stage1", x)
        x = block(256, 2, 2, name="block2")(x)
        sow(self, "intermediates", "stage2", x)
        x = block(728, 2, 2, name="block3")(x)
        # Middle flow.
        for i in range(self.middle_blocks):
            x = block(728, 3, 1, name=f"block{4 + i}")(x)
        sow(self, "intermediates", "stage3", x)
        # Exit flow.
        x = block(1024, 2, 2, grow_first=False, name=f"block{4 + self.middle_blocks}")(x)
        x = nn.relu(norm(name="bn3")(SeparableConv(1536, conv, name="conv3")(x)))
        x = nn.relu(norm(name="bn4")(SeparableConv(2048, conv, name="conv4")(x)))
        sow(self, "intermediates", "stage4", x)
        x = global_avg_pool(x)
        sow(self, "intermediates", "pre_logits", x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(x)
        return x.astype(jnp.float32)

    @nn.nowrap
    def min_input_size(self, train: bool = True, dense: bool = False) -> tuple[int, str]:
        """The smallest square input side, and why: the two unpadded 3x3 stem convs must fit."""
        windows = (Window(3, 2), Window(3), *[Window(3, 2, 1)] * 4)
        return smallest_input(windows), "its two unpadded 3x3 stem convs"


register("xception", Xception, family="xception", input_size=299, aliases=("legacy_xception",))
