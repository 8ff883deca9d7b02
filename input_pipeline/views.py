"""Test-time views of one image for the papers' evaluation protocols.

Each function takes a decoded image (HxWx3, uint8 or float) and returns float32 views on the
same scale as its input, stacked on a new leading axis (``dense_views`` returns a list, since its
views have different shapes). ``augment.to_pixels(view / 255)`` turns them into uint8; the jitted steps
normalise on the device (``train.steps.normalize_images``).
"""

from __future__ import annotations

import tensorflow as tf

from input_pipeline import augment as aug


def _five_crops(image: tf.Tensor, size: int) -> list[tf.Tensor]:
    """Four corners and the centre of ``image``, each ``size`` x ``size``."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
    crops = [tf.image.crop_to_bounding_box(image, top, left, size, size) for top, left in corners]
    return crops + [aug.center_crop(image, size)]


def center_view(image: tf.Tensor, size: int = 224, resize: int = 256) -> tf.Tensor:
    """One view: shorter side to ``resize``, centre ``size`` crop. Shape (1, size, size, 3)."""
    image = aug.resize_short_side(tf.cast(image, tf.float32), resize)
    return aug.center_crop(image, size)[None]


def ten_crop(image: tf.Tensor, size: int = 224, resize: int = 256) -> tf.Tensor:
    """AlexNet's/ResNet's 10 views: 4 corners + centre of the rescaled image, and their mirrors."""
    image = aug.resize_short_side(tf.cast(image, tf.float32), resize)
    crops = tf.stack(_five_crops(image, size))
    return tf.concat([crops, tf.image.flip_left_right(crops)], axis=0)


def googlenet_144(image: tf.Tensor, size: int = 224, scales=(256, 288, 320, 352)) -> tf.Tensor:
    """GoogLeNet's 144 views: 4 scales x 3 squares x (4 corners, centre, whole square) x 2 mirrors.

    At each scale the shorter side is resized to it; the squares are the left, centre and right
    (or top, middle and bottom) squares of side ``scale``.
    """
    views = []
    for scale in scales:
        resized = aug.resize_short_side(tf.cast(image, tf.float32), scale)
        shape = tf.shape(resized)
        h, w = shape[0], shape[1]
        landscape = w >= h
        for position in range(3):
            start = tf.where(landscape, (w - scale) * position // 2, (h - scale) * position // 2)
            top, left = tf.where(landscape, 0, start), tf.where(landscape, start, 0)
            square = tf.image.crop_to_bounding_box(resized, top, left, scale, scale)
            views += _five_crops(square, size)
            views.append(tf.image.resize(square, [size, size], antialias=True))
    views = tf.stack(views)
    return tf.concat([views, tf.image.flip_left_right(views)], axis=0)


def dense_views(image: tf.Tensor, scales=(256, 384, 512)) -> list[tf.Tensor]:
    """VGG's dense evaluation input: the whole image at each scale Q (shorter side), and its mirror.

    Returns ``2 * len(scales)`` tensors of shape (1, H_q, W_q, 3); the network is applied fully
    convolutionally to each and the class score maps are averaged.
    """
    views = []
    for scale in scales:
        resized = aug.resize_short_side(tf.cast(image, tf.float32), scale)[None]
        views += [resized, tf.image.flip_left_right(resized)]
    return views
