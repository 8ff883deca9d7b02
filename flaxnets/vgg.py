"""VGG (Simonyan, Zisserman 2014): configurations A, A-LRN, B, C, D, E, and BatchNorm forms.

Each configuration is a table of five stages of conv kernel sizes (3 or 1), every conv padded to
keep the resolution, each stage closed by a 2x2/2 max pool; then the 4096-4096 FC head.

Intermediate features (see :func:`flaxnets.extract_features`): ``stage1`` ... ``stage5`` (after
each stage's pool, strides 2 to 32) and ``pre_logits``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxnets.layers import (
    Conv,
    ConvNormAct,
    MLPHead,
    Window,
    adaptive_avg_pool,
    batch_norm,
    check_images,
    flatten,
    local_response_norm,
    max_pool,
    smallest_input,
    sow,
)
from flaxnets.registry import register

_WIDTHS = (64, 128, 256, 512, 512)
# Kernel sizes per stage for each configuration of the paper's Table 1.
_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "A": ((3,), (3,), (3, 3), (3, 3), (3, 3)),
    "B": ((3, 3), (3, 3), (3, 3), (3, 3), (3, 3)),
    "C": ((3, 3), (3, 3), (3, 3, 1), (3, 3, 1), (3, 3, 1)),
    "D": ((3, 3), (3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
    "E": ((3, 3), (3, 3), (3, 3, 3, 3), (3, 3, 3, 3), (3, 3, 3, 3)),
}


class VGG(nn.Module):
    """VGG on NHWC images; returns float32 logits.

    Attributes:
      stage_kernels: conv kernel sizes of each of the five stages (a row of ``_CONFIGS``).
      stage_widths: channels of each stage.
      batch_norm: BatchNorm after every conv (the common modern variant; convs keep their bias).
      lrn_after_first: LRN after the first conv (configuration A-LRN).
      num_classes: classifier outputs.
      dropout_rate: dropout of the two hidden FC layers (paper: 0.5).
      kernel_init: weight init of every layer (paper: N(0, 0.01); Glorot also works).
      dtype: compute dtype; parameters are ``param_dtype``.
      param_dtype: parameter dtype.
      frozen_bn: BatchNorm normalises with its running statistics and leaves them unchanged even
        when ``train`` is True (fine-tuning with frozen statistics); dropout still follows ``train``.
    """

    stage_kernels: tuple[tuple[int, ...], ...] = _CONFIGS["D"]
    stage_widths: tuple[int, ...] = _WIDTHS
    batch_norm: bool = False
    lrn_after_first: bool = False
    num_classes: int = 1000
    dropout_rate: float = 0.5
    kernel_init: Callable = nn.initializers.normal(0.01)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    frozen_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, dense: bool = False) -> jax.Array:
        """Logits of NHWC images.

        With ``dense=True`` (the paper's dense evaluation) the FC layers slide as convolutions
        over the feature map of an image of any size of at least 224 px, and the class score map
        is averaged; on a 224 px image this equals the plain forward pass.
        """
        check_images(x, self, dense=dense)
        conv = functools.partial(
            Conv, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init
        )
        norm = batch_norm(train and not self.frozen_bn, self.dtype, param_dtype=self.param_dtype) if self.batch_norm else None
        x = x.astype(self.dtype)
        for stage, (width, kernels) in enumerate(zip(self.stage_widths, self.stage_kernels), start=1):
            for j, kernel in enumerate(kernels, start=1):
                x = ConvNormAct(
                    width, kernel, conv, norm, padding=kernel // 2, name=f"conv{stage}_{j}"
                )(x)
                if self.lrn_after_first and (stage, j) == (1, 1):
                    x = local_response_norm(x)
            x = max_pool(x, 2, 2)
            sow(self, "intermediates", f"stage{stage}", x)
        head = MLPHead(
            hidden=(4096, 4096),
            num_classes=self.num_classes,
            dropout_rate=self.dropout_rate,
            kernel_init=self.kernel_init,
            window=7,
            dtype=self.dtype,
            name="classifier",
        )
        if dense:
            return head(x, train).mean(axis=(1, 2)).astype(jnp.float32)
        x = flatten(adaptive_avg_pool(x, 7))
        sow(self, "intermediates", "pre_logits", x)
        return head(x, train).astype(jnp.float32)

    @nn.nowrap
    def min_input_size(self, train: bool = True, dense: bool = False) -> tuple[int, str]:
        """The smallest square input side, and why: each stage ends in a 2x2/2 max pool (and in dense
        evaluation the first FC layer slides as a 7x7 window over the last feature map)."""
        stages = len(self.stage_kernels)
        windows = (Window(2, 2),) * stages
        if dense:
            return smallest_input((*windows, Window(7))), "dense evaluation slides its FC layers as a 7x7 window"
        return smallest_input(windows), f"the 2x2/2 max pool closing each of its {stages} stages"


_VARIANTS = {
    # name: (configuration, aliases)
    "vgg11": ("A", ("vgg_a",)),
    "vgg13": ("B", ("vgg_b",)),
    "vgg16_1x1": ("C", ("vgg_c",)),
    "vgg16": ("D", ("vgg_d",)),
    "vgg19": ("E", ("vgg_e",)),
}
for _name, (_config, _aliases) in _VARIANTS.items():
    register(_name, VGG, family="vgg", input_size=224, aliases=_aliases, stage_kernels=_CONFIGS[_config])
    if _config != "C":
        register(
            f"{_name}_bn",
            VGG,
            family="vgg",
            input_size=224,
            stage_kernels=_CONFIGS[_config],
            batch_norm=True,
        )
register(
    "vgg11_lrn", VGG, family="vgg", input_size=224, aliases=("vgg_a_lrn",),
    stage_kernels=_CONFIGS["A"], lrn_after_first=True,
)
