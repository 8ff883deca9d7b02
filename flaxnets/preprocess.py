"""Feeding pretrained weights what they were trained on, and reading their predictions.

``preprocess(images, "resnet50")`` applies the evaluation transform of the weights'
:class:`~flaxnets.weights_table.Preprocessing`; ``decode_predictions(logits)`` names the top
ImageNet classes.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxnets.weights_table import Preprocessing, Weights, weights_info

_METHODS = {"bilinear": "linear", "bicubic": "cubic", "nearest": "nearest"}


def preprocess(images, weights: str | Weights | Preprocessing, tag: str | None = None) -> jax.Array:
    """Resizes, centre-crops and normalises images as the weights' evaluation did.

    Args:
      images: one image ``(H, W, 3)`` or a batch ``(N, H, W, 3)``, RGB, either uint8 in [0, 255]
        or float in [0, 1]; any size.
      weights: a model name (its default weights), ``"model.tag"``, a :class:`Weights` entry or a
        :class:`Preprocessing`.
      tag: the weights' tag when ``weights`` is a model name.

    Returns:
      float32 ``(N, crop, crop, 3)`` (or ``(crop, crop, 3)`` for one image), ready for ``model.apply``.

    Raises:
      ValueError: images that are not ``(..., H, W, 3)``.
    """
    spec = _preprocessing(weights, tag)
    images = jnp.asarray(images)
    single = images.ndim == 3
    if images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f"preprocess expects RGB images shaped (H, W, 3) or (N, H, W, 3), got {images.shape}"
                         + ("; NCHW? transpose with x.transpose(0, 2, 3, 1)" if images.ndim == 4 and
                            images.shape[1] == 3 else ""))
    batch = images[None] if single else images
    scale = 255.0 if jnp.issubdtype(batch.dtype, jnp.integer) else 1.0
    out = _transform(batch.astype(jnp.float32) / scale, spec)
    return out[0] if single else out


def _preprocessing(weights: str | Weights | Preprocessing, tag: str | None) -> Preprocessing:
    if isinstance(weights, Preprocessing):
        return weights
    if isinstance(weights, Weights):
        return weights.preprocessing
    return weights_info(weights, tag).preprocessing


@functools.partial(jax.jit, static_argnums=1)
def _transform(batch: jax.Array, spec: Preprocessing) -> jax.Array:
    n, height, width, _ = batch.shape
    ratio = spec.resize / min(height, width)
    new_h, new_w = max(spec.crop, round(height * ratio)), max(spec.crop, round(width * ratio))
    # Antialiased like torchvision's PIL-style resize, so downscaled photos do not alias.
    resized = jax.image.resize(batch, (n, new_h, new_w, 3), _METHODS[spec.interpolation], antialias=True)
    top, left = (new_h - spec.crop) // 2, (new_w - spec.crop) // 2
    crop = resized[:, top:top + spec.crop, left:left + spec.crop]
    return (crop - jnp.asarray(spec.mean)) / jnp.asarray(spec.std)


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, in the order of the models' logits."""
    with open(os.path.join(os.path.dirname(__file__), "imagenet_classes.txt")) as f:
        return tuple(line.rstrip("\n") for line in f)


def decode_predictions(logits, top: int = 5, classes: Sequence[str] | None = None) -> list[list[tuple[int, str, float]]]:
    """The ``top`` most probable classes of each row of ``logits``: ``[(index, name, probability), ...]``.

    ``classes`` names the outputs (default: the ImageNet-1k names, for 1000 logits).

    Raises:
      ValueError: logits that are not ``(N, C)`` or ``(C,)``, or class names of another count.
    """
    logits = np.asarray(logits, np.float32)
    if logits.ndim == 1:
        logits = logits[None]
    if logits.ndim != 2:
        raise ValueError(f"decode_predictions expects logits shaped (N, classes), got {logits.shape}")
    names = imagenet_classes() if classes is None else tuple(classes)
    if len(names) != logits.shape[1]:
        raise ValueError(f"{logits.shape[1]} logits per row but {len(names)} class names; pass classes=")
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1)[:, :top]
    return [[(int(i), names[i], float(row[i])) for i in row_order] for row, row_order in zip(probs, order)]
