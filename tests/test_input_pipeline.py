"""make_dataset and global_batches: batches, determinism, complete evaluation, process shards."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from input_pipeline.pipeline import make_dataset
from input_pipeline.sources import load_source


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return {split: load_source("flaxnets_digits", split, data_dir=data_dir) for split in ("train", "test")}


def _first(ds, n=2):
    return list(ds.take(n).as_numpy_iterator())


def test_training_batches_are_deterministic_per_seed(digits):
    make = lambda seed: make_dataset(digits["train"], batch_size=16, train=True, recipe="inception",
                                     image_size=32, seed=seed, process_index=0, process_count=1)
    a, b, c = _first(make(0)), _first(make(0)), _first(make(1))
    assert a[0]["image"].shape == (16, 32, 32, 3) and a[0]["image"].dtype == np.uint8
    assert a[0]["label"].dtype == np.int32
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_evaluation_covers_every_example_once(digits):
    ds = make_dataset(digits["test"], batch_size=64, train=False, image_size=32, process_index=0, process_count=1)
    batches = list(ds.as_numpy_iterator())
    assert all(b["image"].shape == (64, 32, 32, 3) for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])[mask]
    expected = [e["label"] for e in digits["test"].make(0, 1).as_numpy_iterator()]
    assert mask.sum() == 360 and np.array_equal(labels, expected)


def _real_rows(source, process_index, process_count):
    """The real (unpadded) eval images of one process, one flattened row each."""
    ds = make_dataset(source, batch_size=64, train=False, image_size=16,
                      process_index=process_index, process_count=process_count)
    rows = []
    for batch in ds.as_numpy_iterator():
        assert batch["image"].shape[0] == 64 // process_count  # this process's share
        rows.append(batch["image"][batch["mask"]].reshape(int(batch["mask"].sum()), -1))
    return np.concatenate(rows)


def test_process_shards_are_disjoint_and_complete(digits):
    shards = [_real_rows(digits["test"], i, 2) for i in range(2)]
    whole = _real_rows(digits["test"], 0, 1)
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    # As multisets, the two shards together are exactly one full pass.
    together = np.concatenate(shards)
    np.testing.assert_array_equal(np.unique(together, axis=0, return_counts=True)[1].sum(), 360)
    order = lambda rows: rows[np.lexsort(rows.T[::-1])]
    np.testing.assert_array_equal(order(together), order(whole))


def test_training_global_batches_are_identical_on_any_process_count(digits):
    """Process i of n holds rows i, i+n, ... of each global batch, bit for bit, augmentation included."""
    make = lambda index, count: _first(make_dataset(
        digits["train"], batch_size=16, train=True, recipe="resnet", image_size=16, seed=3,
        process_index=index, process_count=count, input_order="global"), n=3)
    whole = make(0, 1)
    for count in (2, 4):
        shards = [make(index, count) for index in range(count)]
        for step, batch in enumerate(whole):
            for index, shard in enumerate(shards):
                assert shard[step]["image"].shape == (16 // count, 16, 16, 3)
                np.testing.assert_array_equal(shard[step]["image"], batch["image"][index::count])
                np.testing.assert_array_equal(shard[step]["label"], batch["label"][index::count])


def _one_image_per_class(tmp_path, count):
    """A folder source of ``count`` classes holding one distinct image each: label = identity."""
    from PIL import Image

    for k in range(count):
        (tmp_path / f"c{k:03d}").mkdir()
        Image.fromarray(np.full((8, 8, 3), k, np.uint8)).save(tmp_path / f"c{k:03d}" / "x.png")
    return load_source(str(tmp_path))


def test_per_host_reading_splits_each_epoch_into_disjoint_shares(tmp_path):
    """By default process i of n reads only its own records: disjoint, and together the epoch."""
    source = _one_image_per_class(tmp_path, 24)
    epoch = lambda index, count, seed=0: np.concatenate([b["label"] for b in make_dataset(
        source, batch_size=8, train=True, recipe="scale_crop", image_size=8, seed=seed, shuffle_buffer=64,
        process_index=index, process_count=count).take(24 // 8).as_numpy_iterator()])
    for count in (2, 4):
        shares = [epoch(index, count) for index in range(count)]
        assert all(len(share) == 24 // count for share in shares)
        assert sorted(np.concatenate(shares).tolist()) == list(range(24)), count
    np.testing.assert_array_equal(epoch(1, 2), epoch(1, 2))  # deterministic for a topology and seed
    assert not np.array_equal(epoch(1, 2), epoch(1, 2, seed=1))
    assert not np.array_equal(epoch(0, 2), np.sort(epoch(0, 2)))  # shuffled


@pytest.mark.parametrize("order", ["per_host", "global"])
def test_mid_epoch_resume_continues_exactly_without_decoding_the_skipped_batches(order, digits, monkeypatch):
    make = lambda skip: make_dataset(digits["train"], batch_size=8, train=True, recipe="resnet", image_size=16,
                                     seed=5, process_index=1, process_count=2, input_order=order, skip_batches=skip)
    whole = _first(make(0), n=5)
    for a, b in zip(whole[3:], _first(make(3), n=2)):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])

    import tensorflow as tf

    from input_pipeline import pipeline
    from input_pipeline.recipes import Recipe
    from input_pipeline.sources import Source

    decoded = []
    spy = Recipe("spy", lambda image, seed, size: tf.py_function(
        lambda b: decoded.append(int(b.numpy())) or np.zeros((size, size, 3), np.uint8), [image], tf.uint8), "")
    monkeypatch.setattr(pipeline, "get_recipe", lambda name: spy)
    numbered = Source("numbered", "train", 400, ("a",), lambda i, n, seed=None: tf.data.Dataset.from_tensor_slices(
        {"image": [str(k).encode() for k in range(i, 400, n)], "label": [0] * len(range(i, 400, n))}))
    ds = make_dataset(numbered, batch_size=8, train=True, image_size=4, process_index=1, process_count=2,
                      input_order=order, skip_batches=10, shuffle_buffer=1)
    next(iter(ds))
    # This process's 10 skipped batches of 4 are records 1, 3, ..., 79 in both orders: none was decoded.
    assert min(decoded) == 81, sorted(decoded)[:5]


def test_an_undecodable_example_is_skipped_not_fatal(tmp_path):
    from PIL import Image

    from input_pipeline.sources import Source

    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    data = [good.read_bytes(), b"garbage", good.read_bytes()]
    import tensorflow as tf

    source = Source("mem", "train", 3, ("a",), lambda i, n: tf.data.Dataset.from_tensor_slices(
        {"image": data, "label": [0, 0, 0]}))
    batches = list(make_dataset(source, batch_size=2, train=False, image_size=8,
                                process_index=0, process_count=1).as_numpy_iterator())
    assert sum(int(b["mask"].sum()) for b in batches) == 2


def test_batch_not_divisible_by_processes(digits):
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        make_dataset(digits["train"], batch_size=16, train=True, process_index=0, process_count=3)


def test_global_batches_are_sharded_over_devices(tmp_path):
    script = textwrap.dedent(f"""
        import numpy as np, jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from input_pipeline.pipeline import make_dataset, global_batches
        from input_pipeline.sources import load_source
        source = load_source("flaxnets_digits", "train", data_dir={str(tmp_path)!r})
        mesh = Mesh(np.array(jax.devices()), ("data",))
        ds = make_dataset(source, batch_size=8, train=True, image_size=16, recipe="resnet")
        batches = list(global_batches(ds.take(3), NamedSharding(mesh, P("data"))))
        image = batches[0]["image"]
        print(len(batches), image.shape, len(image.addressable_shards), image.addressable_shards[0].data.shape)
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "3 (8, 16, 16, 3) 4 (2, 16, 16, 3)"
