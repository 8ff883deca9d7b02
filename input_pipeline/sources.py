"""Where examples come from: any tensorflow-datasets name, or a folder of images per class
(``input_pipeline.folders``).

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
      make: ``(process_index, process_count, seed=None) -> tf.data.Dataset`` of that process's
        shard, read in a fixed order, or with its files (tfds shards, image files) in an order
        shuffled by ``seed``. A process reads only its own shard.
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

    def make(process_index: int, process_count: int, seed: int | None = None) -> tf.data.Dataset:
        # tfds turns the sub-split into file instructions: only this shard's records are read.
        shard = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
        read_config = tfds.ReadConfig(shuffle_seed=seed)
        ds = builder.as_dataset(split=shard, decoders={"image": tfds.decode.SkipDecoding()},
                                shuffle_files=seed is not None, read_config=read_config)
        return ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int64)})

    return Source(name, split, builder.info.splits[split].num_examples, tuple(label.names), make)


def load_source(dataset: str = DEFAULT_DATASET, split: str = "train", data_dir: str | None = None,
                download: bool = False, strict: bool = False) -> Source:
    """A folder (a directory, or anything path-like; see ``input_pipeline.folders``) or a tfds name."""
    if os.path.isdir(dataset) or os.sep in dataset or dataset.startswith((".", "~")):
        from input_pipeline.folders import folder_source  # it imports this module

        return folder_source(os.path.expanduser(dataset), split, strict=strict)
    return tfds_source(dataset, split, data_dir=data_dir, download=download)
