"""Data sources: the embedded digits, tfds names that are not prepared, folders with bad files."""

import logging
import time

import numpy as np
import pytest
from PIL import Image

from input_pipeline import augment as aug
from input_pipeline.folders import folder_source, skipped_files
from input_pipeline.sources import BadImageError, DatasetNotReadyError, load_source, tfds_source


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_embedded_digits_are_prepared_offline(data_dir):
    train = load_source("flaxnets_digits", "train", data_dir=data_dir)
    test = load_source("flaxnets_digits", "test", data_dir=data_dir)
    assert (train.num_examples, test.num_examples, train.num_classes) == (1437, 360, 10)
    examples = list(test.make(0, 1).as_numpy_iterator())
    labels = np.array([e["label"] for e in examples])
    assert len(examples) == 360 and set(labels) == set(range(10))
    image = aug.decode(examples[0]["image"]).numpy()
    assert image.shape == (8, 8, 3) and image.max() > 200  # real strokes, scaled to [0, 255]
    # The same split every time.
    again = [e["label"] for e in load_source("flaxnets_digits", "test", data_dir=data_dir).make(0, 1).as_numpy_iterator()]
    np.testing.assert_array_equal(labels, again)


def test_unprepared_dataset_fails_fast_with_instructions(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DatasetNotReadyError, match=r"imagenet2012.*not prepared.*downloads/manual.*tfds build"):
        tfds_source("imagenet2012", "train", data_dir=str(tmp_path))
    with pytest.raises(DatasetNotReadyError, match=r"not prepared.*tfds build cifar10.*--download"):
        tfds_source("cifar10", "train", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 20


def test_unknown_dataset_and_split(data_dir):
    with pytest.raises(DatasetNotReadyError, match="no data set 'cifar1O'.*cifar10"):
        tfds_source("cifar1O", "train", data_dir=data_dir)
    with pytest.raises(DatasetNotReadyError, match="no split 'validation'"):
        tfds_source("flaxnets_digits", "validation", data_dir=data_dir)


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "cat" / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(tmp_path / "cat" / "gray.png")
    Image.fromarray(rng.integers(0, 255, (50, 20, 4), dtype=np.uint8)).save(tmp_path / "dog" / "rgba.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    whole = (tmp_path / "cat" / "a.jpg").read_bytes()
    (tmp_path / "dog" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    return tmp_path


def test_folder_drops_bad_files_lazily_with_named_warnings(image_folder, caplog):
    with caplog.at_level(logging.WARNING):
        source = load_source(str(image_folder))
        assert source.class_names == ("cat", "dog") and source.num_examples == 6  # listed, not opened
        examples = list(source.make(0, 1).as_numpy_iterator())
    assert [e["label"] for e in examples] == [0, 0, 1]
    assert all(aug.decode(e["image"]).shape[-1] == 3 for e in examples)  # grayscale and RGBA become RGB
    assert "broken.jpg" in caplog.text and "notes.txt" in caplog.text and "cut.jpg" in caplog.text
    assert skipped_files(str(image_folder)) == 3


def test_folder_strict_mode_names_the_bad_file(image_folder):
    with pytest.raises(BadImageError, match="broken.jpg"):
        folder_source(str(image_folder), strict=True)


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetNotReadyError, match="no class sub-folders"):
        folder_source(str(tmp_path))
    with pytest.raises(DatasetNotReadyError, match="does not exist"):
        load_source(str(tmp_path / "nope") + "/", "train")
