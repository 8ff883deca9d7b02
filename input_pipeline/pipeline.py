"""Batches for training and evaluation: per-process shards, parallel augmentation, global arrays.

``make_dataset`` builds the ``tf.data`` pipeline of one JAX process; ``global_batches`` turns its
NumPy batches into ``jax.Array`` s sharded over a device mesh's ``data`` axis and keeps a few
batches in flight on the devices.
"""

from __future__ import annotations

import collections
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf

from input_pipeline.recipes import get_recipe
from input_pipeline.sources import Source


def make_dataset(
    source: Source,
    *,
    batch_size: int,
    train: bool,
    recipe: str = "inception_crop_flip",
    image_size: int = 224,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    shuffle_buffer: int = 10_000,
    cache: bool = False,
    deterministic: bool = True,
    eval_crop_fraction: float = 0.875,
) -> tf.data.Dataset:
    """This process's batches of ``{"image": float32 NHWC, "label": int32[, "mask": bool]}``.

    Args:
      source: from ``input_pipeline.sources``.
      batch_size: the global batch size; each process gets ``batch_size // process_count``.
      train: shuffled, repeated forever, augmented with ``recipe``, incomplete batches dropped.
        Otherwise one pass in order with the eval transform, the last batch padded and
        ``mask`` marking the real examples; every process yields the same number of batches.
      recipe: training augmentation (``input_pipeline.recipes.list_recipes()``).
      image_size: output height and width.
      seed: seeds the shuffle and every augmentation; the same seed gives the same batches.
      process_index / process_count: this process's shard (default: JAX's). Training batches are
        the same global batches on any number of processes; evaluation splits the files.
      shuffle_buffer: examples in the shuffle buffer.
      cache: keep the encoded examples in memory after the first pass.
      deterministic: keep the order fixed under parallel decoding (slightly slower).
      eval_crop_fraction: evaluation resizes to ``image_size / eval_crop_fraction`` then centre-crops.

    Raises:
      ValueError: a batch size that the processes cannot share evenly.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise ValueError(f"global batch size {batch_size} is not divisible by {process_count} processes")
    local_batch = batch_size // process_count
    if train:
        # Every process shuffles the whole split with the same seed and keeps every
        # process_count-th example: global batch k holds the same examples whatever the number of
        # processes, so training follows the same trajectory on any topology. Each process
        # decodes and augments only its own examples (it reads all records, a cheap part).
        ds = source.make(0, 1)
        if cache:
            ds = ds.cache()
        transform = get_recipe(recipe).transform
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
        base = tf.constant([seed, 0], tf.int64)

        def prepare(index, example):
            element_seed = tf.random.experimental.stateless_fold_in(base, index)  # the global index
            image = transform(example["image"], element_seed, image_size)
            return {"image": image, "label": tf.cast(example["label"], tf.int32)}

        ds = ds.enumerate().shard(process_count, process_index)
        ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
        # Sources check their files up front; anything that still fails to decode is logged and
        # skipped rather than ending the run mid-epoch.
        ds = ds.ignore_errors(log_warning=True).batch(local_batch, drop_remainder=True)
    else:
        ds = source.make(process_index, process_count)
        if cache:
            ds = ds.cache()
        eval_transform = get_recipe("eval").transform

        def prepare(example):
            image = eval_transform(example["image"], None, image_size, eval_crop_fraction)
            return {"image": image, "label": tf.cast(example["label"], tf.int32), "mask": True}

        ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.ignore_errors(log_warning=True).batch(local_batch).map(lambda b: pad_batch(b, local_batch))
        # Every process must yield the same number of batches (the steps are collective): pad
        # with fully masked batches up to the count of the largest shard.
        largest_shard = -(-source.num_examples // process_count)
        num_batches = -(-largest_shard // local_batch)
        empty = {"image": tf.zeros([local_batch, image_size, image_size, 3]),
                 "label": tf.zeros([local_batch], tf.int32), "mask": tf.zeros([local_batch], tf.bool)}
        ds = ds.concatenate(tf.data.Dataset.from_tensors(empty).repeat()).take(num_batches)
    options = tf.data.Options()
    options.deterministic = deterministic
    options.experimental_optimization.map_parallelization = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def pad_batch(batch: dict, size: int) -> dict:
    """Pads an incomplete evaluation batch to ``size``; padded examples have ``mask`` False."""
    missing = size - tf.shape(batch["label"])[0]

    def pad(x):
        return tf.pad(x, [[0, missing]] + [[0, 0]] * (len(x.shape) - 1))

    return {key: pad(value) for key, value in batch.items()}


def global_batches(
    dataset: tf.data.Dataset, sharding: jax.sharding.Sharding, prefetch: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Global ``jax.Array`` batches from each process's local batches, ``prefetch`` kept in flight.

    ``sharding`` is typically ``NamedSharding(mesh, PartitionSpec("data"))``: the leading axis is
    split over the devices, each process contributing its local rows.
    """
    queue: collections.deque = collections.deque()

    def put(local):
        return {
            key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local.items()
        }

    for local in dataset.as_numpy_iterator():
        queue.append(put(local))
        if len(queue) > prefetch:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
