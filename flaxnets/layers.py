"""Building blocks shared by several families: pooling as PyTorch defines it, LRN, and small modules."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxnets.conv import Conv, computed_once, strided_taps, target_platform
from flaxnets.norm import BatchNorm

ModuleFactory = Callable[..., nn.Module]

# Per-channel RGB statistics of ImageNet on the [0, 1] scale, as torchvision normalises.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# He (Kaiming) normal init, fan-out, as the ResNet paper and torchvision use.
he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, dtype: Any, epsilon: float = 1e-5, **kwargs: Any) -> ModuleFactory:
    """A BatchNorm factory with PyTorch's defaults (momentum 0.1 there is 0.9 here, eps 1e-5).

    In training mode it normalises with the batch statistics and updates ``batch_stats``;
    in eval mode it uses the running averages. The variance is computed in two passes,
    mean((x - mean)^2): the one-pass E[x^2] - E[x]^2 cancels catastrophically in float32 when the
    mean is large next to the spread, which also made results depend on the device count.
    The module is :class:`flaxnets.norm.BatchNorm`: flax's variables and results, a cheaper gradient.
    """
    return functools.partial(BatchNorm, use_running_average=not train, momentum=0.9, epsilon=epsilon,
                             dtype=dtype, **kwargs)


def bias_free_conv(dtype: Any, param_dtype: Any) -> ModuleFactory:
    """A :data:`Conv` factory for convs followed by BatchNorm: no bias, He (fan-out) init."""
    return functools.partial(Conv, use_bias=False, kernel_init=he_normal, dtype=dtype, param_dtype=param_dtype)


def window_output_size(size: int, window: int, stride: int = 1, pad: int = 0, ceil_mode: bool = False) -> int:
    """Output side of a conv or pool over ``size`` pixels, as PyTorch counts it; < 1 when the window does not fit."""
    span = size + 2 * pad - window
    out = (math.ceil(span / stride) if ceil_mode else span // stride) + 1
    # PyTorch drops a last window that would start inside the right padding.
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _pool_padding(size: int, window: int, stride: int, pad: int, ceil_mode: bool) -> tuple[int, int]:
    """Left/right padding that reproduces PyTorch's output size, ceil_mode included."""
    out = window_output_size(size, window, stride, pad, ceil_mode)
    return pad, max(0, (out - 1) * stride + window - size - pad)


class Window(NamedTuple):
    """One size-changing conv or pool of a model's spatial path, for :func:`smallest_input`.

    ``branch`` marks a window on a side branch (GoogLeNet's auxiliary heads): it must fit, but
    the main path keeps its size.
    """

    size: int
    stride: int = 1
    padding: int = 0
    ceil_mode: bool = False
    branch: bool = False


@functools.cache
def smallest_input(windows: tuple[Window, ...]) -> int:
    """The smallest square side whose feature map every window of ``windows`` (in order) fits."""

    def fits(size: int) -> bool:
        for w in windows:
            out = window_output_size(size, w.size, w.stride, w.padding, w.ceil_mode)
            if out < 1:
                return False
            size = size if w.branch else out
        return True

    size = 1
    while not fits(size):
        size += 1
    return size


def check_images(x: Any, model: nn.Module, **mode: bool) -> None:
    """Raises a one-line error unless ``x`` is an NHWC float batch of RGB images ``model`` can take.

    Every family calls it first thing in ``__call__``. Shapes and dtypes are static, so it runs
    while tracing and costs nothing in a compiled function. ``model`` provides
    ``min_input_size(train=..., dense=...) -> (pixels, why)``; ``mode`` is passed on to it.
    """
    name = type(model).__name__
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"{name} expects an NHWC float array of images; got {type(x).__name__}")
    shape = tuple(shape)
    if len(shape) != 4:
        hint = "; for one image add a batch axis: x[None]" if len(shape) == 3 else ""
        raise ValueError(f"{name} expects a batch of images of shape (batch, height, width, 3); "
                         f"got rank {len(shape)}, shape {shape}{hint}")
    if shape[-1] != 3:
        if shape[1] == 3:
            raise ValueError(f"{name} expects NHWC images (channels last); shape {shape} looks like NCHW: "
                             "transpose to NHWC with x.transpose(0, 2, 3, 1)")
        hint = "; for grayscale repeat the channel: jnp.repeat(x, 3, axis=-1)" if shape[-1] == 1 else ""
        raise ValueError(f"{name} expects 3 colour channels last (NHWC); got shape {shape}{hint}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} expects float images, normalised as in training; got {jnp.dtype(dtype).name}: "
                        "convert and normalise first, e.g. (x / 255 - IMAGENET_MEAN) / IMAGENET_STD (flaxnets.layers)")
    least, why = model.min_input_size(**mode)
    if min(shape[1:3]) < least:
        raise ValueError(f"{name} needs images of at least {least} px ({why}); got {shape[1]}x{shape[2]}")


def max_pool(
    x: jax.Array, window: int, stride: int, padding: int = 0, ceil_mode: bool = False
) -> jax.Array:
    """Max pooling over H and W of an NHWC array, with ``torch.nn.MaxPool2d`` semantics.

    Padding never wins the max (it is -inf), and ``ceil_mode=True`` keeps a partial last window.
    Computed as the elementwise maximum of the window's ``window**2`` strided slices: the same
    values as ``reduce_window``, where XLA:CPU expands ``reduce_window``'s gradient into a scatter
    about 10x slower. On the CPU the gradient goes, as in PyTorch, to the first maximum of each
    window, found in the forward pass; elsewhere it is autodiff's, which splits exact ties between
    the tied inputs (after a ReLU those are zeros, whose gradient is zero anyway).
    """
    pads = tuple(_pool_padding(x.shape[axis], window, stride, padding, ceil_mode) for axis in (1, 2))
    if target_platform() == "cpu":
        return _max_pool_to_first_max(x, window, stride, pads, x.shape[1:3])
    return functools.reduce(jnp.maximum, _pool_views(x, window, stride, pads))


def _pool_views(x: jax.Array, window: int, stride: int, pads) -> list[jax.Array]:
    return [view for _, _, view in strided_taps(x, (window, window), (stride, stride), pads, -jnp.inf)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool_to_first_max(x, window, stride, pads, input_hw):
    return functools.reduce(jnp.maximum, _pool_views(x, window, stride, pads))


def _max_pool_to_first_max_forward(x, window, stride, pads, input_hw):
    views = _pool_views(x, window, stride, pads)
    best, first = views[0], jnp.zeros(views[0].shape, jnp.int8 if window * window < 128 else jnp.int32)
    for tap, view in enumerate(views[1:], 1):
        larger = view > best
        best, first = jnp.where(larger, view, best), jnp.where(larger, jnp.asarray(tap, first.dtype), first)
    return functools.reduce(jnp.maximum, views), first


def _max_pool_to_first_max_backward(window, stride, pads, input_hw, first, grad):
    # Each input pixel reads the gradient of up to window**2 outputs; XLA:CPU would fuse the
    # gradient's whole computation into those reads (DenseNet-121: its first block's seven
    # BatchNorm gradients, summed, 2-4 times a pixel: 42 ms of a 615 ms step at 112 px, batch 16).
    scatter = functools.partial(_scatter_to_first_max, window, stride, pads, input_hw)
    return (computed_once(scatter, first, grad),)


def _scatter_to_first_max(window, stride, pads, input_hw, first, grad):
    (height, width), (out_h, out_w) = input_hw, grad.shape[1:3]
    zero = jnp.zeros((), grad.dtype)
    total = None
    for tap in range(window * window):
        row, col = divmod(tap, window)
        part = jnp.where(first == tap, grad, zero)
        # Scatter the window position's outputs back to the input pixels they came from (negative
        # padding crops what fell on the pool's own padding).
        low_h, low_w = row - pads[0][0], col - pads[1][0]
        part = jax.lax.pad(part, zero, ((0, 0, 0), (low_h, height - low_h - (out_h - 1) * stride - 1, stride - 1),
                                        (low_w, width - low_w - (out_w - 1) * stride - 1, stride - 1), (0, 0, 0)))
        total = part if total is None else total + part
    return total


_max_pool_to_first_max.defvjp(_max_pool_to_first_max_forward, _max_pool_to_first_max_backward)


def avg_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
    """Average pooling over H and W (``torch.nn.AvgPool2d`` with ``count_include_pad=True``)."""
    pads = ((padding, padding), (padding, padding))
    return nn.avg_pool(x, (window, window), (stride, stride), padding=pads, count_include_pad=True)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over H and W: (N, H, W, C) -> (N, C), accumulated in float32."""
    return jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(x.dtype)


def adaptive_avg_pool(x: jax.Array, output_size: int) -> jax.Array:
    """``torch.nn.AdaptiveAvgPool2d``: averages H and W into ``output_size`` bins each.

    Bin i covers ``[floor(i * L / o), ceil((i + 1) * L / o))``, so a 1x1 input is replicated and
    an input of exactly ``output_size`` is returned unchanged.
    """
    height, width = x.shape[1:3]
    if (height, width) == (output_size, output_size):
        return x

    def bins(length: int) -> list[tuple[int, int]]:
        return [
            (i * length // output_size, -(-(i + 1) * length // output_size))
            for i in range(output_size)
        ]

    rows = [jnp.mean(x[:, a:b], axis=1, keepdims=True) for a, b in bins(height)]
    x = jnp.concatenate(rows, axis=1)
    cols = [jnp.mean(x[:, :, a:b], axis=2, keepdims=True) for a, b in bins(width)]
    return jnp.concatenate(cols, axis=2)


def local_response_norm(
    x: jax.Array, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0
) -> jax.Array:
    """Local response normalisation across channels, as the AlexNet paper writes it.

    ``b_c = a_c / (k + alpha * sum_{|j - c| <= size // 2} a_j ** 2) ** beta``. Note that alpha is
    not divided by ``size``: ``torch.nn.LocalResponseNorm(size, alpha * size, beta, k)`` is the same
    function. Computed in float32 whatever the input dtype.
    """
    x32 = x.astype(jnp.float32)
    half = size // 2
    sums = jax.lax.reduce_window(
        jnp.square(x32),
        0.0,
        jax.lax.add,
        window_dimensions=(1, 1, 1, size),
        window_strides=(1, 1, 1, 1),
        padding=((0, 0), (0, 0), (0, 0), (half, size - 1 - half)),
    )
    return (x32 / (k + alpha * sums) ** beta).astype(x.dtype)


class ConvNormAct(nn.Module):
    """Convolution, optional normalisation, optional ReLU: the unit most CNNs repeat.

    Attributes:
      features: output channels.
      kernel_size: square kernel size.
      conv: a :data:`Conv` factory (dtype, init and bias already bound).
      norm: a normalisation factory, or None for a plain conv (+ bias from ``conv``).
      strides: conv stride.
      padding: symmetric zero padding in pixels (PyTorch convention).
      groups: feature groups (grouped / depthwise conv).
      relu: whether to end with a ReLU.
    """

    features: int
    kernel_size: int
    conv: ModuleFactory
    norm: ModuleFactory | None = None
    strides: int = 1
    padding: int = 0
    groups: int = 1
    relu: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=self.strides,
            padding=((self.padding, self.padding), (self.padding, self.padding)),
            feature_group_count=self.groups,
            name="conv",
        )(x)
        if self.norm is not None:
            x = self.norm(name="bn")(x)
        return nn.relu(x) if self.relu else x


# XLA:CPU (YNNPACK, jax 0.10) runs a product of a few rows by a large kernel far below the memory
# bandwidth that bounds it: VGG's first FC layer (25088 -> 4096) at batch 16 takes 71 ms, where one
# row takes 15 ms. With the rows transposed first, in a copy XLA cannot fold back into the product,
# YNNPACK declines the product and Eigen runs it: 45 ms (34 vs 45 ms at 8 rows, 63 vs 78 ms at 64,
# 3.0 vs 5.0 ms for 4096 -> 4096 at 16; from 256 rows 1.1x slower). VGG-16 at batch 16 on a 2-core
# AVX-512 Xeon, 2026-12-04: inference 1.13x (452 -> 403 ms), training step even.
FEW_ROWS_MATMUL_MAX_ROWS = 64
FEW_ROWS_MATMUL_MIN_KERNEL = 1 << 24  # elements: 4096 x 4096 and up


def _fully_connected_product(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` for (N, in) inputs, through Eigen on the CPU where few rows meet a large kernel."""
    if (target_platform() == "cpu" and x.shape[0] <= FEW_ROWS_MATMUL_MAX_ROWS
            and kernel.size >= FEW_ROWS_MATMUL_MIN_KERNEL and x.dtype == kernel.dtype == jnp.float32):
        return jax.lax.dot_general(computed_once(jnp.transpose, x), kernel, (((0,), (0,)), ((), ())))
    return x @ kernel


class FullyConnected(nn.Module):
    """A fully connected layer that can also slide over a feature map, for VGG's dense evaluation.

    Its parameters are those of ``nn.Dense`` (``kernel`` of shape (in, out), ``bias``). On (N, in)
    inputs it is ``nn.Dense``. On an NHWC feature map it is the equivalent VALID convolution: the
    kernel read as (window, window, C, out), the order in which :func:`flatten` lays out a
    ``window`` x ``window`` map, so on a map of exactly that size both forms give the same numbers.

    Attributes:
      features: outputs.
      window: side of the feature map the flattened input came from (1 after another FC layer).
      kernel_init: weight initialiser.
      bias_init: bias initialiser.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    features: int
    window: int = 1
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1] if x.ndim == 2 else self.window * self.window * x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if x.ndim == 2:
            return _fully_connected_product(x, kernel) + bias
        if min(x.shape[1:3]) < self.window:
            raise ValueError(f"dense evaluation slides a {self.window}x{self.window} window over the feature map, "
                             f"but the map is {x.shape[1]}x{x.shape[2]}: use larger images")
        kernel = kernel.reshape(self.window, self.window, x.shape[-1], self.features)
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


class MLPHead(nn.Module):
    """AlexNet's and VGG's classifier: (FC -> ReLU -> dropout) per hidden width, then FC.

    Given flattened features it returns logits; given the NHWC feature map itself it applies the
    FC layers as convolutions (see :class:`FullyConnected`) and returns the class score map.

    Attributes:
      hidden: widths of the hidden FC layers, e.g. ``(4096, 4096)``.
      num_classes: output size.
      dropout_rate: dropout after each hidden layer (active only with ``train=True``).
      kernel_init: weight initialiser of every layer.
      window: side of the feature map that is flattened into the first layer (VGG 7, AlexNet 6).
      hidden_bias: constant initial bias of the hidden layers (AlexNet uses 1).
      dtype: compute dtype.
    """

    hidden: Sequence[int]
    num_classes: int
    dropout_rate: float
    kernel_init: Callable
    window: int = 1
    hidden_bias: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        dense = functools.partial(FullyConnected, dtype=self.dtype, kernel_init=self.kernel_init)
        for i, width in enumerate(self.hidden):
            window = self.window if i == 0 else 1
            x = dense(width, window, bias_init=nn.initializers.constant(self.hidden_bias), name=f"fc{i + 1}")(x)
            x = nn.relu(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return dense(self.num_classes, 1 if self.hidden else self.window, name=f"fc{len(self.hidden) + 1}")(x)


def flatten(x: jax.Array) -> jax.Array:
    """(N, ...) -> (N, prod(...)) in NHWC order."""
    return x.reshape(x.shape[0], -1)


def sow(module: nn.Module, collection: str, name: str, value: jax.Array) -> None:
    """``module.sow`` that records nothing during ``init``.

    So ``model.init`` returns only ``params`` (and ``batch_stats``), and a later
    ``apply(..., mutable=[collection])`` sees exactly one value per name.
    """
    if not module.is_initializing():
        module.sow(collection, name, value)
