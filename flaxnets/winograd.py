"""3x3 stride-1 convolutions by Winograd's minimal filtering, F(2x2, 3x3), for XLA:CPU.

Each 2x2 block of outputs is computed from a 4x4 input tile with 16 multiplies per channel pair
instead of 36: the tiles and the kernel are transformed by small constant matrices (additions
only), multiplied as 16 batched matrix products over the channels, and transformed back. XLA fuses
the transforms into elementwise loops and runs the products as large matmuls, which XLA:CPU does
far better than its 3x3 convolutions. The gradients are Winograd computations too: the input's is
the convolution of the output gradient with the flipped kernel, and the kernel's is the product of
the input tiles with the output gradient's tiles. Lavin & Gray, "Fast Algorithms for Convolutional
Neural Networks" (2016). Float32 results differ from the direct form by rounding (~1e-6 relative).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _input_transform(t0, t1, t2, t3):
    """Bᵀ·d along one axis: the four rows (or columns) of a 4-wide tile."""
    return t0 - t2, t1 + t2, t2 - t1, t1 - t3


def _kernel_transform(g0, g1, g2):
    """G·g along one axis: three kernel taps become four."""
    half_sum = 0.5 * (g0 + g2)
    return g0, half_sum + 0.5 * g1, half_sum - 0.5 * g1, g2


def _output_transform(m0, m1, m2, m3):
    """Aᵀ·m along one axis: four products become two outputs."""
    return m0 + m1 + m2, m1 - m2 - m3


def _output_gradient_transform(g0, g1):
    """A·g along one axis, the transpose of :func:`_output_transform`: two gradients become four."""
    return g0, g0 + g1, g0 - g1, -g1


# Flipping a kernel's three taps (g2, g1, g0) swaps the first and last of its four transformed ones.
_FLIPPED = (3, 1, 2, 0)
_FLIPPED_TAPS = tuple(4 * _FLIPPED[t // 4] + _FLIPPED[t % 4] for t in range(16))


def _strided(x, start: int, count: int, axis: int):
    """``count`` elements of ``x`` along ``axis`` from ``start`` in steps of 2."""
    return jax.lax.slice_in_dim(x, start, start + 2 * count - 1, 2, axis=axis)


def _tiles(x, tiles_h: int, tiles_w: int, taps: int, transform):
    """(16, N·tiles_h·tiles_w, C): ``transform`` of the ``taps``-wide windows at every even offset,
    over the rows and then over the columns.

    Two passes of four stacked results: XLA fuses each stack into the loop that computes it, where
    all 16 tiles at once make a separate 16-operand copy (in VGG-16 at 112 px, 28 ms of a 470 ms
    inference step for one layer)."""
    rows = jnp.stack(transform(*(_strided(x, a, tiles_h, axis=1) for a in range(taps))))
    tiles = jnp.stack(transform(*(_strided(rows, b, tiles_w, axis=3) for b in range(taps))), axis=1)
    return tiles.reshape(16, -1, x.shape[-1])


def _transformed_kernel(kernel):
    """(16, C, K): G·g·Gᵀ for every channel pair of an HWIO (3, 3, C, K) kernel."""
    taps = _kernel_transform(kernel[0], kernel[1], kernel[2])
    return jnp.stack([u for tap in taps for u in _kernel_transform(tap[0], tap[1], tap[2])])


def _geometry(height: int, width: int, padding):
    """Output size and tile counts of a 3x3 stride-1 convolution with ``padding``."""
    (top, bottom), (left, right) = padding
    out_h, out_w = height + top + bottom - 2, width + left + right - 2
    return out_h, out_w, -(-out_h // 2), -(-out_w // 2)


def _input_tiles(x, padding):
    """The transformed 4x4 input tiles of ``x`` padded by ``padding`` (or cropped, where negative)."""
    _, height, width, _ = x.shape
    (top, _), (left, _) = padding
    _, _, tiles_h, tiles_w = _geometry(height, width, padding)
    # Pad (or crop) so that whole 4x4 tiles, overlapping by two, cover every output.
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (top, 2 * tiles_h + 2 - height - top, 0),
                                                 (left, 2 * tiles_w + 2 - width - left, 0), (0, 0, 0)))
    return _tiles(x, tiles_h, tiles_w, 4, _input_transform)


def _winograd(x, weights, padding, spec: str, features: int):
    """The convolution of ``x`` by transformed ``weights``, ``spec`` the tile-by-weight einsum."""
    n, height, width, _ = x.shape
    out_h, out_w, tiles_h, tiles_w = _geometry(height, width, padding)
    products = jnp.einsum(spec, _input_tiles(x, padding), weights)
    products = products.reshape(4, 4, n, tiles_h, tiles_w, features)
    rows = _output_transform(*products)
    out = [_output_transform(*row) for row in rows]  # out[i][j]: output (2 * th + i, 2 * tw + j)
    out = jnp.stack([jnp.stack(out[0], axis=3), jnp.stack(out[1], axis=3)], axis=2)
    out = out.reshape(n, 2 * tiles_h, 2 * tiles_w, features)
    return out[:, :out_h, :out_w]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def winograd_conv3x3(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    """A stride-1, undilated, ungrouped 3x3 NHWC convolution with ``padding`` ((top, bottom),
    (left, right)), computed as F(2x2, 3x3). ``kernel`` is HWIO (3, 3, C, K)."""
    return _winograd(x, _transformed_kernel(kernel), padding, "tpc,tck->tpk", kernel.shape[-1])


def _winograd_forward(x, kernel, padding):
    return winograd_conv3x3(x, kernel, padding), (x, kernel)


def _winograd_backward(padding, residuals, out_grad):
    """Both gradients as Winograd computations: autodiff of the forward form makes a VGG-16
    training step 1.18x slower. The flipped kernel is taken in the transformed domain, a
    permutation of the 16 taps: flipped and transposed in HWIO first, its products ran 3x slower."""
    x, kernel = residuals
    (top, bottom), (left, right) = padding
    flipped = _transformed_kernel(kernel)[jnp.array(_FLIPPED_TAPS)]
    # The flipped kernel's channels and features swap: contract the weights' last axis.
    input_grad = _winograd(out_grad, flipped, ((2 - top, 2 - bottom), (2 - left, 2 - right)),
                           "tpk,tck->tpc", x.shape[-1])
    _, _, tiles_h, tiles_w = _geometry(x.shape[1], x.shape[2], padding)
    _, out_h, out_w, _ = out_grad.shape
    padded_grad = jax.lax.pad(out_grad, jnp.zeros((), out_grad.dtype),
                              ((0, 0, 0), (0, 2 * tiles_h - out_h, 0), (0, 2 * tiles_w - out_w, 0), (0, 0, 0)))
    grad_tiles = _tiles(padded_grad, tiles_h, tiles_w, 2, _output_gradient_transform)
    weights_grad = jnp.einsum("tpc,tpk->tck", _input_tiles(x, padding), grad_tiles)
    _, kernel_pullback = jax.vjp(_transformed_kernel, kernel)
    return input_grad, kernel_pullback(weights_grad)[0]


winograd_conv3x3.defvjp(_winograd_forward, _winograd_backward)
