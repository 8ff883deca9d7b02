"""Where examples come from: any tensorflow-datasets name, or a folder of images per class.

A :class:`Source` yields ``{"image": encoded bytes, "label": int64}`` for one process's shard, so
decoding (fused with cropping for JPEGs) happens in the augmentation recipes.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from typing import Callable

import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import digits

log = logging.getLogger(__name__)

DEFAULT_DATASET = digits.NAME
# Formats that tf.io.decode_image reads.
_DECODABLE = {"JPEG", "PNG", "GIF", "BMP"}


class DatasetNotReadyError(RuntimeError):
    """A data set that is not prepared (or not found); the message says how to prepare it."""


class BadImageError(ValueError):
    """An unreadable file in an image folder under ``strict=True``; the message names it."""


@dataclasses.dataclass(frozen=True)
class Source:
    """A split of a data set.

    Attributes:
      name: data set name (tfds name or folder path).
      split: split name.
      num_examples: examples in the whole split (all processes).
      class_names: label names, index = label.
      make: ``(process_index, process_count) -> tf.data.Dataset`` of that process's shard.
    """

    name: str
    split: str
    num_examples: int
    class_names: tuple[str, ...]
    make: Callable[[int, int], tf.data.Dataset]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)


def _how_to_prepare(builder: tfds.core.DatasetBuilder, data_dir: str) -> str:
    build = f"`tfds build {builder.name} --data_dir {data_dir}`"
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        manual_dir = os.path.join(data_dir, "downloads", "manual")
        return (f"put its files in {manual_dir} (see the tfds catalog page of {builder.name}), "
                f"then run {build}")
    return f"run {build}, or pass --download to let tfds fetch it (needs network)"


def tfds_source(name: str, split: str, data_dir: str | None = None, download: bool = False) -> Source:
    """A split of a tensorflow-datasets data set, e.g. ``imagenet2012``, ``imagenette``, ``cifar10``.

    Never downloads unless ``download=True`` (without a network tfds retries for minutes). The
    embedded ``flaxnets_digits`` is prepared on first use, offline.

    Raises:
      DatasetNotReadyError: unknown name, or not prepared in ``data_dir`` (within seconds).
    """
    data_dir = os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        close = difflib.get_close_matches(name, tfds.list_builders(), n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise DatasetNotReadyError(f"tensorflow-datasets has no data set {name!r}{hint}") from None
    if not builder.is_prepared():
        if download or name == digits.NAME:
            log.info("preparing %s in %s", name, data_dir)
            try:
                builder.download_and_prepare()
            except Exception:
                # Processes sharing data_dir may prepare it at once; one of them wins the rename.
                builder = tfds.builder(name, data_dir=data_dir)
                if not builder.is_prepared():
                    raise
        else:
            raise DatasetNotReadyError(
                f"data set {name!r} is not prepared in {data_dir}: {_how_to_prepare(builder, data_dir)}"
            )
    if split not in builder.info.splits:
        raise DatasetNotReadyError(f"{name} has no split {split!r}; it has {sorted(builder.info.splits)}")
    label = builder.info.features["label"]

    def make(process_index: int, process_count: int) -> tf.data.Dataset:
        shard = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
        ds = builder.as_dataset(split=shard, decoders={"image": tfds.decode.SkipDecoding()})
        return ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int64)})

    return Source(name, split, builder.info.splits[split].num_examples, tuple(label.names), make)


def _check_image(path: str) -> str | None:
    """None if ``path`` is an image TensorFlow decodes, else the reason it is not."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format not in _DECODABLE:
                return f"unsupported format {image.format}"
            image.verify()
            is_jpeg = image.format == "JPEG"
    except Exception as err:  # PIL raises many types for bad files
        return f"{type(err).__name__}: {err}"
    if is_jpeg:
        # verify() does not decode, so a cut-off JPEG passes it; its end-of-image marker is missing.
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 1024))
            if b"\xff\xd9" not in f.read():
                return "truncated JPEG (no end-of-image marker)"
    return None


def folder_source(root: str, split: str = "train", strict: bool = False) -> Source:
    """Images under ``root/<class name>/`` (classes sorted by name), any size and format TF decodes.

    Every file is checked once when the source is made: a corrupt or non-image file is skipped
    with a warning naming it, and a count at the end, or raises :class:`BadImageError` when
    ``strict``. Grayscale and RGBA images are converted to RGB when decoded.

    Raises:
      DatasetNotReadyError: ``root`` missing or without class folders.
    """
    if not os.path.isdir(root):
        raise DatasetNotReadyError(f"image folder {root!r} does not exist")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DatasetNotReadyError(f"image folder {root!r} has no class sub-folders (expected root/<class>/<image>)")
    paths, labels, skipped = [], [], 0
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        for file in sorted(os.listdir(folder)):
            path = os.path.join(folder, file)
            problem = _check_image(path)
            if problem is None:
                paths.append(path)
                labels.append(label)
            elif strict:
                raise BadImageError(f"{path}: {problem}")
            else:
                skipped += 1
                log.warning("skipping %s: %s", path, problem)
    if skipped:
        log.warning("skipped %d unreadable file(s) of %d in %s", skipped, skipped + len(paths), root)
    if not paths:
        raise DatasetNotReadyError(f"image folder {root!r} has no readable images")

    def make(process_index: int, process_count: int) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices((paths, labels)).shard(process_count, process_index)
        return ds.map(lambda p, y: {"image": tf.io.read_file(p), "label": tf.cast(y, tf.int64)})

    return Source(root, split, len(paths), tuple(classes), make)


def load_source(dataset: str = DEFAULT_DATASET, split: str = "train", data_dir: str | None = None,
                download: bool = False, strict: bool = False) -> Source:
    """A folder (a directory, or anything path-like) or a tfds name; see the two functions above."""
    if os.path.isdir(dataset) or os.sep in dataset or dataset.startswith((".", "~")):
        return folder_source(os.path.expanduser(dataset), split, strict=strict)
    return tfds_source(dataset, split, data_dir=data_dir, download=download)
