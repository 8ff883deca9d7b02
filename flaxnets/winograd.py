"""3x3 stride-1 convolutions by Winograd's minimal filtering, F(2x2, 3x3), for XLA:CPU.

Each 2x2 block of outputs is computed from a 4x4 input tile with 16 multiplies per channel pair
instead of 36: the tiles and the kernel are transformed by small constant matrices (additions
only), multiplied as 16 batched matrix products over the channels, and transformed back. XLA fuses
the transforms into elementwise loops and runs the products as large matmuls, which XLA:CPU does
far better than its 3x3 convolutions; autodiff of this form is itself a Winograd computation, so
the gradients gain as well. Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks"
(2016). Float32 results differ from the direct form by rounding (~1e-6 relative).
"""

from __future__ import annotations

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


def _strided(x, start: int, count: int, axis: int):
    """``count`` elements of ``x`` along ``axis`` from ``start`` in steps of 2."""
    return jax.lax.slice_in_dim(x, start, start + 2 * count - 1, 2, axis=axis)


def winograd_conv3x3(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    """A stride-1, undilated, ungrouped 3x3 NHWC convolution with ``padding`` ((top, bottom),
    (left, right)), computed as F(2x2, 3x3). ``kernel`` is HWIO (3, 3, C, K)."""
    n, height, width, channels = x.shape
    features = kernel.shape[-1]
    (top, bottom), (left, right) = padding
    out_h, out_w = height + top + bottom - 2, width + left + right - 2
    tiles_h, tiles_w = -(-out_h // 2), -(-out_w // 2)
    # Pad (or crop) so that whole 4x4 tiles, overlapping by two, cover every output.
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (top, 2 * tiles_h + 2 - height - top, 0),
                                                 (left, 2 * tiles_w + 2 - width - left, 0), (0, 0, 0)))
    rows = _input_transform(*(_strided(x, a, tiles_h, axis=1) for a in range(4)))
    tiles = [v for row in rows for v in _input_transform(*(_strided(row, b, tiles_w, axis=2) for b in range(4)))]
    tiles = jnp.stack(tiles).reshape(16, n * tiles_h * tiles_w, channels)

    taps = _kernel_transform(kernel[0], kernel[1], kernel[2])
    weights = [u for tap in taps for u in _kernel_transform(tap[0], tap[1], tap[2])]
    weights = jnp.stack(weights)  # (16, C, K)

    products = jnp.einsum("tpc,tck->tpk", tiles, weights).reshape(4, 4, n, tiles_h, tiles_w, features)
    rows = _output_transform(*products)
    out = [_output_transform(*row) for row in rows]  # out[i][j]: output (2 * th + i, 2 * tw + j)
    out = jnp.stack([jnp.stack(out[0], axis=3), jnp.stack(out[1], axis=3)], axis=2)
    out = out.reshape(n, 2 * tiles_h, 2 * tiles_w, features)
    return out[:, :out_h, :out_w]
