"""``Conv``: ``nn.Conv`` with the same parameters and results, rewritten where XLA:CPU is slow.

XLA:CPU runs some convolutions far below what the hardware allows: 1x1 convolutions (3x slower
forward and backward than the same matrix product), 3x3 ones with many channels (1.3x slower at
the median than Winograd's F(2x2, 3x3) as batched matmuls), some kernel gradients (up to 1.7x
slower than matmuls over the patches), grouped convolutions (the gradient about 30x slower than
the forward pass) and depthwise ones (10-40x slower than a fused elementwise loop).
:func:`conv_general_dilated` routes those to equivalent formulations on the CPU; every model
builds its convolutions from :data:`Conv`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxnets.winograd import winograd_conv3x3

# The platform convolutions are rewritten for while tracing; None: JAX's default backend.
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("flaxnets_conv_platform", default=None)


@contextlib.contextmanager
def rewrites_for(platform: str) -> Iterator[None]:
    """Within this block, convolutions are traced as they would be on ``platform`` (``cpu``, ``gpu``
    or ``tpu``) instead of JAX's default backend: for compiling, on a CPU, for hardware that is not
    attached (``python -m train --plan``)."""
    if platform not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"platform must be cpu, gpu or tpu; got {platform!r}")
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def target_platform() -> str:
    """The platform the convolutions being traced are for: :func:`rewrites_for`'s, else JAX's default backend."""
    return _TARGET_PLATFORM.get() or jax.default_backend()


# Where unpadded 1x1 convolutions are traced as matrix products. XLA:CPU runs them 3x faster so;
# XLA:TPU and XLA:GPU compile both forms to the same matrix units (see the README's compiled
# comparison, benchmarks/plan_conv_paths.py).
MATMUL_1X1_PLATFORMS = frozenset({"cpu"})

# Where XLA:CPU runs a 3x3 stride-1 float32 convolution as F(2x2, 3x3) Winograd. Measured forward
# and backward at ResNet-50's 3x3 shapes, batch 16 (2-core AVX-512 EPYC, 2026-12-01): 28x28x64
# 1.3x forward, 1.04x forward+backward; 14x14x128 1.0x, 1.25x; 7x7x256 0.8x, 1.3x; at 4x4x512 the
# kernel's transform makes the forward pass 0.8x (on the AVX2 machine of 2026-11-24), hence a
# least output size.
WINOGRAD_MIN_SIZE = 6
# Where the Winograd convolutions run as F(4x4, 3x3) (36 products per 16 outputs, against F(2x2, 3x3)'s
# 16 per 4), by output size and multiply-adds. Measured against F(2x2, 3x3), batch 16, 2-core Intel
# Xeon, 2026-12-04, forward / forward and backward (ms): VGG-16's 112x112x64 103 -> 71 / 481 -> 303,
# 56x56x128 69 -> 39 / 252 -> 169, 28x28x256 45 -> 28 / 163 -> 113, 14x14x512 32 -> 38 / 121 -> 109,
# 7x7x512 11 -> 22 / 40 -> 52; ResNet-50's 28x28x64 3.8 -> 4.6 / 26.6 -> 15.6, 14x14x128 3.1 -> 3.9 /
# 13.3 -> 13.2, 7x7x256 4.0 -> 5.5 / 11.3 -> 15.4. Its products are fewer but smaller, so the forward
# pass gains only on large convolutions; differentiated, from 14 pixels a side.
WINOGRAD_F4_MIN_SIZE = 28
WINOGRAD_F4_MIN_MACS = 1_000_000_000
WINOGRAD_F4_MIN_SIZE_UNDER_GRADIENT = 14
# Each rewritten convolution (Winograd, or the patch-matmul kernel gradient) costs XLA:CPU 0.5-1 s
# more to compile. Below 100 M multiply-adds a convolution takes a few milliseconds a step, so the
# rewrite would take hundreds of steps to pay for itself (and the test suite, which compiles dozens
# of small models, would pay only the cost); such convolutions stay direct.
REWRITE_MIN_MACS = 100_000_000
# Since XLA:CPU runs its own convolutions through YNNPACK (jax 0.10), both rewrites lose where the
# channels are few. Measured forward and backward, batch 16, 2-core AVX-512 EPYC, 2026-12-01:
# VGG's RGB 3x3 at 112 px (3 -> 64) 21 ms direct vs 95 ms as Winograd; DenseNet's 3x3 at 28 px
# (128 -> 32) 21 vs 47 ms; the RGB 7x7/2 stems' kernel gradient 13.5 vs 35 ms as a patch matmul,
# GoogLeNet's 5x5 (16 -> 32) 6.6 vs 16 ms. From 64 channels in and out Winograd still gains
# (ResNet-50's 14x14x128: 8.3 vs 10.3 ms; VGG's 28x28x256: 209 vs 233 ms) and the patch gradient
# is even or better (GoogLeNet's 56 px 64 -> 192: 204 vs 344 ms).
REWRITE_MIN_CHANNELS = 64
# Winograd also gains from 32 input channels where the outputs are wide. Measured forward and
# backward, batch 16, 2-core AVX-512 EPYC, 2026-12-03: Xception's second stem convolution (32 -> 64,
# 55 px in, VALID) 32.5 vs 43.8 ms direct, at 224 px 160 vs 299 ms; GoogLeNet's 32 -> 96 at 28 px
# 17.5 vs 18.3 ms. With 32 outputs it still loses (DenseNet's 128 -> 32: 24.1 vs 20.5 ms).
WINOGRAD_MIN_CHANNELS_IN = 32

_NHWC = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _direct_conv(x, kernel, strides, padding):
    """XLA's own ungrouped NHWC convolution."""
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


def _tap_windows(padded: jax.Array, kernel_hw: tuple[int, int], strides, axes=(1, 2)):
    """[(i, j, view)]: the strided window of an already padded array that kernel tap (i, j) sees,
    ``axes`` its two spatial axes."""
    (kh, kw), (sh, sw), (ah, aw) = kernel_hw, strides, axes
    out_h, out_w = (padded.shape[ah] - kh) // sh + 1, (padded.shape[aw] - kw) // sw + 1
    strides_all = [1] * padded.ndim
    strides_all[ah], strides_all[aw] = sh, sw

    def window(i, j):  # one strided slice over both spatial axes
        start, limit = [0] * padded.ndim, list(padded.shape)
        start[ah], limit[ah] = i, i + (out_h - 1) * sh + 1
        start[aw], limit[aw] = j, j + (out_w - 1) * sw + 1
        return jax.lax.slice(padded, start, limit, strides_all)

    return [(i, j, window(i, j)) for i in range(kh) for j in range(kw)]


def strided_taps(x: jax.Array, kernel_hw: tuple[int, int], strides, padding, pad_value: float = 0.0):
    """The strided views of the padded NHWC input that each kernel tap (i, j) sees:
    [(i, j, view)], each view (N, H', W', C). ``padding`` is ((top, bottom), (left, right))."""
    if any(p != (0, 0) for p in padding):
        x = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=pad_value)
    return _tap_windows(x, kernel_hw, strides)


def image_patches(x: jax.Array, kernel_hw: tuple[int, int], strides, padding) -> jax.Array:
    """The input under every kernel tap, stacked: (N, H', W', kh * kw, C)."""
    return jnp.stack([view for _, _, view in strided_taps(x, kernel_hw, strides, padding)], axis=3)


def _grouped_conv_as_matmuls(x: jax.Array, kernel: jax.Array, strides, padding, groups: int) -> jax.Array:
    """A grouped NHWC convolution written as patches times a per-group kernel (a batched matmul)."""
    kh, kw, _, features = kernel.shape
    patches = image_patches(x, (kh, kw), strides, padding)
    n, out_h, out_w, _, channels = patches.shape
    patches = patches.reshape(n, out_h, out_w, kh * kw, groups, -1)
    kernel = kernel.reshape(kh * kw, channels // groups, groups, features // groups)
    return jnp.einsum("nhwkgc,kcgd->nhwgd", patches, kernel).reshape(n, out_h, out_w, features)


def _summed_products(x: jax.Array, kernel: jax.Array, strides, padding, groups: int) -> jax.Array:
    kh, kw, per_group, features = kernel.shape
    per_out = features // groups
    kernel = kernel.reshape(kh, kw, per_group, groups, per_out)
    out = None
    for i, j, view in strided_taps(x, (kh, kw), strides, padding):
        view = view.reshape(*view.shape[:3], groups, per_group)
        for c in range(per_group):
            term = view[..., c:c + 1] * kernel[i, j, c]
            out = term if out is None else out + term
    return out.reshape(*out.shape[:3], features)


def computed_once(compute, *operands: jax.Array) -> jax.Array:
    """``compute(*operands)``, computed once however many loops read its result, from operands
    computed once (the last one floating-point).

    XLA:CPU copies a fusion of cheap elementwise operations into every loop that reads its result:
    summed products after a convolution were computed again in each BatchNorm, ReLU and gradient
    loop that followed (five times in a ResNeXt-50 training step). It never copies a conditional;
    the predicate is one XLA cannot fold (false only for a NaN), and both branches compute the
    same. (Under ``jax.vmap`` over the operands the conditional becomes a select and both run.)
    """
    first = operands[-1].reshape(-1)[0]
    return jax.lax.cond(first == first, compute, compute, *operands)


def _grouped_conv_as_sums(x: jax.Array, kernel: jax.Array, strides, padding, groups: int) -> jax.Array:
    """A grouped NHWC convolution with few channels per group (depthwise: one) as a sum of
    per-tap, per-channel broadcast products, which XLA fuses into one elementwise loop (36-72
    products an output for ResNeXt-50's 4 and 8 channels a group), :func:`computed_once`."""
    compute = functools.partial(_summed_products, strides=strides, padding=padding, groups=groups)
    return computed_once(compute, x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_conv(x, kernel, strides, padding):
    """A depthwise NHWC convolution (one input and one output channel a group) as summed products."""
    return _grouped_conv_as_sums(x, kernel, strides, padding, x.shape[-1])


def _depthwise_conv_forward(x, kernel, strides, padding):
    return _depthwise_conv(x, kernel, strides, padding), (x, kernel)


def _depthwise_conv_backward(strides, padding, residuals, grad):
    x, kernel = residuals
    (grad_x,) = jax.vjp(lambda x: _grouped_conv_as_sums(x, kernel, strides, padding, x.shape[-1]), x)[1](grad)
    taps = strided_taps(x, kernel.shape[:2], strides, padding)
    grad_kernel = jnp.stack([jnp.sum(view * grad, axis=(0, 1, 2)) for _, _, view in taps])
    return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


# Autodiff of the sums keeps every tap's shifted input from the forward pass and reduces each
# kernel tap's gradient over a (N, H, W, C, 1) product; the kernel gradient as one plain channel
# sum per tap, the taps taken again from the input, runs the depthwise convolution's forward and
# backward passes 1.25-1.4x faster at Xception's shapes (batch 16, 2-core AVX-512 EPYC, 2026-12-03:
# 53x53x128 87 vs 109 ms, 27x27x256 53 vs 67 ms, 7x7x728 7.1 vs 9.8 ms).
_depthwise_conv.defvjp(_depthwise_conv_forward, _depthwise_conv_backward)


def _group_batched_taps(x: jax.Array, kernel: jax.Array, strides, padding, groups: int) -> jax.Array:
    kh, kw, per_group, features = kernel.shape
    padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    n, height, width, _ = padded.shape
    by_group = padded.reshape(n, height, width, groups, per_group).transpose(3, 0, 1, 2, 4)
    kernel = kernel.reshape(kh, kw, per_group, groups, features // groups)
    out = None
    for i, j, view in _tap_windows(by_group, (kh, kw), strides, axes=(2, 3)):
        term = jnp.einsum("gnhwc,cgo->gnhwo", view, kernel[i, j])
        out = term if out is None else out + term
    _, _, out_h, out_w, _ = out.shape
    return out.transpose(1, 2, 3, 0, 4).reshape(n, out_h, out_w, features)


def _grouped_conv_as_tap_matmuls(x: jax.Array, kernel: jax.Array, strides, padding, groups: int) -> jax.Array:
    """A grouped NHWC convolution as one group-batched matmul per tap on a group-major copy of the
    input, summed (:func:`computed_once`)."""
    return computed_once(functools.partial(_group_batched_taps, strides=strides, padding=padding, groups=groups),
                         x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _grouped_conv(x, kernel, strides, padding, groups):
    if kernel.shape[2] <= _MAX_SUMMED_CHANNELS:
        return _grouped_conv_as_sums(x, kernel, strides, padding, groups)
    return _grouped_conv_as_tap_matmuls(x, kernel, strides, padding, groups)


def _grouped_conv_forward(x, kernel, strides, padding, groups):
    return _grouped_conv(x, kernel, strides, padding, groups), (x, kernel)


def _grouped_conv_backward(strides, padding, groups, residuals, grad):
    x, kernel = residuals
    kh, kw, per_group, features = kernel.shape
    per_out = features // groups
    if (strides == (1, 1) and per_out <= _MAX_SUMMED_CHANNELS
            and all(0 <= p <= k - 1 for (lo_hi, k) in zip(padding, (kh, kw)) for p in lo_hi)):
        # The input gradient of a stride-1 convolution is the convolution of the output gradient
        # with the flipped kernel, input and output channels swapped within each group.
        flipped = kernel.reshape(kh, kw, per_group, groups, per_out)[::-1, ::-1].transpose(0, 1, 4, 3, 2)
        grad_x = _grouped_conv_as_sums(grad, flipped.reshape(kh, kw, per_out, groups * per_group), (1, 1),
                                       tuple((k - 1 - lo, k - 1 - hi) for (lo, hi), k in zip(padding, (kh, kw))),
                                       groups)
    else:
        (grad_x,) = jax.vjp(lambda x: _grouped_conv_as_matmuls(x, kernel, strides, padding, groups), x)[1](grad)
    taps = strided_taps(x, (kh, kw), strides, padding)
    if per_group <= _DENSE_KERNEL_GRADIENT_MAX_CHANNELS:
        grad_kernel = jnp.stack([_block_diagonal_product(view, grad, groups) for _, _, view in taps])
    else:
        grad = grad.reshape(*grad.shape[:3], groups, per_out)
        grad_kernel = jnp.stack([jnp.einsum("nhwgi,nhwgo->igo", view.reshape(*view.shape[:3], groups, per_group), grad)
                                 for _, _, view in taps])
    return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


def _block_diagonal_product(view: jax.Array, grad: jax.Array, groups: int) -> jax.Array:
    """(C / groups, groups, O / groups): each group's view-by-gradient product, the diagonal blocks
    of the dense product of all channels, which reads both operands as they lie."""
    full = jax.lax.dot_general(view.reshape(-1, view.shape[-1]), grad.reshape(-1, grad.shape[-1]),
                               (((0,), (0,)), ((), ())))
    blocks = full.reshape(groups, view.shape[-1] // groups, groups, grad.shape[-1] // groups)
    return jnp.moveaxis(jnp.diagonal(blocks, axis1=0, axis2=2), -1, 1)


# XLA:CPU runs the gradient of a grouped convolution (ResNeXt's 32 groups) about 30x slower than
# the forward pass. The forward pass: with few channels per group (<= _MAX_SUMMED_CHANNELS) sums of
# products, 3-10x faster than XLA's convolution there; with more, the per-tap matmuls on a
# group-major copy, 1.17-1.24x faster than XLA's (YNNPACK's) grouped convolution at ResNeXt-50's
# 16 and 32 channels a group (7x7x512: 3.7 vs 4.3 ms with BatchNorm-ReLU around it, batch 16,
# 2-core AVX-512 Xeon, 2026-12-04; ResNeXt-50 inference 1.06x, its training step even; without
# computed_once the training step was 1.25x slower). The backward pass:
# the kernel gradient as one group-batched product per tap, the input gradient of stride-1 ones
# with few channels a group as the sums of the flipped kernel, the others through the
# patches-times-kernel form. Against the matmul form's whole gradient (the form before 12-03),
# batch 16, 2-core AVX-512 EPYC: 67 -> 35 ms at 28x28x128 (4 a group), 37 -> 22 ms at 14x14x256,
# 12 -> 7.5 ms at 7x7x512, 42 -> 36 ms strided at 28x28x256. Depthwise convolutions (1 channel
# per group) have their own gradient (above). With at most _DENSE_KERNEL_GRADIENT_MAX_CHANNELS a
# group the kernel gradient is the dense product of all channels instead, its diagonal blocks kept:
# 32x the multiply-adds at ResNeXt's 4 a group, but no group-major copies of the operands (22% of
# the training step's thread time), 37.7 -> 29.1 ms at 28x28x128 and ResNeXt-50's training step
# 1.05x (832 -> 792 ms, batch 16, 2-core AVX-512 Xeon, 2026-12-04); at 8 a group it loses (14x14x256
# 13.7 vs 19.1 ms).
_MAX_SUMMED_CHANNELS = 8
_DENSE_KERNEL_GRADIENT_MAX_CHANNELS = 4
_grouped_conv.defvjp(_grouped_conv_forward, _grouped_conv_backward)


def _conv_as_patch_matmul(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
    """An ungrouped NHWC convolution as one matmul of the input's patches by the flattened kernel."""
    kh, kw, channels, features = kernel.shape
    patches = image_patches(x, (kh, kw), strides, padding)
    n, out_h, out_w = patches.shape[:3]
    out = jax.lax.dot_general(patches.reshape(-1, kh * kw * channels), kernel.reshape(-1, features),
                              (((1,), (0,)), ((), ())))
    return out.reshape(n, out_h, out_w, features)


# Measured without a gradient (inference), batch 16, 2-core AVX2 EPYC, 2026-12-02: the patch matmul
# beats XLA's convolution where the output is small (ResNet-50's 3x3 stride-2 ones at 112 px, 28 ->
# 14 px: 7.9 vs 10.6 ms; 4x4x512: 8.7 vs 10.5 ms) and loses on larger outputs and kernels (56 -> 28
# px, 128 channels: 66 vs 45 ms; AlexNet's 5x5 at 12 px: 30 vs 20 ms).
PATCH_FORWARD_MAX_PIXELS = 14 * 14


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _patch_conv(x, kernel, strides, padding, patch_forward):
    """``patch_forward``: without a gradient too, the patch matmul (else XLA's convolution)."""
    if patch_forward:
        return _conv_as_patch_matmul(x, kernel, strides, padding)
    return _direct_conv(x, kernel, strides, padding)


def _patch_conv_forward(x, kernel, strides, padding, patch_forward):
    return _conv_as_patch_matmul(x, kernel, strides, padding), (x, kernel)


def _patch_conv_backward(strides, padding, patch_forward, residuals, grad):
    # The patches are taken again rather than kept from the forward pass: nine times the output's
    # size per 3x3 convolution held through the whole forward pass, against a few strided copies.
    _, pullback = jax.vjp(lambda x, k: _conv_as_patch_matmul(x, k, strides, padding), *residuals)
    return pullback(grad)


# Under a gradient, the patch matmul's forward and backward passes beat XLA:CPU's convolution with
# the kernel gradient already written as a patch matmul (the form before 12-02) at all eleven shapes
# measured (batch 16, 2-core AVX2 EPYC, 2026-12-02): ResNet-50's 3x3 stride-2 ones at 112 and 224 px
# 1.06-1.35x (7 -> 4 px, 512 channels: 22.7 vs 30.6 ms; 56 -> 28 px: 150 vs 191 ms), its 4x4x512 ones
# 1.35x (22.5 vs 30.5 ms), GoogLeNet-BN's 4x4 ones 1.15-1.38x, AlexNet's 5x5 and 3x3 1.16-1.22x. The
# data gradient needs no transposed, reversed copy of the kernel (XLA:CPU's transposed convolution
# writes one, 13 ms a step for each of ResNet-50's 3x3x512x512 kernels).
_patch_conv.defvjp(_patch_conv_forward, _patch_conv_backward)


def _tap_rows(x: jax.Array, kernel_hw: tuple[int, int], strides, padding) -> jax.Array:
    """The input under every kernel tap as rows: (kh * kw * C, N * H' * W'), channel-major."""
    by_channel = jnp.pad(x, ((0, 0), *padding, (0, 0))).transpose(3, 0, 1, 2)  # (C, N, H, W)
    rows = [view for _, _, view in _tap_windows(by_channel, kernel_hw, strides, axes=(2, 3))]
    return jnp.stack(rows).reshape(kernel_hw[0] * kernel_hw[1] * x.shape[-1], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_with_tap_row_kernel_gradient(x, kernel, strides, padding):
    """XLA's convolution and input gradient; the kernel gradient as the input's tap rows times the
    output gradient, a plain matmul."""
    return _direct_conv(x, kernel, strides, padding)


def _conv_with_tap_row_kernel_gradient_forward(x, kernel, strides, padding):
    return _direct_conv(x, kernel, strides, padding), (x, kernel)


def _conv_with_tap_row_kernel_gradient_backward(strides, padding, residuals, grad):
    x, kernel = residuals
    (grad_x,) = jax.vjp(lambda x: _direct_conv(x, kernel, strides, padding), x)[1](grad)
    grad_kernel = jax.lax.dot_general(_tap_rows(x, kernel.shape[:2], strides, padding),
                                      grad.reshape(-1, grad.shape[-1]), (((1,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
    return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


# With few input channels (RGB stems), XLA:CPU's kernel gradient runs at a fraction of its forward
# pass's rate, and the patch matmul with pixel-major patches loses to it (the product transposes
# them). The rows of a channel-major copy, (kh * kw * C) x pixels, times the output gradient are a
# plain matmul; the rows are 9-49x the input, which is small there. Measured with the forward pass
# and a BatchNorm-ReLU after, batch 16, 2-core AVX-512 Xeon, 2026-12-04: ResNet's 7x7/2 stem at
# 112 px 27.5 -> 11.3 ms, at 224 px 157 -> 91 ms; VGG's 3x3 at 112 px 58 -> 42 ms; AlexNet's
# 11x11/4 14.1 -> 6.3 ms; Xception's 3x3/2 6.5 -> 4.9 ms; 16 and 32 channels in 1.2-2.6x. Training
# steps at 112 px, batch 16: GoogLeNet-BN 1.05x, ResNet-50 1.03x, DenseNet-121 1.02x, VGG-16 1.01x.
_conv_with_tap_row_kernel_gradient.defvjp(_conv_with_tap_row_kernel_gradient_forward,
                                          _conv_with_tap_row_kernel_gradient_backward)


def _shifted_output_gradients(grad: jax.Array, kernel_hw: tuple[int, int]) -> jax.Array:
    """(N, H' + kh - 1, W' + kw - 1, kh * kw, O): for each kernel tap (i, j), the output gradient
    moved i rows down and j columns right into the padded input's frame, zeros elsewhere."""
    kh, kw = kernel_hw
    _, out_h, out_w, _ = grad.shape
    framed = jnp.pad(grad, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
    return jnp.stack([framed[:, kh - 1 - i:kh - 1 - i + out_h + kh - 1, kw - 1 - j:kw - 1 - j + out_w + kw - 1]
                      for i in range(kh) for j in range(kw)], axis=3)


def _summed_tap_products(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    kh, kw, channels, features = kernel.shape
    n, height, width, _ = x.shape
    out_h, out_w = height + sum(padding[0]) - kh + 1, width + sum(padding[1]) - kw + 1
    by_tap = jax.lax.dot_general(x.reshape(-1, channels), kernel.transpose(2, 0, 1, 3).reshape(channels, -1),
                                 (((1,), (0,)), ((), ())))
    # The padding's products are zeros: padding the products pads the input.
    by_tap = jnp.pad(by_tap.reshape(n, height, width, kh * kw, features), ((0, 0), *padding, (0, 0), (0, 0)))
    return functools.reduce(jnp.add, [by_tap[:, i:i + out_h, j:j + out_w, i * kw + j]
                                      for i in range(kh) for j in range(kw)])


def _conv_as_shifted_products(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    """A stride-1 convolution as one matmul of the input by all taps' kernels side by side,
    (N, H, W, kh * kw * O), then each output pixel's sum of its taps' products, shifted into place
    (:func:`computed_once`). With few output channels the products are a few times the input's size."""
    return computed_once(functools.partial(_summed_tap_products, padding=padding), x, kernel)


def _few_outputs_forward_pass(x, kernel, padding):
    if min(x.shape[1:3]) >= SHIFTED_PRODUCTS_MIN_SIZE and x.dtype == kernel.dtype == jnp.float32:
        return _conv_as_shifted_products(x, kernel, padding)
    return _direct_conv(x, kernel, (1, 1), padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_with_few_outputs(x, kernel, padding):
    """A stride-1 ungrouped convolution with few output channels: the shifted products forward (XLA's
    convolution on small inputs), XLA's input gradient, and the kernel gradient as one matmul of the
    padded input by the output gradient shifted under every tap."""
    return _few_outputs_forward_pass(x, kernel, padding)


def _conv_with_few_outputs_forward(x, kernel, padding):
    return _few_outputs_forward_pass(x, kernel, padding), (x, kernel)


def _conv_with_few_outputs_backward(padding, residuals, grad):
    x, kernel = residuals
    kh, kw, channels, features = kernel.shape
    (grad_x,) = jax.vjp(lambda x: _direct_conv(x, kernel, (1, 1), padding), x)[1](grad)
    # grad_kernel[i, j] = sum over pixels p of padded_x[p + (i, j)] grad[p] = sum over p' of
    # padded_x[p'] shifted_grad[p', (i, j)]: both operands whole, contiguous arrays.
    shifted = _shifted_output_gradients(grad, (kh, kw)).reshape(-1, kh * kw * features)
    padded = jnp.pad(x, ((0, 0), *padding, (0, 0))).reshape(-1, channels)
    by_tap = jax.lax.dot_general(shifted, padded, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return grad_x, by_tap.reshape(kh, kw, features, channels).transpose(0, 1, 3, 2).astype(kernel.dtype)


# XLA:CPU computes the kernel gradient of a convolution with few output channels from a copy of
# the input transposed to channels-first, batch-last, which runs at ~1 GB/s (DenseNet-121's 3x3
# 128 -> 32 convolutions: 10-12 ms for the copy beside 8 ms for the gradient at 28 px, batch 16);
# the output gradient shifted under each tap is small there (9 x 32 columns against 128) and its
# matmul by the padded input needs no transposed operand. DenseNet-121's training step, batch 16 at
# 112 px (2-core AVX-512 Xeon, 2026-12-04): 1.10x faster (9 alternating rounds, range 1.07-1.48).
# The shifted products forward, against XLA's (YNNPACK) convolution at DenseNet's 3x3 128 -> 32
# with BatchNorm-ReLU before and after, batch 16: 28 px 4.2 vs 6.5 ms, 14 px 1.3 vs 1.6 ms, 7 px
# 0.43 vs 0.48 ms, 3 px 0.13 vs 0.09 ms (hence a least size); DenseNet-121's inference 1.14x,
# training step 1.03x.
SHIFTED_PRODUCTS_MIN_SIZE = 7
_conv_with_few_outputs.defvjp(_conv_with_few_outputs_forward, _conv_with_few_outputs_backward)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` with rewrites for the NHWC convolutions XLA:CPU runs slowly.

    - Ungrouped, unpadded 1x1 convolutions become a matrix product over the channels (strided by
      slicing): XLA:CPU runs their forward and backward passes about 3x faster so, and they are two
      thirds of a bottleneck ResNet's convolutions; GPUs and TPUs lower both forms to the same
      matrix units.
    - On the CPU, grouped convolutions with at most 8 input channels per group (depthwise ones:
      1) become sums of broadcast products, 10-40x faster than XLA:CPU's grouped convolution;
      those with more, one group-batched matmul per tap (1.2x). All but depthwise ones get their
      kernel gradient as per-tap products batched over the groups (with at most 4 channels a
      group, each tap's dense product of all channels, its diagonal blocks kept) and their input
      gradient as the sums of the flipped kernel (stride 1, few channels a group) or as batched
      matmuls (30x faster than XLA's).
    - On the CPU, ungrouped convolutions of at least :data:`REWRITE_MIN_MACS` multiply-adds and
      :data:`REWRITE_MIN_CHANNELS` channels out: float32 3x3 stride-1 ones with outputs of at
      least :data:`WINOGRAD_MIN_SIZE` pixels a side and :data:`WINOGRAD_MIN_CHANNELS_IN` channels
      in run as F(2x2, 3x3) Winograd (:mod:`flaxnets.winograd`, with Winograd gradients), 1.3x
      faster forward and backward at the median shape against XLA's (12-02; the two-pass tiles and
      the custom gradient of 12-04 added 1.1-1.3x), or as F(4x4, 3x3) where that was faster still
      (:data:`WINOGRAD_F4_MIN_SIZE`, :data:`WINOGRAD_F4_MIN_MACS`,
      :data:`WINOGRAD_F4_MIN_SIZE_UNDER_GRADIENT`: 1.1-1.8x more); the others with :data:`REWRITE_MIN_CHANNELS`
      channels in too (strided, or small outputs) run under a gradient as one matmul over the input's patches,
      forward and both gradients (1.06-1.38x faster), and without one as the patch matmul only for
      3x3 kernels with at most :data:`PATCH_FORWARD_MAX_PIXELS` output pixels.
    - On the CPU, the other ungrouped convolutions with fewer than :data:`REWRITE_MIN_CHANNELS`
      channels in (RGB stems) keep XLA's forward pass and input gradient and get their kernel
      gradient as the rows of the input's taps, channel-major, times the output gradient
      (1.3-2.5x faster); stride-1 ones with at least that many channels in and fewer out
      (DenseNet's 32-channel growth) run forward as one matmul by every tap's kernel and a
      shifted sum (from :data:`SHIFTED_PRODUCTS_MIN_SIZE` pixels a side), keep XLA's input
      gradient and get their kernel gradient as one matmul of the padded input by the output
      gradient shifted under each tap.

    Same numbers up to rounding; anything else goes to ``lax.conv_general_dilated`` unchanged.
    """
    if isinstance(padding, str) and dimension_numbers == _NHWC:  # "SAME"/"VALID", as flax passes its default
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    plain = (dimension_numbers == _NHWC and not kwargs and all(d == 1 for d in (lhs_dilation or (1, 1)))
             and all(d == 1 for d in (rhs_dilation or (1, 1))))
    if (plain and rhs.shape[:2] == (1, 1) and feature_group_count == 1 and all(p == (0, 0) for p in padding)
            and target_platform() in MATMUL_1X1_PLATFORMS):
        stride_h, stride_w = window_strides
        if (stride_h, stride_w) != (1, 1):
            lhs = lhs[:, ::stride_h, ::stride_w, :]
        # A 2-D product: given the 4-D one, XLA:CPU writes the kernel gradient's output-gradient operand
        # a second time, transposed (12% of a ResNet-50 step); as 2-D it reads it in place.
        n, height, width, channels = lhs.shape
        out = jax.lax.dot_general(lhs.reshape(-1, channels), rhs[0, 0], (((1,), (0,)), ((), ())), precision=precision)
        return out.reshape(n, height, width, -1)
    cpu = target_platform() == "cpu"
    if plain and cpu and feature_group_count == 1 and rhs.shape[:2] != (1, 1):
        pads = tuple(tuple(p) for p in padding)
        kh, kw, channels, features = rhs.shape
        (stride_h, stride_w), (n, height, width, _) = window_strides, lhs.shape
        out_h = (height + sum(pads[0]) - kh) // stride_h + 1
        out_w = (width + sum(pads[1]) - kw) // stride_w + 1
        big = n * out_h * out_w * kh * kw * channels * features >= REWRITE_MIN_MACS
        if (big and (kh, kw, stride_h, stride_w) == (3, 3, 1, 1) and min(out_h, out_w) >= WINOGRAD_MIN_SIZE
                and lhs.dtype == rhs.dtype == jnp.float32
                and channels >= WINOGRAD_MIN_CHANNELS_IN and features >= REWRITE_MIN_CHANNELS):
            size, macs = min(out_h, out_w), n * out_h * out_w * 9 * channels * features
            outputs = 4 if size >= WINOGRAD_F4_MIN_SIZE and macs >= WINOGRAD_F4_MIN_MACS else 2
            return winograd_conv3x3(lhs, rhs, pads, outputs, 4 if size >= WINOGRAD_F4_MIN_SIZE_UNDER_GRADIENT else 2)
        if big and min(channels, features) >= REWRITE_MIN_CHANNELS:
            patch_forward = (kh, kw) == (3, 3) and out_h * out_w <= PATCH_FORWARD_MAX_PIXELS
            return _patch_conv(lhs, rhs, (stride_h, stride_w), pads, patch_forward)
        if ((stride_h, stride_w) == (1, 1) and channels >= REWRITE_MIN_CHANNELS > features
                and all(0 <= p <= k - 1 for side, k in zip(pads, (kh, kw)) for p in side)):
            return _conv_with_few_outputs(lhs, rhs, pads)
        if channels < REWRITE_MIN_CHANNELS and all(p >= 0 for side in pads for p in side):
            return _conv_with_tap_row_kernel_gradient(lhs, rhs, (stride_h, stride_w), pads)
    if plain and cpu and feature_group_count > 1:
        args = (tuple(window_strides), tuple(tuple(p) for p in padding), feature_group_count)
        if rhs.shape[2] == 1 and rhs.shape[3] == lhs.shape[3]:
            return _depthwise_conv(lhs, rhs, *args[:2])
        if rhs.shape[2] == 1:
            return _grouped_conv_as_sums(lhs, rhs, *args)
        return _grouped_conv(lhs, rhs, *args)
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)


# ``nn.Conv`` with the same parameters and results, faster where XLA:CPU is slow (see above).
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
