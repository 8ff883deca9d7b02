"""The papers' test protocols: which views of each image a model sees, and how scores are combined.

Every protocol turns one encoded image into views (``input_pipeline.views``), runs the model on
each, and averages the softmax probabilities over the views (never the logits). Sizes are given
for a 224 px model and scaled to the model's own training resolution. Published weights bring
their own centre-crop resize (torchvision's V2 weights: 232 for a 224 crop), which the centre
protocol takes (``Protocol.scales(..., resize=)``), and their own mean/std, which
:func:`crop_probabilities` takes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import tensorflow as tf

from flaxnets.layers import IMAGENET_MEAN, IMAGENET_STD
from input_pipeline import augment as aug
from input_pipeline import views
from train.steps import normalize_images


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A test protocol.

    Attributes:
      name: command-line name.
      description: what it does and whose paper it comes from.
      make_views: ``(encoded image, size, scales) -> views``: a (V, size, size, 3) tensor, or for
        ``dense`` a list of (1, H, W, 3) tensors of different shapes; on the 0-255 scale.
      default_scales: the paper's shorter-side sizes for a 224 px model (empty when unused).
      jittered_scales: the sizes for a model trained with scale jitter, where the paper differs.
      dense: the views are whole images that the model scores fully convolutionally.
      own_resize: weights published with their own evaluation resize use it as this protocol's
        shorter side (the centre crop, the protocol publishers report).
    """

    name: str
    description: str
    make_views: Callable[..., tf.Tensor | list[tf.Tensor]]
    default_scales: tuple[int, ...] = ()
    jittered_scales: tuple[int, ...] = ()
    dense: bool = False
    own_resize: bool = False

    def scales(self, size: int, scales: tuple[int, ...] | None = None, jittered: bool = False,
               resize: int | None = None) -> tuple[int, ...]:
        """The shorter-side sizes for a ``size`` px model: ``scales`` if given, else the weights' own
        ``resize`` where this protocol takes it (``own_resize``), else the paper's, rescaled."""
        if scales:
            return tuple(scales)
        if resize is not None and self.own_resize:
            return (resize,)
        paper = self.jittered_scales if jittered and self.jittered_scales else self.default_scales
        return tuple(round(q * size / 224) for q in paper)

    @functools.lru_cache(maxsize=None)  # it builds the views of a blank image; asked for per member
    def num_views(self, size: int = 224, scales: tuple[int, ...] = ()) -> int:
        """Views per image at the given scales (the paper's for a fixed-scale model when empty)."""
        image = tf.io.encode_png(tf.zeros([size * 5 // 4, size * 3 // 2, 3], tf.uint8))
        out = self.make_views(image, size, scales or self.scales(size))
        return len(out) if isinstance(out, list) else int(out.shape[0])


def _center(image_bytes, size, scales):
    # The transform of the evaluation during training, so that both report the same figure; the
    # shorter side is size / 0.875 unless given (--scales, or published weights' own resize).
    return aug.decode_and_rescaled_crop(image_bytes, size, scales[0] if scales else size / 0.875)[None]


def _ten_crop(image_bytes, size, scales):
    return views.ten_crop(aug.decode(image_bytes), size, scales[0])


def _googlenet(image_bytes, size, scales):
    return views.googlenet_144(aug.decode(image_bytes), size, scales)


def _dense(image_bytes, size, scales):
    return views.dense_views(aug.decode(image_bytes), scales)


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("center", "one centre crop of the image resized to size/0.875 (the training-time eval), or to "
                           "published weights' own resize", _center, own_resize=True),
        Protocol("10crop", "AlexNet/ResNet: 4 corners + centre of the image at 256, and their mirrors",
                 _ten_crop, (256,)),
        Protocol("144crop", "GoogLeNet: 4 scales x 3 squares x (5 crops + the square) x 2 mirrors",
                 _googlenet, (256, 288, 320, 352)),
        # VGG tests a model trained at a fixed scale S (256 for 224 crops) at Q = S-32, S, S+32,
        # and one trained with S jittered in [256, 512] at Q = 256, 384, 512.
        Protocol("dense", "VGG: the whole image at 3 scales (Q = S-32, S, S+32, or 256/384/512 after scale "
                          "jitter) and mirrored, scored fully convolutionally",
                 _dense, (224, 256, 288), (256, 384, 512), dense=True),
    )
}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; raises ``KeyError`` listing the valid names."""
    if name not in PROTOCOLS:
        raise KeyError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def pixel_views(protocol: Protocol, image_bytes: tf.Tensor, size: int, scales: tuple[int, ...]):
    """The protocol's views of one encoded image as uint8 pixels (normalised later, on the device)."""
    out = protocol.make_views(image_bytes, size, scales)
    if isinstance(out, list):
        return [aug.to_pixels(view / 255.0) for view in out]
    return aug.to_pixels(out / 255.0)


def mean_probabilities(logits: jax.Array, axis: int) -> jax.Array:
    """Softmax over classes, then the mean over ``axis`` (views or models): probabilities, not logits."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).mean(axis=axis)


def crop_probabilities(model: nn.Module, variables, views_batch: jax.Array, mean=IMAGENET_MEAN,
                       std=IMAGENET_STD) -> jax.Array:
    """(B, V, H, W, 3) uint8 (or normalised) views -> (B, classes) probabilities averaged over each image's V views.

    uint8 views are normalised with the weights' ``mean``/``std`` (per RGB channel, on the [0, 1] scale).
    """
    b, v = views_batch.shape[:2]
    views = normalize_images(views_batch.reshape(b * v, *views_batch.shape[2:]), mean, std)
    logits = model.apply(variables, views, train=False)
    return mean_probabilities(logits.reshape(b, v, -1), axis=1)


def dense_probabilities(apply: Callable, variables, scale_views: list[jax.Array]) -> jax.Array:
    """Probabilities of one image from its dense views (a list of (n, H, W, 3), sizes differing).

    ``apply(variables, images)`` gives the class scores of whole images, e.g. a jitted
    ``functools.partial(flaxnets.dense_logits, model)``.
    """
    logits = jnp.concatenate([apply(variables, views) for views in scale_views])
    return mean_probabilities(logits, axis=0)
