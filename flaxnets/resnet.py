"""ResNet (He et al. 2015) and ResNeXt (Xie et al. 2016), the latter a ResNet with grouped 3x3 convs.

The stride of a downsampling bottleneck sits on its 3x3 conv ("v1.5", as most ports do).
Projection shortcuts (1x1 conv + BN) are used where the shape changes.

Intermediate features (see :func:`flaxnets.extract_features`): ``stem`` (stride 4), ``stage1``
(4), ``stage2`` (8), ``stage3`` (16), ``stage4`` (32) and ``pre_logits``; the names detection
codebases use for r50/x101 backbones.
"""

from __future__ import annotations

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


class _Shortcut(nn.Module):
    """Identity, or a 1x1 projection + BN when the stride or the width changes."""

    features: int
    strides: int
    conv: ModuleFactory
    norm: ModuleFactory

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.strides == 1 and x.shape[-1] == self.features:
            return x
        x = self.conv(self.features, (1, 1), strides=self.strides, name="conv")(x)
        return self.norm(name="bn")(x)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). ``width`` is the block's output width."""

    width: int
    strides: int
    conv: ModuleFactory
    norm: ModuleFactory
    zero_init_last: bool = False
    groups: int = 1
    base_width: int = 64

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.width, (3, 3), strides=self.strides, padding=((1, 1), (1, 1)), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.width, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
        y = self.norm(name="bn2", scale_init=_last_scale_init(self.zero_init_last))(y)
        shortcut = _Shortcut(self.width, self.strides, self.conv, self.norm, name="downsample")(x)
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (grouped for ResNeXt, carries the stride) -> 1x1 expand to 4x ``width``."""

    width: int
    strides: int
    conv: ModuleFactory
    norm: ModuleFactory
    zero_init_last: bool = False
    groups: int = 1
    base_width: int = 64

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = int(self.width * self.base_width / 64) * self.groups
        y = self.conv(inner, (1, 1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(
            inner, (3, 3), strides=self.strides, padding=((1, 1), (1, 1)),
            feature_group_count=self.groups, name="conv2",
        )(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.width * self.expansion, (1, 1), name="conv3")(y)
        y = self.norm(name="bn3", scale_init=_last_scale_init(self.zero_init_last))(y)
        shortcut = _Shortcut(self.width * self.expansion, self.strides, self.conv, self.norm, name="downsample")(x)
        return nn.relu(y + shortcut)


def _last_scale_init(zero: bool):
    return nn.initializers.zeros if zero else nn.initializers.ones


class ResNet(nn.Module):
    """ResNet / ResNeXt on NHWC images; returns float32 logits.

    Attributes:
      stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)`` for 50 layers.
      block_cls: :class:`BasicBlock` or :class:`Bottleneck`.
      groups: cardinality C of the 3x3 convs (ResNeXt: 32 or 64).
      base_width: width d per group in stage 1 (ResNeXt "32x4d": 4; plain ResNet: 64).
      zero_init_residual: start the last BN of every block at zero scale, so each block begins as
        the identity (Goyal et al. 2017); off by default, as in the paper.
      num_classes: classifier outputs.
      dtype: compute dtype; parameters are ``param_dtype``.
      param_dtype: parameter dtype.
      frozen_bn: BatchNorm normalises with its running statistics and leaves them unchanged even
        when ``train`` is True (fine-tuning with frozen statistics); dropout still follows ``train``.
    """

    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    block_cls: type[nn.Module] = Bottleneck
    groups: int = 1
    base_width: int = 64
    zero_init_residual: bool = False
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
        x = conv(64, (7, 7), strides=2, padding=((3, 3), (3, 3)), name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x))
        x = max_pool(x, 3, 2, padding=1)
        sow(self, "intermediates", "stem", x)
        for stage, num_blocks in enumerate(self.stage_sizes):
            for index in range(num_blocks):
                x = self.block_cls(
                    width=64 * 2**stage,
                    strides=2 if stage > 0 and index == 0 else 1,
                    conv=conv,
                    norm=norm,
                    zero_init_last=self.zero_init_residual,
                    groups=self.groups,
                    base_width=self.base_width,
                    name=f"layer{stage + 1}_{index}",
                )(x)
            sow(self, "intermediates", f"stage{stage + 1}", x)
        x = global_avg_pool(x)
        sow(self, "intermediates", "pre_logits", x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(x)
        return x.astype(jnp.float32)

    @nn.nowrap
    def min_input_size(self, train: bool = True, dense: bool = False) -> tuple[int, str]:
        """The smallest square input side, and why (every conv and pool is padded: 1 px)."""
        windows = (Window(7, 2, 3), Window(3, 2, 1), *[Window(3, 2, 1)] * (len(self.stage_sizes) - 1))
        return smallest_input(windows), "its padded stem and stride-2 stages"


_VARIANTS: dict[str, dict[str, Any]] = {
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock),
    "resnet34": dict(stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock),
    "resnet50": dict(stage_sizes=(3, 4, 6, 3)),
    "resnet101": dict(stage_sizes=(3, 4, 23, 3)),
    "resnet152": dict(stage_sizes=(3, 8, 36, 3)),
    "resnext50_32x4d": dict(stage_sizes=(3, 4, 6, 3), groups=32, base_width=4),
    "resnext101_32x4d": dict(stage_sizes=(3, 4, 23, 3), groups=32, base_width=4),
    "resnext101_32x8d": dict(stage_sizes=(3, 4, 23, 3), groups=32, base_width=8),
    "resnext101_64x4d": dict(stage_sizes=(3, 4, 23, 3), groups=64, base_width=4),
}
# Detection-style short names; "resnext101"/"x101" mean 32x8d, torchvision's and Detectron's default.
_ALIASES = {
    "resnet18": ("r18",),
    "resnet34": ("r34",),
    "resnet50": ("r50",),
    "resnet101": ("r101",),
    "resnet152": ("r152",),
    "resnext50_32x4d": ("resnext50", "x50"),
    "resnext101_32x8d": ("resnext101", "x101"),
}
for _name, _fields in _VARIANTS.items():
    register(_name, ResNet, family="resnet", input_size=224, aliases=_ALIASES.get(_name, ()), **_fields)
