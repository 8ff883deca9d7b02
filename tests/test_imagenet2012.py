"""The ImageNet path end to end, offline: the real tfds ``imagenet2012`` builder prepares a tiny
manual download (see ``imagenet_layout``), then ``python -m train`` and ``python -m train.evaluate``
run on it with a 1000-class head."""

import collections
import json
import os
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline.sources import DatasetNotReadyError, load_source
from tests.imagenet_layout import make_manual_imagenet, prepare_imagenet2012

# Label indices (lines of tfds' imagenet2012/labels.txt) of the training classes, and the bundled
# labels of validation images 1..6 (sea snake, alp, Shetland sheepdog, spatula, cowboy hat, rock python).
TRAIN_LABELS = {"n01751748": 65, "n09193705": 970, "n02105855": 230}
VAL_LABELS = {
    "ILSVRC2012_val_00000001.JPEG": 65,
    "ILSVRC2012_val_00000002.JPEG": 970,
    "ILSVRC2012_val_00000003.JPEG": 230,
    "ILSVRC2012_val_00000004.JPEG": 809,
    "ILSVRC2012_val_00000005.JPEG": 516,
    "ILSVRC2012_val_00000006.JPEG": 57,
}
PER_CLASS = 8


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    """A data_dir where the real builder has prepared 3 classes x 8 training and 6 validation images."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    start = time.perf_counter()
    prepare_imagenet2012(data_dir, synsets=tuple(TRAIN_LABELS), per_class=PER_CLASS, val_files=range(1, 7))
    assert time.perf_counter() - start < 60  # offline: nothing waits on a network
    return data_dir


def test_layout_reports_what_it_wrote(tmp_path):
    layout = make_manual_imagenet(str(tmp_path), synsets=tuple(TRAIN_LABELS), per_class=2, val_files=range(1, 7))
    assert layout["labels"] == tuple(TRAIN_LABELS.values()) and layout["num_train"] == 6
    assert dict(zip(layout["val_files"], layout["val_labels"])) == VAL_LABELS
    assert sorted(os.listdir(tmp_path)) == ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"]
    with pytest.raises(ValueError, match="1..N"):  # the builder would pair image 7 with line 1
        make_manual_imagenet(str(tmp_path), val_files=[7])


def test_real_builder_gives_1000_classes_and_the_bundled_validation_labels(imagenet_dir):
    train = load_source("imagenet2012", "train", data_dir=imagenet_dir)
    val = load_source("imagenet2012", "validation", data_dir=imagenet_dir)
    assert (train.num_classes, train.num_examples) == (1000, 3 * PER_CLASS)
    assert (val.num_classes, val.num_examples) == (1000, len(VAL_LABELS))
    assert [train.class_names[i] for i in TRAIN_LABELS.values()] == list(TRAIN_LABELS)

    train_examples = list(train.make(0, 1).as_numpy_iterator())
    assert collections.Counter(int(e["label"]) for e in train_examples) == {i: PER_CLASS for i in TRAIN_LABELS.values()}
    val_examples = list(val.make(0, 1).as_numpy_iterator())
    assert sorted(int(e["label"]) for e in val_examples) == sorted(VAL_LABELS.values())
    image = val_examples[0]["image"]
    if isinstance(image, bytes):  # a Source yields encoded images (decoding is fused with cropping)
        image = tf.io.decode_jpeg(image).numpy()
    assert image.shape == (30, 40, 3) and image.dtype == np.uint8

    # Each validation file got its own bundled label (the builder's records keep the file name).
    builder = tfds.builder("imagenet2012", data_dir=imagenet_dir)
    records = builder.as_dataset(split="validation").as_numpy_iterator()
    by_name = {e["file_name"].decode(): int(e["label"]) for e in records}
    assert by_name == VAL_LABELS


def test_cli_trains_and_evaluates_on_imagenet2012(imagenet_dir, tmp_path):
    from train.__main__ import main as train_main
    from train.evaluate import main as evaluate_main

    workdir = str(tmp_path / "run")
    # --model alone picks the ResNet paper recipe, whose step schedule needs >= 2 epochs: cosine for 1.
    rc = train_main(["--dataset", "imagenet2012", "--data-dir", imagenet_dir, "--model", "resnet18",
                     "--workdir", workdir, "--epochs", "1", "--batch-size", "8", "--set", "image_size=32",
                     "--set", "schedule=cosine", "--no-progress", "--log-every", "1"])
    assert rc == 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    epochs = [r for r in records if "eval_top1" in r]
    assert [r["epoch"] for r in epochs] == [1]
    assert 0.0 <= epochs[0]["eval_top1"] <= 1.0 and np.isfinite(epochs[0]["train_loss"])
    with open(os.path.join(workdir, "run.json")) as f:
        assert json.load(f)["num_classes"] == 1000

    # The data directory comes from the run's run.json.
    rc = evaluate_main(["--workdir", workdir, "--protocol", "center", "--no-progress"])
    assert rc == 0
    with open(os.path.join(workdir, "eval_center.json")) as f:
        result = json.load(f)
    assert result["count"] == len(VAL_LABELS)
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0


def test_unprepared_imagenet_names_the_manual_directory_and_tfds_build(tmp_path):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    start = time.perf_counter()
    with pytest.raises(DatasetNotReadyError) as err:
        load_source("imagenet2012", "train", data_dir=empty)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert os.path.join(empty, "downloads", "manual") in message
    assert "tfds build imagenet2012" in message
