"""AlexNet (Krizhevsky, Sutskever, Hinton 2012) and its later "one weird trick" form.

Variants:
  ``alexnet``         the paper: widths 96-256-384-384-256, LRN after conv1/conv2, input 227.
  ``alexnet_2tower``  the paper's two-GPU layout: conv2, conv4, conv5 grouped in 2.
  ``alexnet_owt``     Krizhevsky 2014 (torchvision's pretrained form): widths 64-192-384-256-256,
                      no LRN, input 224.

Intermediate features (see :func:`flaxnets.extract_features`): ``stage1`` ... ``stage5``, the
output of conv1 ... conv5 after activation, LRN and pooling, and ``pre_logits``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxnets.layers import (
    Conv,
    MLPHead,
    Window,
    adaptive_avg_pool,
    check_images,
    flatten,
    local_response_norm,
    max_pool,
    smallest_input,
    sow,
)
from flaxnets.registry import register

# The paper's init: weights N(0, 0.01); biases 1 in conv2, conv4, conv5 and the hidden FC layers
# (to feed the ReLUs positive inputs early on), 0 elsewhere.
_WEIGHT_INIT = nn.initializers.normal(0.01)
_BIAS_ONE_LAYERS = frozenset({2, 4, 5})


class AlexNet(nn.Module):
    """AlexNet on NHWC images; returns float32 logits.

    Attributes:
      widths: output channels of the five convs.
      groups: feature groups of each conv (2 = two towers).
      stem_padding: zero padding of conv1 (0 in the paper at 227 px, 2 in the 224 px form).
      lrn: local response normalisation after conv1 and conv2 (the paper).
      num_classes: classifier outputs.
      dropout_rate: dropout of the two hidden FC layers (paper: 0.5).
      dtype: compute dtype; parameters are ``param_dtype``.
      param_dtype: parameter dtype.
    """

    widths: tuple[int, int, int, int, int] = (96, 256, 384, 384, 256)
    groups: tuple[int, int, int, int, int] = (1, 1, 1, 1, 1)
    stem_padding: int = 0
    lrn: bool = True
    num_classes: int = 1000
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, dense: bool = False) -> jax.Array:
        """Logits of NHWC images; ``dense=True`` slides the FC layers over larger images (see VGG)."""
        check_images(x, self, dense=dense)
        conv = functools.partial(
            Conv, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_WEIGHT_INIT
        )
        kernels, strides = (11, 5, 3, 3, 3), (4, 1, 1, 1, 1)
        paddings = (self.stem_padding, 2, 1, 1, 1)
        x = x.astype(self.dtype)
        for i, (width, kernel, stride, pad, groups) in enumerate(
            zip(self.widths, kernels, strides, paddings, self.groups), start=1
        ):
            bias = nn.initializers.ones if i in _BIAS_ONE_LAYERS else nn.initializers.zeros
            x = conv(
                width,
                (kernel, kernel),
                strides=stride,
                padding=((pad, pad), (pad, pad)),
                feature_group_count=groups,
                bias_init=bias,
                name=f"conv{i}",
            )(x)
            x = nn.relu(x)
            if self.lrn and i <= 2:
                x = local_response_norm(x)
            if i in (1, 2, 5):
                x = max_pool(x, 3, 2)
            sow(self, "intermediates", f"stage{i}", x)
        head = MLPHead(
            hidden=(4096, 4096),
            num_classes=self.num_classes,
            dropout_rate=self.dropout_rate,
            kernel_init=_WEIGHT_INIT,
            window=6,
            hidden_bias=1.0,
            dtype=self.dtype,
            name="classifier",
        )
        if dense:
            return head(x, train).mean(axis=(1, 2)).astype(jnp.float32)
        x = flatten(adaptive_avg_pool(x, 6))
        sow(self, "intermediates", "pre_logits", x)
        return head(x, train).astype(jnp.float32)

    @nn.nowrap
    def min_input_size(self, train: bool = True, dense: bool = False) -> tuple[int, str]:
        """The smallest square input side, and why: the stem and three 3x3/2 max pools must fit (and
        in dense evaluation the first FC layer, slid as a 6x6 window over the last feature map)."""
        windows = (Window(11, 4, self.stem_padding), Window(3, 2), Window(3, 2), Window(3, 2))
        if dense:
            return smallest_input((*windows, Window(6))), "dense evaluation slides its FC layers as a 6x6 window"
        stem = "11x11/4 stem" if self.stem_padding else "unpadded 11x11/4 stem"
        return smallest_input(windows), f"its {stem} and three 3x3/2 max pools"


register("alexnet", AlexNet, family="alexnet", input_size=227)
register("alexnet_2tower", AlexNet, family="alexnet", input_size=227, groups=(1, 2, 1, 2, 2))
register(
    "alexnet_owt",
    AlexNet,
    family="alexnet",
    input_size=224,
    aliases=("alexnet_torchvision",),
    widths=(64, 192, 384, 256, 256),
    stem_padding=2,
    lrn=False,
)
