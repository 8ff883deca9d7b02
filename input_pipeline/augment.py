"""Image operations of the papers' augmentations, each usable alone (eagerly) or inside ``tf.data``.

Conventions: images are HxWxC tensors, uint8 after decoding and float32 in [0, 1] after
:func:`to_float`; every random op takes a stateless ``seed`` (an int tensor of shape [2]), so the
same seed gives the same result, in any order and under parallel ``map``.
"""

from __future__ import annotations

import tensorflow as tf

# Eigen-decomposition of the RGB covariance of ImageNet pixels on the [0, 1] scale (columns are
# eigenvectors), as used for AlexNet's "lighting" noise by the common reimplementations.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
RESIZE_METHODS = ("bilinear", "area", "nearest", "bicubic")


def split_seed(seed: tf.Tensor, num: int = 2) -> tf.Tensor:
    """``num`` independent stateless seeds derived from one (shape [num, 2])."""
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=num)


def decode(image_bytes: tf.Tensor) -> tf.Tensor:
    """Decodes JPEG/PNG/GIF/BMP bytes to uint8 RGB (grayscale expanded, alpha dropped)."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def to_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 [0, 255] -> float32 [0, 1] (float input is passed through as float32)."""
    return tf.image.convert_image_dtype(image, tf.float32)


def resize_short_side(image: tf.Tensor, size, method: str = "bilinear") -> tf.Tensor:
    """Isotropic rescale so the shorter side is ``size`` pixels (float32 output)."""
    shape = tf.shape(image)[:2]
    scale = tf.cast(size, tf.float32) / tf.cast(tf.reduce_min(shape), tf.float32)
    new = tf.cast(tf.round(tf.cast(shape, tf.float32) * scale), tf.int32)
    return tf.image.resize(image, tf.maximum(new, size), method=method, antialias=method != "nearest")


def sample_short_side(low: int, high: int, seed: tf.Tensor) -> tf.Tensor:
    """Scale jittering's target shorter side S ~ U{low, ..., high} (VGG, ResNet)."""
    return tf.random.stateless_uniform([], seed, minval=low, maxval=high + 1, dtype=tf.int32)


def resize_square(image: tf.Tensor, size: int) -> tf.Tensor:
    """Bilinear resize to ``size`` x ``size`` (float32), antialiased only when shrinking more than 2x.

    Down to half size, plain bilinear interpolation reads every input pixel; the (slower)
    antialiasing filter is only needed below that.
    """
    shrink_a_lot = tf.reduce_max(tf.shape(image)[:2]) > 2 * size
    resized = tf.cond(
        shrink_a_lot,
        lambda: tf.image.resize(image, [size, size], method="bilinear", antialias=True),
        lambda: tf.image.resize(image, [size, size], method="bilinear"),
    )
    resized.set_shape([size, size, image.shape[-1]])
    return resized


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """The central ``size`` x ``size`` square."""
    shape = tf.shape(image)
    top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
    return tf.image.crop_to_bounding_box(image, top, left, size, size)


def random_crop(image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
    """A uniformly placed ``size`` x ``size`` crop."""
    return tf.image.stateless_random_crop(image, [size, size, tf.shape(image)[-1]], seed)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Horizontal mirror with probability 0.5."""
    return tf.image.stateless_random_flip_left_right(image, seed)


def pca_lighting(
    image: tf.Tensor,
    seed: tf.Tensor,
    std: float = 0.1,
    eigval=IMAGENET_EIGVAL,
    eigvec=IMAGENET_EIGVEC,
) -> tf.Tensor:
    """AlexNet's colour noise: adds ``sum_i alpha_i * lambda_i * p_i``, alpha_i ~ N(0, std), to every pixel."""
    alpha = tf.random.stateless_normal([3], seed, stddev=std)
    shift = tf.linalg.matvec(tf.constant(eigvec, tf.float32), alpha * tf.constant(eigval, tf.float32))
    return image + shift


def photometric_distort(
    image: tf.Tensor,
    seed: tf.Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.0,
) -> tf.Tensor:
    """Random brightness, contrast, saturation (and hue) on a [0, 1] image, clipped back to [0, 1]."""
    seeds = split_seed(seed, 4)
    image = tf.image.stateless_random_brightness(image, brightness, seeds[0])
    image = tf.image.stateless_random_contrast(image, 1 - contrast, 1 + contrast, seeds[1])
    image = tf.image.stateless_random_saturation(image, 1 - saturation, 1 + saturation, seeds[2])
    if hue:
        image = tf.image.stateless_random_hue(image, hue, seeds[3])
    return tf.clip_by_value(image, 0.0, 1.0)


def sample_inception_box(
    image_shape: tf.Tensor, seed: tf.Tensor, area=(0.08, 1.0), aspect=(3 / 4, 4 / 3)
) -> tuple[tf.Tensor, tf.Tensor]:
    """(offset, size) of a random crop covering ``area`` of the image at aspect ratio ``aspect``.

    After 10 failed attempts the whole image is used (as TensorFlow's sampler does).
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=aspect,
        area_range=area,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin[:2], size[:2]


def decode_and_inception_crop(image_bytes: tf.Tensor, seed: tf.Tensor, area=(0.08, 1.0), aspect=(3 / 4, 4 / 3)):
    """Random-sized crop taken while decoding: JPEGs decode only the crop window (fused op)."""

    def jpeg():
        shape = tf.image.extract_jpeg_shape(image_bytes)
        offset, size = sample_inception_box(shape, seed, area, aspect)
        window = tf.concat([offset, size], axis=0)
        return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

    def other():
        image = decode(image_bytes)
        offset, size = sample_inception_box(tf.shape(image), seed, area, aspect)
        return tf.slice(image, tf.concat([offset, [0]], 0), tf.concat([size, [3]], 0))

    image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def rescaled_crop_window(
    image_shape: tf.Tensor, size: int, short_side, seed: tf.Tensor | None = None, center_square: bool = False
) -> tf.Tensor:
    """The window [top, left, side, side] of the original image that "rescale the shorter side to
    ``short_side``, then take a ``size`` crop" keeps.

    The crop is random when ``seed`` is given, else central; with ``center_square`` it is drawn
    inside the central square (AlexNet's 256x256 centre before its random crop).
    """
    h, w = tf.cast(image_shape[0], tf.float32), tf.cast(image_shape[1], tf.float32)
    short = tf.minimum(h, w)
    side = tf.minimum(short, tf.round(size * short / tf.cast(short_side, tf.float32)))
    area_h, area_w = (short, short) if center_square else (h, w)
    base_top, base_left = (h - area_h) / 2, (w - area_w) / 2
    if seed is None:
        fractions = tf.constant([0.5, 0.5])
    else:
        fractions = tf.random.stateless_uniform([2], seed)
    top = tf.floor(base_top + fractions[0] * (area_h - side))
    left = tf.floor(base_left + fractions[1] * (area_w - side))
    return tf.cast(tf.stack([top, left, side, side]), tf.int32)


def decode_and_rescaled_crop(
    image_bytes: tf.Tensor, size: int, short_side, seed: tf.Tensor | None = None, center_square: bool = False
) -> tf.Tensor:
    """Rescale-then-crop done as crop-then-rescale: decodes only the window (fused for JPEGs) and
    resizes it to ``size`` x ``size``. Returns float32 on the [0, 255] scale."""

    def window_of(shape):
        return rescaled_crop_window(shape, size, short_side, seed, center_square)

    def jpeg():
        return tf.image.decode_and_crop_jpeg(image_bytes, window_of(tf.image.extract_jpeg_shape(image_bytes)), channels=3)

    def other():
        image = decode(image_bytes)
        top, left, height, width = tf.unstack(window_of(tf.shape(image)))
        return tf.image.crop_to_bounding_box(image, top, left, height, width)

    crop = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
    crop.set_shape([None, None, 3])
    return resize_square(crop, size)


def random_method_resize(image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
    """Resize to ``size`` x ``size`` with an interpolation drawn from bilinear/area/nearest/bicubic."""
    index = tf.random.stateless_uniform([], seed, maxval=len(RESIZE_METHODS), dtype=tf.int32)
    branches = [lambda m=m: tf.image.resize(image, [size, size], method=m) for m in RESIZE_METHODS]
    resized = tf.switch_case(index, branches)
    resized.set_shape([size, size, 3])
    return resized


def to_pixels(image: tf.Tensor) -> tf.Tensor:
    """A [0, 1] float image to rounded uint8 [0, 255], the form batches cross to the device in."""
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)
