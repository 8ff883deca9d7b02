"""GoogLeNet / Inception v1 (Szegedy et al. 2014).

Variants:
  ``googlenet``     the paper: LRN in the stem, biased convs without BatchNorm, a true 5x5 branch,
                    two auxiliary classifiers (avgpool 5x5/3 -> conv 128 -> FC 1024 -> FC).
  ``googlenet_bn``  torchvision's layout (its pretrained weights): BatchNorm after every conv, no
                    LRN, a 3x3 kernel in the "5x5" branch, a 2x2 last pool, adaptive aux pooling.

Auxiliary logits: with ``aux_logits=True`` (the default) the auxiliary heads are built at init
and run only in training mode. ``__call__`` always returns the main logits; the auxiliary logits
are sown into the ``"aux_logits"`` collection, so ask for it to be mutable::

    logits, updates = model.apply(variables, x, train=True, rngs={"dropout": key},
                                  mutable=["batch_stats", "aux_logits"])
    aux1 = updates["aux_logits"]["aux1"]["logits"][0]
    aux2 = updates["aux_logits"]["aux2"]["logits"][0]

The paper adds their cross-entropy losses with weight 0.3; they are unused at inference.

Intermediate features (see :func:`flaxnets.extract_features`): ``stem`` (stride 8),
``inception3`` (8), ``inception4`` (16), ``inception5`` (32) and ``pre_logits``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxnets.layers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Conv,
    ConvNormAct,
    ModuleFactory,
    Window,
    adaptive_avg_pool,
    avg_pool,
    batch_norm,
    check_images,
    flatten,
    global_avg_pool,
    local_response_norm,
    max_pool,
    smallest_input,
    sow,
)
from flaxnets.registry import register

# (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj) per module, from the paper's Table 1.
_STAGE3 = ((64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64))
_STAGE4 = (
    (192, 96, 208, 16, 48, 64),
    (160, 112, 224, 24, 64, 64),
    (128, 128, 256, 24, 64, 64),
    (112, 144, 288, 32, 64, 64),
    (256, 160, 320, 32, 128, 128),
)
_STAGE5 = ((256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128))


class Inception(nn.Module):
    """One Inception module: 1x1, 1x1->3x3, 1x1->"5x5" and maxpool->1x1 branches, concatenated."""

    widths: tuple[int, int, int, int, int, int]
    block: ModuleFactory
    branch_kernel: int = 5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n1, r3, n3, r5, n5, proj = self.widths
        b1 = self.block(n1, 1, name="branch1")(x)
        b2 = self.block(r3, 1, name="branch2_reduce")(x)
        b2 = self.block(n3, 3, padding=1, name="branch2")(b2)
        b3 = self.block(r5, 1, name="branch3_reduce")(x)
        k = self.branch_kernel
        b3 = self.block(n5, k, padding=k // 2, name="branch3")(b3)
        b4 = max_pool(x, 3, 1, padding=1, ceil_mode=True)
        b4 = self.block(proj, 1, name="branch4")(b4)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class AuxHead(nn.Module):
    """Auxiliary classifier: avgpool to 4x4 -> conv 128@1x1 -> FC 1024 -> ReLU -> dropout -> FC."""

    num_classes: int
    block: ModuleFactory
    dropout_rate: float
    pool_window: int | None
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.pool_window is not None:
            if min(x.shape[1:3]) < self.pool_window:
                raise ValueError(
                    f"the paper's auxiliary head pools {self.pool_window}x{self.pool_window} but its input is "
                    f"{x.shape[1]}x{x.shape[2]}: use inputs of at least {16 * self.pool_window} px, "
                    "or aux_logits=False, or aux_pool_window=None (adaptive pooling)"
                )
            x = avg_pool(x, self.pool_window, 3)
        # A no-op at 224 px after the paper's pool; keeps the FC input 4x4 at other sizes.
        x = adaptive_avg_pool(x, 4)
        x = flatten(self.block(128, 1, name="conv")(x))
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.relu(dense(1024, name="fc1")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = dense(self.num_classes, name="fc2")(x).astype(jnp.float32)
        sow(self, "aux_logits", "logits", logits)
        return logits


class GoogLeNet(nn.Module):
    """GoogLeNet on NHWC images; returns float32 logits (auxiliary ones are sown, see module doc).

    Attributes:
      batch_norm: BatchNorm after every conv (convs then have no bias).
      lrn: the paper's LRN after the first pool and after conv3 of the stem.
      branch_kernel: kernel of the "5x5" branch (5 in the paper, 3 in torchvision).
      pool4_window: window of the max pool before stage 5 (3 in the paper, 2 in torchvision).
      aux_pool_window: aux-head average pool window with stride 3 (paper: 5), or None for
        torchvision's adaptive pool to 4x4.
      aux_logits: build the auxiliary classifiers (run in training mode only).
      bn_epsilon: BatchNorm epsilon (torchvision's GoogLeNet uses 1e-3).
      transform_input: re-normalise ImageNet-mean/std-normalised input to the [-1, 1] scaling
        that torchvision's pretrained GoogLeNet weights expect (its ``transform_input``).
      num_classes: classifier outputs.
      dropout_rate: dropout before the final FC (paper: 0.4).
      aux_dropout_rate: dropout in the auxiliary heads (paper: 0.7).
      dtype: compute dtype; parameters are ``param_dtype``.
      param_dtype: parameter dtype.
      frozen_bn: BatchNorm normalises with its running statistics and leaves them unchanged even
        when ``train`` is True (fine-tuning with frozen statistics); dropout still follows ``train``.
    """

    batch_norm: bool = False
    lrn: bool = True
    branch_kernel: int = 5
    pool4_window: int = 3
    aux_pool_window: int | None = 5
    aux_logits: bool = True
    bn_epsilon: float = 1e-3
    transform_input: bool = False
    num_classes: int = 1000
    dropout_rate: float = 0.4
    aux_dropout_rate: float = 0.7
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    frozen_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_images(x, self, train=train or self.is_initializing())
        if self.batch_norm:
            # He init: the BN layers take care of the scale.
            conv = functools.partial(
                Conv, use_bias=False, kernel_init=nn.initializers.he_normal(),
                dtype=self.dtype, param_dtype=self.param_dtype,
            )
            norm = batch_norm(train and not self.frozen_bn, self.dtype, epsilon=self.bn_epsilon, param_dtype=self.param_dtype)
        else:
            # Without BN a 22-layer plain net needs a scale-aware init: Xavier with bias 0.2, as in
            # the BVLC reproduction of the paper.
            conv = functools.partial(
                Conv, kernel_init=nn.initializers.xavier_uniform(),
                bias_init=nn.initializers.constant(0.2),
                dtype=self.dtype, param_dtype=self.param_dtype,
            )
            norm = None
        block = functools.partial(ConvNormAct, conv=conv, norm=norm)
        inception = functools.partial(Inception, block=block, branch_kernel=self.branch_kernel)
        aux_head = functools.partial(
            AuxHead, num_classes=self.num_classes, block=block,
            dropout_rate=self.aux_dropout_rate, pool_window=self.aux_pool_window,
            dtype=self.dtype, param_dtype=self.param_dtype,
        )
        run_aux = self.aux_logits and (train or self.is_initializing())

        if self.transform_input:
            mean, std = jnp.array(IMAGENET_MEAN), jnp.array(IMAGENET_STD)
            x = x * (std / 0.5) + (mean - 0.5) / 0.5
        x = x.astype(self.dtype)
        x = block(64, 7, strides=2, padding=3, name="conv1")(x)
        x = max_pool(x, 3, 2, ceil_mode=True)
        if self.lrn:
            x = local_response_norm(x)
        x = block(64, 1, name="conv2")(x)
        x = block(192, 3, padding=1, name="conv3")(x)
        if self.lrn:
            x = local_response_norm(x)
        x = max_pool(x, 3, 2, ceil_mode=True)
        sow(self, "intermediates", "stem", x)

        for widths, name in zip(_STAGE3, ("inception3a", "inception3b")):
            x = inception(widths, name=name)(x)
        sow(self, "intermediates", "inception3", x)
        x = max_pool(x, 3, 2, ceil_mode=True)

        for widths, name in zip(_STAGE4, ("inception4a", "inception4b", "inception4c", "inception4d", "inception4e")):
            x = inception(widths, name=name)(x)
            if run_aux and name in ("inception4a", "inception4d"):
                aux_name = "aux1" if name == "inception4a" else "aux2"
                aux_head(name=aux_name)(x, train)
        sow(self, "intermediates", "inception4", x)
        x = max_pool(x, self.pool4_window, 2, ceil_mode=True)

        for widths, name in zip(_STAGE5, ("inception5a", "inception5b")):
            x = inception(widths, name=name)(x)
        sow(self, "intermediates", "inception5", x)

        x = global_avg_pool(x)
        sow(self, "intermediates", "pre_logits", x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(x)
        return x.astype(jnp.float32)

    @nn.nowrap
    def min_input_size(self, train: bool = True, dense: bool = False) -> tuple[int, str]:
        """The smallest square input side, and why; in training (and init) the auxiliary heads' pools must fit."""
        stride16 = (Window(7, 2, 3), *[Window(3, 2, ceil_mode=True)] * 3)
        aux = ()
        if train and self.aux_logits and self.aux_pool_window is not None:
            aux = (Window(self.aux_pool_window, 3, branch=True),)
        windows = (*stride16, *aux, Window(self.pool4_window, 2, ceil_mode=True))
        if aux:
            return smallest_input(windows), (f"its auxiliary heads pool {self.aux_pool_window}x{self.aux_pool_window} "
                                             "at stride 16; aux_logits=False lifts this")
        return smallest_input(windows), "its unpadded 3x3/2 max pools"


register("googlenet", GoogLeNet, family="googlenet", input_size=224, aliases=("inception_v1",))
register(
    "googlenet_bn",
    GoogLeNet,
    family="googlenet",
    input_size=224,
    aliases=("googlenet_torchvision",),
    batch_norm=True,
    lrn=False,
    branch_kernel=3,
    pool4_window=2,
    aux_pool_window=None,
)
