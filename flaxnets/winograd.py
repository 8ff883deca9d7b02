"""3x3 stride-1 convolutions by Winograd's minimal filtering, F(2x2, 3x3) and F(4x4, 3x3), for XLA:CPU.

Each m x m block of outputs is computed from an (m + 2) x (m + 2) input tile with (m + 2)² multiplies
per channel pair instead of 9m²: 16 instead of 36 for m = 2, 36 instead of 144 for m = 4. The tiles
and the kernel are transformed by small constant matrices (additions and constant scalings), multiplied
as (m + 2)² batched matrix products over the channels, and transformed back. XLA fuses the transforms
into elementwise loops and runs the products as large matmuls, which XLA:CPU does far better than its
3x3 convolutions. The gradients are Winograd computations too: the input's is the convolution of the
output gradient with the flipped kernel, and the kernel's is the product of the input tiles with the
output gradient's tiles. Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016).

Float32 results differ from the direct form by rounding: ~1e-6 of the output's largest value for
F(2x2, 3x3); F(4x4, 3x3) scales rounding errors up by its larger constants, to 2-6e-6 with the interpolation
points chosen below (after Barabasz et al., "Error analysis and improving the accuracy of Winograd
convolution", 2020), which is why :mod:`flaxnets.conv` uses it only where it was measured within
1e-5 and faster.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class WinogradScheme:
    """The constant matrices of F(m x m, 3x3): ``input_transform`` Bᵀ ((m+2) x (m+2)), ``kernel_transform``
    G ((m+2) x 3) and ``output_transform`` Aᵀ (m x (m+2)), with Y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A."""

    input_transform: tuple[tuple[float, ...], ...]
    kernel_transform: tuple[tuple[float, ...], ...]
    output_transform: tuple[tuple[float, ...], ...]

    @property
    def outputs(self) -> int:
        """m: the outputs per tile side."""
        return len(self.output_transform)

    @property
    def tile(self) -> int:
        """m + 2: the input tile's side, and the products per tile side."""
        return len(self.input_transform)


# Interpolation points 0, ±1, ∞.
F2X2 = WinogradScheme(
    input_transform=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    kernel_transform=((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
    output_transform=((1, 1, 1, 0), (0, 1, -1, -1)),
)
# Interpolation points 0, ±1, 1/2, -2, ∞. Measured in float32 against a float64 convolution at
# ResNet-50's and VGG-16's shapes (batch 1-2, 7x7x512 to 56x56x128): the output and both gradients
# within 2-6e-6 of their largest values, where Lavin & Gray's ±1, ±2 and the symmetric ±1, ±1/2 gave
# up to 1.4e-5 and 1.3e-5.
F4X4 = WinogradScheme(
    input_transform=((2, -3, -4, 3, 2, 0), (0, -2, 1, 5, 2, 0), (0, 2, -5, 1, 2, 0),
                     (0, -2, -1, 2, 1, 0), (0, 1, -2, -1, 2, 0), (0, 2, -3, -4, 3, 2)),
    kernel_transform=((1 / 2, 0, 0), (1 / 6, 1 / 6, 1 / 6), (-1 / 6, 1 / 6, -1 / 6),
                      (-16 / 15, -8 / 15, -4 / 15), (1 / 30, -1 / 15, 2 / 15), (0, 0, 1 / 2)),
    output_transform=((1, 1, 1, 1, 1, 0), (0, 1, -1, 0.5, -2, 0),
                      (0, 1, 1, 0.25, 4, 0), (0, 1, -1, 0.125, -8, 1)),
)
SCHEMES = {2: F2X2, 4: F4X4}


def _combine(coefficients, terms):
    """Σ cᵢ·tᵢ over the nonzero coefficients, without multiplying by ±1."""
    total = None
    for c, t in zip(coefficients, terms):
        if c == 0:
            continue
        scaled = t if abs(c) == 1 else abs(c) * t
        if total is None:
            total = -scaled if c < 0 else scaled
        else:
            total = total - scaled if c < 0 else total + scaled
    return total


def _apply(matrix, terms):
    """matrix · terms along one axis: one combination of ``terms`` per row of ``matrix``."""
    return [_combine(row, terms) for row in matrix]


def _transposed(matrix):
    """The transpose of a matrix given as a tuple of rows."""
    return tuple(zip(*matrix))


def _strided(x, start: int, count: int, step: int, axis: int):
    """``count`` elements of ``x`` along ``axis`` from ``start`` in steps of ``step``."""
    return jax.lax.slice_in_dim(x, start, start + step * (count - 1) + 1, step, axis=axis)


def _tiles(x, tiles_h: int, tiles_w: int, step: int, matrix):
    """(rows(matrix)², N·tiles_h·tiles_w, C): ``matrix`` applied to the windows as wide as its
    columns at every offset that is a multiple of ``step``, over the rows and then over the columns.

    Two passes of stacks, one per tile side: XLA fuses each stack into the loop that computes it,
    where all tiles at once make a separate many-operand copy (for F(2x2, 3x3) in VGG-16 at 112 px,
    28 ms of a 470 ms inference step for one layer)."""
    taps = len(matrix[0])
    rows = jnp.stack(_apply(matrix, [_strided(x, a, tiles_h, step, axis=1) for a in range(taps)]))
    tiles = jnp.stack(_apply(matrix, [_strided(rows, b, tiles_w, step, axis=3) for b in range(taps)]), axis=1)
    return tiles.reshape(len(matrix) ** 2, -1, x.shape[-1])


def _transformed_kernel(kernel, scheme: WinogradScheme):
    """(tile², C, K): G·g·Gᵀ for every channel pair of an HWIO (3, 3, C, K) kernel."""
    g = scheme.kernel_transform
    taps = _apply(g, [kernel[0], kernel[1], kernel[2]])
    return jnp.stack([u for tap in taps for u in _apply(g, [tap[0], tap[1], tap[2]])])


def _geometry(height: int, width: int, padding, m: int):
    """Output size and tile counts of a 3x3 stride-1 convolution with ``padding``, m x m outputs a tile."""
    (top, bottom), (left, right) = padding
    out_h, out_w = height + top + bottom - 2, width + left + right - 2
    return out_h, out_w, -(-out_h // m), -(-out_w // m)


def _input_tiles(x, padding, scheme: WinogradScheme):
    """The transformed input tiles of ``x`` padded by ``padding`` (or cropped, where negative)."""
    _, height, width, _ = x.shape
    (top, _), (left, _) = padding
    m = scheme.outputs
    _, _, tiles_h, tiles_w = _geometry(height, width, padding, m)
    # Pad (or crop) so that whole tiles, overlapping by two, cover every output.
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (top, m * tiles_h + 2 - height - top, 0),
                                                 (left, m * tiles_w + 2 - width - left, 0), (0, 0, 0)))
    return _tiles(x, tiles_h, tiles_w, m, scheme.input_transform)


def _winograd(x, weights, padding, spec: str, features: int, scheme: WinogradScheme):
    """The convolution of ``x`` by transformed ``weights``, ``spec`` the tile-by-weight einsum."""
    n, height, width, _ = x.shape
    m, tile = scheme.outputs, scheme.tile
    out_h, out_w, tiles_h, tiles_w = _geometry(height, width, padding, m)
    products = jnp.einsum(spec, _input_tiles(x, padding, scheme), weights)
    products = products.reshape(tile, tile, n, tiles_h, tiles_w, features)
    rows = _apply(scheme.output_transform, list(products))
    out = [_apply(scheme.output_transform, list(row)) for row in rows]  # out[i][j]: output (m·th + i, m·tw + j)
    out = jnp.stack([jnp.stack(out_row, axis=3) for out_row in out], axis=2)
    out = out.reshape(n, m * tiles_h, m * tiles_w, features)
    return out[:, :out_h, :out_w]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def winograd_conv3x3(x: jax.Array, kernel: jax.Array, padding, outputs: int = 2,
                     outputs_under_gradient: int | None = None) -> jax.Array:
    """A stride-1, undilated, ungrouped 3x3 NHWC convolution with ``padding`` ((top, bottom),
    (left, right)), computed as F(m x m, 3x3). ``kernel`` is HWIO (3, 3, C, K).

    m is ``outputs`` (2 or 4, a key of :data:`SCHEMES`) where the result is not differentiated, and
    ``outputs_under_gradient`` (``outputs`` where None) for the forward pass and both gradients
    where it is: the backward pass's products have other shapes, and a scheme that loses forward
    can win forward and backward together."""
    return _conv(x, kernel, padding, SCHEMES[outputs])


def _conv(x, kernel, padding, scheme: WinogradScheme):
    """The convolution of ``x`` by the HWIO ``kernel`` as ``scheme``."""
    return _winograd(x, _transformed_kernel(kernel, scheme), padding, "tpc,tck->tpk", kernel.shape[-1], scheme)


def _gradient_scheme(outputs, outputs_under_gradient) -> WinogradScheme:
    """The scheme of a differentiated convolution."""
    return SCHEMES[outputs if outputs_under_gradient is None else outputs_under_gradient]


def _winograd_forward(x, kernel, padding, outputs, outputs_under_gradient):
    return _conv(x, kernel, padding, _gradient_scheme(outputs, outputs_under_gradient)), (x, kernel)


def _winograd_backward(padding, outputs, outputs_under_gradient, residuals, out_grad):
    """Both gradients as Winograd computations: autodiff of the forward form makes a VGG-16
    training step 1.18x slower. The flipped kernel keeps the HWIO layout, its channels and features
    unswapped, and the product contracts the weights' last axis: flipped and transposed, its products
    ran 3x slower."""
    x, kernel = residuals
    scheme = _gradient_scheme(outputs, outputs_under_gradient)
    (top, bottom), (left, right) = padding
    flipped = _transformed_kernel(kernel[::-1, ::-1], scheme)
    input_grad = _winograd(out_grad, flipped, ((2 - top, 2 - bottom), (2 - left, 2 - right)),
                           "tpk,tck->tpc", x.shape[-1], scheme)
    m = scheme.outputs
    _, _, tiles_h, tiles_w = _geometry(x.shape[1], x.shape[2], padding, m)
    _, out_h, out_w, _ = out_grad.shape
    padded_grad = jax.lax.pad(out_grad, jnp.zeros((), out_grad.dtype),
                              ((0, 0, 0), (0, m * tiles_h - out_h, 0), (0, m * tiles_w - out_w, 0), (0, 0, 0)))
    grad_tiles = _tiles(padded_grad, tiles_h, tiles_w, m, _transposed(scheme.output_transform))
    weights_grad = jnp.einsum("tpc,tpk->tck", _input_tiles(x, padding, scheme), grad_tiles)
    _, kernel_pullback = jax.vjp(lambda k: _transformed_kernel(k, scheme), kernel)
    return input_grad, kernel_pullback(weights_grad)[0]


winograd_conv3x3.defvjp(_winograd_forward, _winograd_backward)
