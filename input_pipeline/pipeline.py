"""Batches for training and evaluation: per-process shards, parallel augmentation, global arrays.

``make_dataset`` builds the ``tf.data`` pipeline of one JAX process (by default it reads only that
process's share of the records); ``global_batches`` turns its uint8 NumPy batches into
``jax.Array`` s sharded over a device mesh's ``data`` axis and keeps a few batches in flight on
the devices.
"""

from __future__ import annotations

import collections
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf

from input_pipeline.recipes import get_recipe
from input_pipeline.sources import Source


INPUT_ORDERS = ("per_host", "global")


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
    input_order: str = "per_host",
    skip_batches: int = 0,
    shuffle_buffer: int = 10_000,
    cache: bool = False,
    deterministic: bool = True,
    threads: int | None = None,
    ram_budget_gb: float | None = None,
    eval_crop_fraction: float = 0.875,
) -> tf.data.Dataset:
    """This process's batches of ``{"image": uint8 NHWC, "label": int32[, "mask": bool]}``.

    Images stay uint8 until they are on the device: the jitted steps normalise them
    (``train.steps.normalize_images``), so a batch crosses to the device at a quarter of the
    bytes of float32.

    Args:
      source: from ``input_pipeline.sources``.
      batch_size: the global batch size; each process gets ``batch_size // process_count``.
      train: shuffled, repeated forever, augmented with ``recipe``, incomplete batches dropped.
        Otherwise one pass in order with the eval transform, the last batch padded and
        ``mask`` marking the real examples; every process yields the same number of batches.
      recipe: training augmentation (``input_pipeline.recipes.list_recipes()``).
      image_size: output height and width.
      seed: seeds the shuffle and every augmentation; the same seed gives the same batches.
      process_index / process_count: this process's shard (default: JAX's).
      input_order: training only. ``"per_host"`` (default): each process reads only its own
        1/process_count of the records (its files or tfds shards), in its own shuffled order;
        deterministic for a given topology and seed. ``"global"``: every process reads all
        records in one shared order and keeps its rows of each global batch, so global batch k is
        the same on any number of processes (for small data and topology comparisons; with N
        processes the cluster reads the data N times).
      skip_batches: training only: start after this many of this process's batches, for a
        mid-epoch resume. The skipped records are read but not decoded or augmented, and every
        later batch equals the uninterrupted run's.
      shuffle_buffer: examples in the shuffle buffer (after the source's own file-order shuffle).
      cache: keep the encoded examples in memory after the first pass.
      deterministic: keep the order fixed under parallel decoding (turn off for speed where
        exactness does not matter).
      threads: size of this dataset's private thread pool (default: tf.data's, one per core).
      ram_budget_gb: cap on the memory tf.data's autotuner may use for buffers.
      eval_crop_fraction: evaluation resizes to ``image_size / eval_crop_fraction`` then centre-crops.

    Raises:
      ValueError: a batch size that the processes cannot share evenly, or an unknown input order.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise ValueError(f"global batch size {batch_size} is not divisible by {process_count} processes")
    if input_order not in INPUT_ORDERS:
        raise ValueError(f"input order must be one of {', '.join(INPUT_ORDERS)}; got {input_order!r}")
    local_batch = batch_size // process_count
    if train:
        ds = _training_examples(source, recipe, image_size, seed, process_index, process_count, input_order,
                                skip_batches * local_batch, shuffle_buffer, cache, deterministic)
        ds = ds.batch(local_batch, drop_remainder=True)
    else:
        ds = _evaluation_batches(source, image_size, process_index, process_count, local_batch, cache,
                                 eval_crop_fraction)
    options = tf.data.Options()
    options.deterministic = deterministic
    options.experimental_optimization.map_parallelization = True
    if threads is not None:
        options.threading.private_threadpool_size = threads
    if ram_budget_gb is not None:
        options.autotune.ram_budget = int(ram_budget_gb * 2**30)
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _training_examples(source, recipe, image_size, seed, process_index, process_count, input_order,
                       skip_examples, shuffle_buffer, cache, deterministic) -> tf.data.Dataset:
    """This process's augmented uint8 training examples, repeated forever."""
    per_host = input_order == "per_host"
    # Per host, the shard's seed depends on the process (process 0 keeps ``seed``, so one
    # process reads exactly as in the global order).
    shuffle_seed = seed + (process_index << 32) if per_host else seed
    ds = source.make(process_index, process_count, shuffle_seed) if per_host else source.make(0, 1, seed)
    if cache:
        ds = ds.cache()
    ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True).repeat()
    # Every example's augmentation seed comes from its index in the stream (the global one in the
    # global order), so the skipped prefix of a resume need not be decoded.
    ds = ds.enumerate()
    if per_host:
        ds = ds.skip(skip_examples)
    else:
        ds = ds.skip(skip_examples * process_count).shard(process_count, process_index)
    transform = get_recipe(recipe).transform
    base = tf.constant([seed, process_index if per_host else 0], tf.int64)

    def prepare(index, example):
        element_seed = tf.random.experimental.stateless_fold_in(base, index)
        image = transform(example["image"], element_seed, image_size)
        return {"image": image, "label": tf.cast(example["label"], tf.int32)}

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    # Anything that fails to decode is logged and skipped rather than ending the run mid-epoch.
    return ds.ignore_errors(log_warning=True)


def _evaluation_batches(source, image_size, process_index, process_count, local_batch, cache,
                        eval_crop_fraction) -> tf.data.Dataset:
    """This process's share of one pass, padded so every process yields the same number of batches."""
    ds = source.make(process_index, process_count)
    if cache:
        ds = ds.cache()
    eval_transform = get_recipe("eval").transform

    def prepare(example):
        image = eval_transform(example["image"], None, image_size, eval_crop_fraction)
        return {"image": image, "label": tf.cast(example["label"], tf.int32), "mask": True}

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors(log_warning=True).batch(local_batch).map(lambda b: pad_batch(b, local_batch))
    # The steps are collective: pad with fully masked batches up to the count of the largest shard.
    largest_shard = -(-source.num_examples // process_count)
    num_batches = -(-largest_shard // local_batch)
    empty = {"image": tf.zeros([local_batch, image_size, image_size, 3], tf.uint8),
             "label": tf.zeros([local_batch], tf.int32), "mask": tf.zeros([local_batch], tf.bool)}
    return ds.concatenate(tf.data.Dataset.from_tensors(empty).repeat()).take(num_batches)


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
