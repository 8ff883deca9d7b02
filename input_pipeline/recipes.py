"""The papers' training augmentations as named recipes, plus the plain evaluation transform.

A recipe maps encoded image bytes (JPEG, PNG, ...) and a stateless seed to a uint8 ``size`` x
``size`` x 3 image; the mean/std normalisation happens on the device, inside the jitted step. Pixel sizes are the papers' for 224 px crops (and larger); for
smaller crops (e.g. 32 px on the embedded digits) they scale in proportion. "Rescale, then crop"
is computed as "crop the matching window, then rescale it": the same crops, but a JPEG decodes only
that window (``augment.decode_and_rescaled_crop``). ``get_recipe(name)`` returns it; ``list_recipes()`` names them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import tensorflow as tf

from input_pipeline import augment as aug


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named training transform.

    Attributes:
      name: registry name.
      transform: ``(image_bytes, seed, size) -> uint8 image``.
      description: the paper's wording, for listings.
    """

    name: str
    transform: Callable[[tf.Tensor, tf.Tensor, int], tf.Tensor]
    description: str


def _scaled(pixels: int, size: int) -> int:
    """The paper's pixel size for 224 crops, scaled down in proportion for smaller crops."""
    return pixels if size >= 224 else max(size, round(pixels * size / 224))


def _scale_jittered_crop(image_bytes, size, scale, scale_seed, crop_seed) -> tf.Tensor:
    """Shorter side rescaled to S ~ U{scale} (scaled for small crops), then a random ``size`` crop."""
    low, high = _scaled(scale[0], size), _scaled(scale[1], size)
    return aug.decode_and_rescaled_crop(image_bytes, size, aug.sample_short_side(low, high, scale_seed), crop_seed)


def alexnet(image_bytes, seed, size: int = 224) -> tf.Tensor:
    """Short side 256, centre 256x256, random ``size`` crop (227 for the paper), flip, PCA lighting 0.1."""
    seeds = aug.split_seed(seed, 3)
    image = aug.decode_and_rescaled_crop(image_bytes, size, _scaled(256, size), seeds[0], center_square=True)
    image = aug.pca_lighting(aug.random_flip(image, seeds[1]) / 255.0, seeds[2])
    return aug.to_pixels(image)


def vgg(image_bytes, seed, size: int = 224, scale: tuple[int, int] = (256, 512)) -> tf.Tensor:
    """Isotropic rescale to S (fixed when ``scale[0] == scale[1]``, else S ~ U[256, 512]), crop, flip, RGB shift."""
    seeds = aug.split_seed(seed, 4)
    image = _scale_jittered_crop(image_bytes, size, scale, seeds[0], seeds[1])
    image = aug.random_flip(image, seeds[2])
    return aug.to_pixels(aug.pca_lighting(image / 255.0, seeds[3]))


def inception(image_bytes, seed, size: int = 224) -> tf.Tensor:
    """GoogLeNet: crop 8%-100% of the area at aspect 3/4-4/3, random interpolation, flip, photometric distortion."""
    seeds = aug.split_seed(seed, 4)
    image = aug.decode_and_inception_crop(image_bytes, seeds[0])
    image = aug.random_method_resize(aug.to_float(image), size, seeds[1])
    image = aug.random_flip(image, seeds[2])
    image = aug.photometric_distort(tf.clip_by_value(image, 0.0, 1.0), seeds[3], 0.4, 0.4, 0.4, 0.1)
    return aug.to_pixels(image)


def resnet(image_bytes, seed, size: int = 224) -> tf.Tensor:
    """ResNet: short side ~ U[256, 480], random crop, flip, colour jitter 0.4 and PCA lighting 0.1."""
    seeds = aug.split_seed(seed, 5)
    image = _scale_jittered_crop(image_bytes, size, (256, 480), seeds[0], seeds[1])
    image = aug.random_flip(image, seeds[2])
    image = aug.photometric_distort(tf.clip_by_value(image / 255.0, 0.0, 1.0), seeds[3])
    return aug.to_pixels(aug.pca_lighting(image, seeds[4]))


def inception_crop_flip(image_bytes, seed, size: int = 224) -> tf.Tensor:
    """The standard modern recipe: random-sized crop (fused with JPEG decoding), bilinear resize, flip."""
    seeds = aug.split_seed(seed, 2)
    image = aug.decode_and_inception_crop(image_bytes, seeds[0])
    image = aug.resize_square(aug.to_float(image), size)
    return aug.to_pixels(aug.random_flip(image, seeds[1]))


def scale_crop(image_bytes, seed, size: int = 224) -> tf.Tensor:
    """Light, mirror-free augmentation (digits, text): shorter side S ~ U[size, 8/7 size], random crop."""
    seeds = aug.split_seed(seed, 2)
    short_side = aug.sample_short_side(size, round(size * 8 / 7), seeds[0])
    return aug.to_pixels(aug.decode_and_rescaled_crop(image_bytes, size, short_side, seeds[1]) / 255.0)


def evaluation(image_bytes, seed=None, size: int = 224, crop_fraction: float = 0.875) -> tf.Tensor:
    """Plain eval transform: short side to ``size / crop_fraction`` (256 for 224), centre ``size`` crop."""
    image = aug.decode_and_rescaled_crop(image_bytes, size, size / crop_fraction)
    return aug.to_pixels(image / 255.0)


_RECIPES = {
    r.name: r
    for r in (
        Recipe("alexnet", alexnet, "AlexNet: 256 centre, random crop, flip, PCA lighting"),
        Recipe("vgg", vgg, "VGG: scale jitter S~U[256,512], random crop, flip, RGB colour shift"),
        Recipe("inception", inception, "GoogLeNet: 8-100% area crops, random interpolation, photometric"),
        Recipe("resnet", resnet, "ResNet: short side U[256,480], crop, flip, colour augmentation"),
        Recipe("inception_crop_flip", inception_crop_flip, "random-sized crop + flip (modern default)"),
        Recipe("scale_crop", scale_crop, "light scale jitter and random crop, no flip (digits, text)"),
        Recipe("eval", evaluation, "resize to size/0.875 and centre crop"),
    )
}


def list_recipes() -> list[str]:
    """Names of the augmentation recipes."""
    return sorted(_RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; an unknown name raises ``KeyError`` listing the known ones."""
    if name not in _RECIPES:
        raise KeyError(f"unknown augmentation recipe {name!r}; known: {', '.join(list_recipes())}")
    return _RECIPES[name]
