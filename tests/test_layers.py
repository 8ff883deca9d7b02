"""Shared layers against independent NumPy computations of their definitions."""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxnets import conv as conv_module
from flaxnets.conv import conv_general_dilated
from flaxnets.layers import Conv, adaptive_avg_pool, avg_pool, global_avg_pool, local_response_norm, max_pool

RNG = np.random.default_rng(0)


def test_lrn_matches_the_papers_formula():
    x = RNG.normal(size=(2, 3, 4, 9)).astype(np.float32) * 3
    k, n, alpha, beta = 2.0, 5, 1e-4, 0.75
    expected = np.empty_like(x)
    for c in range(x.shape[-1]):
        lo, hi = max(0, c - n // 2), min(x.shape[-1], c + n // 2 + 1)
        expected[..., c] = x[..., c] / (k + alpha * np.sum(x[..., lo:hi] ** 2, axis=-1)) ** beta
    got = np.asarray(local_response_norm(x, size=n, alpha=alpha, beta=beta, k=k))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Large activations are really damped: not the identity.
    assert not np.allclose(np.asarray(local_response_norm(x * 100)), x * 100 / 2**0.75)


def _torch_pool_size(size, window, stride, pad, ceil_mode):
    """Output size as torch.nn.MaxPool2d documents it."""
    rounding = math.ceil if ceil_mode else math.floor
    out = rounding((size + 2 * pad - window) / stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _reference_max_pool(x, window, stride, pad, ceil_mode):
    size = x.shape[1]
    out = _torch_pool_size(size, window, stride, pad, ceil_mode)
    y = np.empty((x.shape[0], out, out, x.shape[3]), x.dtype)
    for i in range(out):
        for j in range(out):
            r0, c0 = i * stride - pad, j * stride - pad
            rows = slice(max(r0, 0), min(r0 + window, size))
            cols = slice(max(c0, 0), min(c0 + window, size))
            y[:, i, j] = x[:, rows, cols].max(axis=(1, 2))
    return y


@pytest.mark.parametrize(
    "size, window, stride, pad, ceil_mode",
    [(112, 3, 2, 0, True), (14, 2, 2, 0, True), (55, 3, 2, 0, False), (56, 3, 2, 1, False),
     (7, 3, 1, 1, True), (13, 3, 2, 0, True), (10, 3, 2, 1, True)],
)
def test_max_pool_matches_torch_semantics(size, window, stride, pad, ceil_mode):
    x = -np.abs(RNG.normal(size=(2, size, size, 3))).astype(np.float32)  # all negative: padding must lose
    got = np.asarray(max_pool(x, window, stride, padding=pad, ceil_mode=ceil_mode))
    np.testing.assert_array_equal(got, _reference_max_pool(x, window, stride, pad, ceil_mode))


def test_known_pool_sizes():
    x = np.zeros((1, 112, 112, 1), np.float32)
    assert max_pool(x, 3, 2, ceil_mode=True).shape[1] == 56  # GoogLeNet's first pool
    assert max_pool(x, 3, 2).shape[1] == 55
    assert max_pool(np.zeros((1, 14, 14, 1)), 2, 2, ceil_mode=True).shape[1] == 7


def test_avg_pool_counts_padding():
    x = np.ones((1, 4, 4, 1), np.float32)
    y = np.asarray(avg_pool(x, 3, 1, padding=1))
    assert y[0, 0, 0, 0] == pytest.approx(4 / 9)
    assert y[0, 1, 1, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("size, out", [(13, 6), (1, 6), (12, 6), (7, 7), (5, 4), (14, 4)])
def test_adaptive_avg_pool_matches_definition(size, out):
    x = RNG.normal(size=(2, size, size, 3)).astype(np.float32)
    expected = np.empty((2, out, out, 3), np.float32)
    for i in range(out):
        for j in range(out):
            r = slice(math.floor(i * size / out), math.ceil((i + 1) * size / out))
            c = slice(math.floor(j * size / out), math.ceil((j + 1) * size / out))
            expected[:, i, j] = x[:, r, c].mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(adaptive_avg_pool(x, out)), expected, rtol=1e-5, atol=1e-6)


def test_global_avg_pool():
    x = RNG.normal(size=(2, 5, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(global_avg_pool(x)), x.mean(axis=(1, 2)), rtol=1e-5)


def test_max_pool_gradient_matches_torch():
    import torch

    x = np.random.default_rng(0).normal(size=(2, 13, 13, 4)).astype(np.float32)
    tied = np.round(x)  # many windows with their maximum twice: PyTorch's gradient goes to the first
    for x, stride, pad, ceil_mode in ((x, 2, 1, False), (x, 2, 0, True), (x, 1, 1, True), (tied, 2, 1, True), (tied, 1, 1, False)):
        grad = jax.grad(lambda v: (max_pool(v, 3, stride, pad, ceil_mode) ** 2).sum())(x)
        t = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
        (torch.nn.functional.max_pool2d(t, 3, stride, pad, ceil_mode=ceil_mode) ** 2).sum().backward()
        np.testing.assert_allclose(grad, t.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


def test_max_pool_gradient_reads_its_incoming_gradient_computed_once():
    """Each input pixel of a 3x3/2 pool reads up to four outputs' gradients; XLA:CPU fused the
    gradient's computation into those reads (DenseNet-121's seven summed BatchNorm gradients, 42 ms
    of a 615 ms step). The scatter must read the gradient as computed, not recompute it."""
    x = jnp.ones((2, 12, 12, 8))
    compiled = jax.jit(jax.grad(lambda x: jnp.sin(max_pool(x, 3, 2, 1)).sum())).lower(x).compile().as_text()
    computations = [c for c in re.split(r"\n(?=\S)", compiled) if " cosine(" in c]
    assert computations and not any(" pad(" in c for c in computations)


@pytest.mark.parametrize("kernel, stride, groups, channels, padding", [
    (1, 1, 1, 8, 0), (1, 2, 1, 8, 0), (3, 1, 1, 8, 1), (1, 1, 2, 8, 0),
    (3, 1, 4, 8, 1), (3, 1, 4, 8, "VALID"), (3, 2, 2, 8, 1),  # summed products; gradient as sums or matmuls
    (3, 1, 2, 32, 1), (3, 2, 2, 32, 1), (3, 1, 2, 32, "VALID"),  # 16 a group: per-tap group matmuls
    (3, 1, 8, 8, 1), (3, 2, 8, 8, 1)])                         # depthwise
def test_conv_matches_lax_convolution_with_gradients(kernel, stride, groups, channels, padding):
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, channels))
    conv = Conv(channels, (kernel, kernel), strides=stride, padding=padding, feature_group_count=groups)
    variables = conv.init(jax.random.key(1), x)
    reference = nn.Conv(channels, (kernel, kernel), strides=stride, padding=padding, feature_group_count=groups)

    def loss(module, v, inputs):
        return (module.apply(v, inputs) ** 2).sum()

    np.testing.assert_allclose(conv.apply(variables, x), reference.apply(variables, x), rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(jax.tree.leaves(jax.grad(loss, argnums=(1, 2))(conv, variables, x)),
                            jax.tree.leaves(jax.grad(loss, argnums=(1, 2))(reference, variables, x))):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_summed_grouped_conv_is_computed_once_for_all_its_readers():
    """XLA:CPU copied the summed products of a grouped convolution into every loop that read the
    output (BatchNorm, ReLU and their gradients: five times in a ResNeXt-50 training step, which
    then took 1.85x as long); BatchNorm's readers must not add another copy of the products."""
    conv = Conv(32, (3, 3), padding=1, feature_group_count=8, use_bias=False)  # 4 channels a group
    x = jnp.ones((2, 8, 8, 32))
    variables = conv.init(jax.random.key(0), x)

    def multiplies(readers):
        compiled = jax.jit(lambda v, x: readers(conv.apply(v, x))).lower(variables, x).compile().as_text()
        return compiled.count(" multiply(")

    def normalised(y):  # BatchNorm's statistics and ReLU, as in a ResNeXt block
        mean = y.mean((0, 1, 2))
        variance = ((y - mean) ** 2).mean((0, 1, 2))
        return (jax.nn.relu((y - mean) * jax.lax.rsqrt(variance + 1e-5)) ** 2).sum()

    once = multiplies(lambda y: y.sum())
    assert once >= 9 * 4  # a product per tap and channel of a group
    assert multiplies(normalised) < once + 9 * 4


_HWIO = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _ours_and_direct(x, weights, stride, padding):
    """((output, (grad_x, grad_w)), ...) of our convolution and of lax.conv's, in one compile."""
    def run(conv):
        out, pullback = jax.vjp(lambda x, w: conv(x, w, (stride, stride), padding, dimension_numbers=_HWIO), x, weights)
        return out, pullback(jnp.cos(out))  # a cotangent that is not the output itself

    return jax.jit(lambda: (run(conv_general_dilated), run(jax.lax.conv_general_dilated)))()


def _largest(a) -> float:
    return float(jnp.max(jnp.abs(a)))


@pytest.mark.parametrize("shape, kernel, stride, padding, direct_forward", [
    ((2, 9, 9, 8, 8), 3, 1, ((1, 1), (1, 1)), False),      # Winograd; odd size: a part tile at the edge
    ((2, 10, 10, 8, 8), 3, 1, ((0, 0), (0, 0)), False),    # Winograd, VALID
    ((2, 8, 11, 8, 8), 3, 1, ((0, 1), (2, 1)), False),     # Winograd, uneven padding, rectangular
    ((2, 8, 8, 8, 8), 3, 1, ((3, 0), (1, 2)), False),      # Winograd, a pad past the kernel: rows of zeros
    ((2, 14, 14, 128, 128), 3, 1, ((1, 1), (1, 1)), False),  # Winograd, ResNet-50's channels
    ((2, 4, 4, 16, 16), 3, 1, ((1, 1), (1, 1)), False),    # below WINOGRAD_MIN_SIZE: a patch matmul
    ((2, 23, 23, 3, 16), 7, 2, ((3, 3), (3, 3)), True),    # an RGB stem: patch matmuls backward only
    ((2, 12, 12, 8, 8), 3, 2, ((1, 1), (1, 1)), False),    # strided, small output: a patch matmul
    ((1, 31, 32, 8, 8), 3, 2, ((1, 1), (1, 1)), True),     # strided, 16x16 output: backward only
])
def test_cpu_conv_rewrites_match_the_direct_convolution(shape, kernel, stride, padding, direct_forward, monkeypatch):
    """Winograd F(2x2, 3x3) and the patch matmuls give lax.conv's values and gradients."""
    monkeypatch.setattr(conv_module, "REWRITE_MIN_MACS", 0)  # these shapes are small to keep the test fast
    monkeypatch.setattr(conv_module, "REWRITE_MIN_CHANNELS", 0)
    monkeypatch.setattr(conv_module, "WINOGRAD_MIN_CHANNELS_IN", 0)
    n, h, w, c, k = shape
    x = jax.random.normal(jax.random.key(0), (n, h, w, c))
    weights = jax.random.normal(jax.random.key(1), (kernel, kernel, c, k)) / np.sqrt(kernel * kernel * c)

    (ours, our_grads), (direct, direct_grads) = _ours_and_direct(x, weights, stride, padding)
    assert _largest(ours - direct) < 1e-5 * _largest(direct)
    for a, b in zip(our_grads, direct_grads):
        assert _largest(a - b) < 1e-5 * _largest(b)
    traced = str(jax.make_jaxpr(lambda x: conv_general_dilated(x, weights, (stride, stride), padding,
                                                               dimension_numbers=_HWIO))(x))
    assert ("conv_general_dilated" in traced) == direct_forward


@pytest.mark.parametrize("shape, padding", [
    ((2, 9, 9, 8, 8), ((1, 1), (1, 1))),      # odd size: part tiles at the edge
    ((2, 10, 13, 8, 8), ((0, 0), (0, 0))),    # VALID, rectangular
    ((2, 8, 11, 8, 8), ((0, 1), (2, 1))),     # uneven padding
    ((2, 8, 8, 8, 8), ((3, 0), (1, 2))),      # a pad past the kernel: rows of zeros
    ((2, 16, 16, 256, 256), ((1, 1), (1, 1))),  # ResNet-50's widest channels at 14 px, 4x4 tiles
])
def test_winograd_f4x4_matches_the_direct_convolution(shape, padding):
    """F(4x4, 3x3), with the interpolation points chosen for float32, is within 1e-5 of lax.conv in
    values and both gradients; undifferentiated it can run F(2x2, 3x3) with the same result."""
    from flaxnets.winograd import winograd_conv3x3

    n, h, w, c, k = shape
    x = jax.random.normal(jax.random.key(0), (n, h, w, c))
    weights = jax.random.normal(jax.random.key(1), (3, 3, c, k)) / np.sqrt(9 * c)

    def run(conv):
        out, pullback = jax.vjp(conv, x, weights)
        return out, pullback(jnp.cos(out))

    (ours, our_grads), (direct, direct_grads), plain = jax.jit(lambda: (
        run(lambda x, w: winograd_conv3x3(x, w, padding, 2, 4)),
        run(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_HWIO)),
        winograd_conv3x3(x, weights, padding, 2, 4)))()
    assert _largest(ours - direct) < 1e-5 * _largest(direct)
    assert _largest(plain - direct) < 1e-5 * _largest(direct)
    for a, b in zip(our_grads, direct_grads):
        assert _largest(a - b) < 1e-5 * _largest(b)


@pytest.mark.parametrize("outputs", [2, 4])
def test_winograd_tiles_are_stacked_in_passes_and_its_input_gradient_is_a_convolution(outputs):
    """The (m+2)² input tiles are built in two passes of m+2 stacks, which XLA fuses into the loops
    that compute them: stacked at once, XLA:CPU copies them in a separate many-operand concatenation.
    The input gradient is the output gradient's Winograd convolution, not autodiff's sum of
    interior-padded copies of the tiles' gradient (VGG-16's training step: 1.18x)."""
    from flaxnets.winograd import winograd_conv3x3

    taps = (outputs + 2) ** 2
    x, w = jnp.ones((2, 14, 14, 64)), jnp.ones((3, 3, 64, 64))
    loss = lambda x, w: jnp.sum(jnp.sin(winograd_conv3x3(x, w, ((1, 1), (1, 1)), outputs)))
    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile().as_text()
    stacked = [line.split(" = ")[1].split(" ")[0] for line in hlo.splitlines() if "concatenate(" in line
               and len(re.findall(r"%[\w.\-]+", line.split("concatenate(")[1].split(")")[0])) == taps]
    assert stacked == [f"f32[{taps},64,64]{{2,1,0}}"] * 2  # the kernel's and the flipped kernel's taps only
    interior = [p for p in re.findall(r"padding=([\d_x\-]+)", hlo)
                if any(len(d.split("_")) == 3 and d.split("_")[2] != "0" for d in p.split("x"))]
    assert not interior


def test_winograd_is_kept_for_convolutions_big_enough_to_gain():
    """Small, bfloat16 or few-channel 3x3 convolutions are not Winograd's: compile time or XLA's own
    convolution would outweigh its gain."""
    def traced(shape, dtype=jnp.float32):
        n, h, c, k = shape
        x, w = jnp.ones((n, h, h, c), dtype), jnp.ones((3, 3, c, k), dtype)
        return str(jax.make_jaxpr(lambda x: conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                                 dimension_numbers=_HWIO))(x))

    assert "conv_general_dilated" not in traced((16, 28, 64, 64))  # ResNet-50's at 112 px: 462 M
    assert "conv_general_dilated" in traced((2, 16, 64, 64))  # 19 M multiply-adds
    assert "conv_general_dilated" in traced((16, 28, 64, 64), jnp.bfloat16)
    # Few channels: XLA's own (YNNPACK) convolution is 2-4x faster there.
    assert "conv_general_dilated" in traced((16, 112, 3, 64))  # VGG's RGB convolution: 347 M
    assert "cond[" in traced((16, 28, 128, 32))  # DenseNet's 32-channel growth: the shifted products
    assert "conv_general_dilated" not in traced((16, 53, 32, 64))  # Xception's second stem convolution
    assert "conv_general_dilated" in traced((16, 53, 16, 64))  # 16 channels in: direct


def test_winograd_f4x4_where_it_was_measured_faster():
    """F(4x4, 3x3) forward only for large convolutions of at least 28 pixels a side; differentiated
    from 14 pixels a side. The scheme shows in the batch of the tile products: 36 or 16."""
    def products(shape, gradient):
        n, h, c, k = shape
        x, w = jnp.ones((n, h, h, c)), jnp.ones((3, 3, c, k))
        conv = lambda x: conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_HWIO)
        text = str(jax.make_jaxpr(jax.grad(lambda x: conv(x).sum()) if gradient else conv)(x))
        return {int(b) for b in re.findall(r"f32\[(16|36),\d+,%d\]" % k, text)}

    assert products((16, 56, 128, 128), gradient=False) == {36}  # VGG-16's at 112 px: 7.4 G multiply-adds
    assert products((16, 28, 64, 64), gradient=False) == {16}  # ResNet-50's: 462 M
    assert products((16, 28, 64, 64), gradient=True) == {36}
    assert products((16, 14, 128, 128), gradient=True) == {36}
    assert products((16, 7, 256, 256), gradient=True) == {16}


def test_patch_gradient_only_with_many_channels():
    """The patch-matmul kernel gradient (a custom VJP) is for wide convolutions; an RGB stem keeps
    XLA's convolution forward and backward to its input, its kernel gradient a plain matmul."""
    def compiled(x_shape, kernel_shape, stride):
        x, w = jnp.ones(x_shape), jnp.ones(kernel_shape)
        pad = ((kernel_shape[0] // 2,) * 2,) * 2

        def loss(x, w):
            return conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=_HWIO).sum()

        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()

    stem = compiled((2, 32, 32, 3), (7, 7, 3, 16), 2)  # ResNet's stem
    assert stem.count(" convolution(") == 1 and " dot(" in stem  # the input gradient; the kernel's a matmul
    assert " convolution(" not in compiled((16, 28, 28, 128), (3, 3, 128, 128), 2)  # a strided 3x3: 462 M


@pytest.mark.parametrize("shape, kernel, stride, pad", [
    ((2, 23, 23, 3, 16), 7, 2, 3), ((2, 27, 27, 3, 8), 11, 4, 2),  # ResNet's and AlexNet's stems
    ((2, 12, 11, 16, 8), 3, 1, 1), ((2, 9, 9, 32, 8), 5, 1, 0)])   # few channels in, inside a network
def test_tap_row_kernel_gradient_matches_the_direct_convolution(shape, kernel, stride, pad):
    n, h, w, c, k = shape
    x = jax.random.normal(jax.random.key(0), (n, h, w, c))
    weights = jax.random.normal(jax.random.key(1), (kernel, kernel, c, k)) / np.sqrt(kernel * kernel * c)
    padding = ((pad, pad), (pad, pad))

    (ours, our_grads), (direct, direct_grads) = _ours_and_direct(x, weights, stride, padding)
    np.testing.assert_array_equal(ours, direct)
    for a, b in zip(our_grads, direct_grads):
        assert _largest(a - b) < 1e-5 * _largest(b)


@pytest.mark.parametrize("size, kernel, padding", [
    (8, 3, ((1, 1), (1, 1))), (9, 3, ((0, 2), (1, 0))), (8, 2, ((0, 0), (1, 0))),  # shifted products forward
    (6, 3, ((1, 1), (1, 1)))])                                                      # small: XLA's forward
def test_few_output_channels_match_the_direct_convolution(size, kernel, padding):
    """Few channels out (DenseNet's growth): the shifted products forward from 7 px a side, XLA's
    input gradient, the kernel gradient from the shifted output gradient."""
    x = jax.random.normal(jax.random.key(0), (2, size, size - 1, 64))
    weights = jax.random.normal(jax.random.key(1), (kernel, kernel, 64, 8)) / np.sqrt(kernel * kernel * 64)

    traced = str(jax.make_jaxpr(lambda x: conv_general_dilated(x, weights, (1, 1), padding,
                                                               dimension_numbers=_HWIO))(x))
    assert "custom_vjp" in traced
    assert ("cond[" in traced) == (size - 1 >= conv_module.SHIFTED_PRODUCTS_MIN_SIZE)
    (ours, our_grads), (direct, direct_grads) = _ours_and_direct(x, weights, 1, padding)
    for a, b in zip((ours, *our_grads), (direct, *direct_grads)):
        assert _largest(a - b) < 1e-5 * _largest(b)


def test_few_output_channels_get_a_kernel_gradient_without_transposed_inputs():
    """XLA:CPU's own kernel gradient of DenseNet's 3x3 128 -> 32 convolutions reads a copy of the
    input transposed to channels-first (10-12 ms beside 8 ms for the product at 28 px, batch 16);
    the shifted-gradient matmul reads the padded input as it lies."""
    x, w = jnp.ones((2, 6, 6, 64)), jnp.ones((3, 3, 64, 8))
    loss = lambda x, w: (conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),  # noqa: E731
                                              dimension_numbers=_HWIO) ** 2).sum()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
    assert not re.search(r"f32\[64,\d+,\d+,2\]", compiled)  # the input with its channels first
    reference = jax.jit(jax.grad(lambda x, w: (jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_HWIO) ** 2).sum(), argnums=(0, 1))).lower(x, w)
    assert re.search(r"f32\[64,\d+,\d+,2\]", reference.compile().as_text())  # the copy this avoids


def test_patch_conv_gradient_needs_no_transposed_kernel(monkeypatch):
    """The data gradient of XLA:CPU's strided convolution writes a transposed, reversed copy of the
    kernel (13 ms a step for each 3x3x512x512 one of ResNet-50); the patch matmul's needs none."""
    monkeypatch.setattr(conv_module, "REWRITE_MIN_MACS", 0)
    x, w = jnp.ones((2, 8, 8, 64)), jnp.ones((3, 3, 64, 64))
    loss = lambda x, w: (conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)),  # noqa: E731
                                              dimension_numbers=_HWIO) ** 2).sum()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
    assert "convolution(" not in compiled and not re.search(r"f32\[3,3,64,64\]\S* (copy|transpose)", compiled)


@pytest.mark.parametrize("padding", ["SAME", "VALID", 0])
def test_pointwise_convs_run_as_matrix_products(padding):
    x = jnp.ones((2, 8, 8, 16))
    conv = Conv(32, (1, 1), strides=2, padding=padding)  # "SAME" is flax's default
    variables = conv.init(jax.random.key(0), x)
    assert "conv_general_dilated" not in str(jax.make_jaxpr(conv.apply)(variables, x))
    np.testing.assert_allclose(conv.apply(variables, x), nn.Conv(32, (1, 1), strides=2, padding=padding).apply(
        variables, x), rtol=1e-5, atol=1e-5)


def test_pointwise_conv_gradients_need_no_layout_copies():
    """XLA:CPU once wrote each 1x1 kernel gradient's output-gradient operand a second time,
    transposed (12% of a ResNet-50 step); the compiled gradient of a small bottleneck must not copy."""
    first, second = Conv(32, (1, 1), use_bias=False), Conv(16, (1, 1), use_bias=False)
    x = jnp.ones((4, 8, 8, 16))
    params = (first.init(jax.random.key(0), x), second.init(jax.random.key(1), jnp.ones((4, 8, 8, 32))))

    def loss(params, x):
        y = first.apply(params[0], x)
        y = jax.nn.relu((y - y.mean((0, 1, 2))) * 2.0)  # a normalisation between them, as in a ResNet block
        return (second.apply(params[1], y) ** 2).sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
    assert " copy(" not in compiled


def test_fully_connected_with_few_rows_transposes_them_once_and_matches_the_product(monkeypatch):
    """Few rows by a large kernel: the rows are transposed in an opaque copy (so that Eigen, not
    YNNPACK, runs the product); values and gradients are the plain product's."""
    from flaxnets import layers as layers_module
    from flaxnets.layers import FullyConnected

    monkeypatch.setattr(layers_module, "FEW_ROWS_MATMUL_MIN_KERNEL", 64 * 48)
    layer = FullyConnected(48)
    x = jax.random.normal(jax.random.key(0), (4, 64))
    params = layer.init(jax.random.key(1), x)
    kernel, bias = params["params"]["kernel"], params["params"]["bias"]

    def loss(params, x):
        return jnp.sum(jnp.sin(layer.apply(params, x)))

    assert "cond[" in str(jax.make_jaxpr(loss)(params, x))
    got = jax.grad(loss, (0, 1))(params, x)
    plain = lambda p, x: jnp.sum(jnp.sin(x @ p["params"]["kernel"] + p["params"]["bias"]))
    want = jax.grad(plain, (0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.apply(params, x), x @ kernel + bias, rtol=1e-5, atol=1e-6)
    many_rows = jnp.ones((65, 64))
    assert "cond[" not in str(jax.make_jaxpr(lambda x: layer.apply(params, x))(many_rows))


def test_grouped_kernel_gradient_with_four_channels_a_group_is_one_dense_product_per_tap():
    """At <= 4 channels a group the kernel gradient is each tap's dense product of all channels
    (its diagonal blocks kept), which reads the operands as they lie instead of group-major copies."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 16))
    weights = jax.random.normal(jax.random.key(1), (3, 3, 4, 16))  # 4 groups of 4
    conv = lambda w: conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_HWIO,
                                          feature_group_count=4)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(jnp.sin(conv(w)))))(weights))
    assert len(re.findall(r"f32\[16,16\] = dot_general", jaxpr)) == 9
    wide = jax.random.normal(jax.random.key(1), (3, 3, 8, 16))  # 2 groups of 8: batched per group
    conv8 = lambda w: conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_HWIO,
                                           feature_group_count=2)
    assert "f32[16,16] = dot_general" not in str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(conv8(w))))(wide))
