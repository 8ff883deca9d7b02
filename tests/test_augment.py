"""Augmentation ops: shapes, ranges, statistics over many draws, determinism, and inside tf.data."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from input_pipeline import augment as aug
from input_pipeline.recipes import get_recipe, list_recipes

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (300, 400, 3), dtype=np.uint8)


def seed(i: int) -> tf.Tensor:
    return tf.constant([7, i], tf.int64)


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_decode_converts_grayscale_and_rgba_to_rgb():
    gray = IMAGE[..., 0]
    decoded = aug.decode(encode(gray, "PNG")).numpy()
    assert decoded.shape == (300, 400, 3) and np.array_equal(decoded[..., 2], gray)
    rgba = np.concatenate([IMAGE, np.full((300, 400, 1), 9, np.uint8)], axis=-1)
    assert np.array_equal(aug.decode(encode(rgba, "PNG")).numpy(), IMAGE)
    assert aug.decode(encode(IMAGE, "JPEG")).shape == (300, 400, 3)


def test_resize_short_side_keeps_aspect():
    out = aug.resize_short_side(IMAGE, 256)
    assert out.shape == (256, 341, 3) and out.dtype == tf.float32


def test_center_and_random_crop():
    np.testing.assert_array_equal(aug.center_crop(IMAGE, 100).numpy(), IMAGE[100:200, 150:250])
    crop = aug.random_crop(IMAGE, 64, seed(1)).numpy()
    assert crop.shape == (64, 64, 3)
    # The crop is a window of the image: find its position from the first pixel row.
    rows, cols = np.where(np.all(IMAGE[:-63, :-63] == crop[0, 0], axis=-1))
    assert any(np.array_equal(IMAGE[r:r + 64, c:c + 64], crop) for r, c in zip(rows, cols))
    np.testing.assert_array_equal(crop, aug.random_crop(IMAGE, 64, seed(1)).numpy())
    assert not np.array_equal(crop, aug.random_crop(IMAGE, 64, seed(2)).numpy())


def test_flip_rate_is_one_half():
    flips = [not np.array_equal(aug.random_flip(IMAGE, seed(i)).numpy(), IMAGE) for i in range(400)]
    assert 0.42 < np.mean(flips) < 0.58
    flipped = next(aug.random_flip(IMAGE, seed(i)).numpy() for i, f in enumerate(flips) if f)
    np.testing.assert_array_equal(flipped, IMAGE[:, ::-1])


def test_pca_lighting_has_the_paper_covariance():
    image = np.zeros((2, 2, 3), np.float32)
    shifts = np.stack([aug.pca_lighting(image, seed(i)).numpy()[0, 0] for i in range(3000)])
    vec, val = np.array(aug.IMAGENET_EIGVEC), np.array(aug.IMAGENET_EIGVAL)
    expected = vec @ np.diag((0.1 * val) ** 2) @ vec.T
    np.testing.assert_allclose(np.cov(shifts.T), expected, atol=6e-5)
    assert np.abs(shifts.mean(axis=0)).max() < 2e-3
    one = aug.pca_lighting(image, seed(0)).numpy()
    assert np.allclose(one, one[0, 0])  # the same shift on every pixel


def test_inception_crop_area_and_aspect_within_bounds():
    areas, aspects = [], []
    for i in range(300):
        offset, size = aug.sample_inception_box(tf.constant([300, 400, 3]), seed(i))
        h, w = size.numpy()
        top, left = offset.numpy()
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
        areas.append(h * w / (300 * 400))
        aspects.append(w / h)
    areas, aspects = np.array(areas), np.array(aspects)
    assert areas.min() >= 0.08 - 0.01 and areas.max() <= 1.0
    sampled = areas < 1.0  # the others fell back to the whole image
    assert sampled.mean() > 0.8
    assert aspects[sampled].min() >= 0.75 * 0.95 and aspects[sampled].max() <= 4 / 3 * 1.05
    assert areas[sampled].std() > 0.15  # spread over the range, not stuck


def test_fused_jpeg_crop_equals_decode_then_crop():
    jpeg, png = encode(IMAGE, "JPEG"), encode(IMAGE, "PNG")
    fused = aug.decode_and_inception_crop(jpeg, seed(3)).numpy()
    offset, size = aug.sample_inception_box(tf.constant([300, 400, 3]), seed(3))
    (top, left), (h, w) = offset.numpy(), size.numpy()
    full = aug.decode(jpeg).numpy()[top:top + h, left:left + w]
    assert np.abs(fused.astype(int) - full.astype(int)).max() <= 2
    np.testing.assert_array_equal(aug.decode_and_inception_crop(png, seed(3)).numpy(), IMAGE[top:top + h, left:left + w])


def test_photometric_distortion_stays_in_range_and_changes_the_image():
    image = aug.to_float(IMAGE)
    out = aug.photometric_distort(image, seed(0), hue=0.1).numpy()
    assert out.min() >= 0 and out.max() <= 1 and not np.allclose(out, image)
    np.testing.assert_array_equal(out, aug.photometric_distort(image, seed(0), hue=0.1).numpy())


def test_random_method_resize_uses_several_methods():
    image = aug.to_float(IMAGE)
    outs = {aug.random_method_resize(image, 50, seed(i)).numpy().tobytes() for i in range(40)}
    assert len(outs) == 4  # bilinear, area, nearest, bicubic all drawn


def test_to_pixels_rounds_and_clips():
    out = aug.to_pixels(tf.constant([[[-0.1, 0.5, 1.2]]])).numpy()
    assert out.dtype == np.uint8 and out.tolist() == [[[0, 128, 255]]]


@pytest.mark.parametrize("name", list_recipes())
def test_recipe_inside_tf_data_equals_eager(name):
    transform = get_recipe(name).transform
    data = [encode(IMAGE, "JPEG"), encode(IMAGE[:, :, 0], "PNG")]
    ds = tf.data.Dataset.from_tensor_slices(data).enumerate()
    ds = ds.map(lambda i, b: transform(b, tf.stack([tf.constant(5, tf.int64), i]), 96))
    graph = [x.numpy() for x in ds]
    for i, (image_bytes, out) in enumerate(zip(data, graph)):
        eager = transform(tf.constant(image_bytes), tf.constant([5, i], tf.int64), 96).numpy()
        assert out.shape == (96, 96, 3) and out.dtype == np.uint8  # normalised on the device
        np.testing.assert_allclose(out, eager, atol=1)  # rounding of values within 1e-5 of .5 may differ
        assert out.std() > 5  # an image, not a constant


def test_unknown_recipe():
    with pytest.raises(KeyError, match="known: alexnet"):
        get_recipe("autoaugment")
