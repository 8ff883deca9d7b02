"""Test-time views for the papers' protocols: counts, shapes and which pixels each view holds."""

import numpy as np
import tensorflow as tf

from input_pipeline import augment as aug
from input_pipeline import views

IMAGE = np.random.default_rng(0).integers(0, 256, (256, 320, 3)).astype(np.float32)


def test_center_view():
    out = views.center_view(IMAGE, 224, 256).numpy()
    assert out.shape == (1, 224, 224, 3)
    np.testing.assert_allclose(out[0], IMAGE[16:240, 48:272], atol=1e-3)


def test_ten_crop():
    out = views.ten_crop(IMAGE, 224, 256).numpy()
    assert out.shape == (10, 224, 224, 3)
    np.testing.assert_allclose(out[0], IMAGE[:224, :224], atol=1e-3)  # top-left
    np.testing.assert_allclose(out[3], IMAGE[32:, 96:], atol=1e-3)  # bottom-right
    np.testing.assert_allclose(out[5:], out[:5, :, ::-1], atol=0)  # mirrors


def test_googlenet_144_crops():
    out = views.googlenet_144(IMAGE).numpy()
    assert out.shape == (144, 224, 224, 3)
    np.testing.assert_allclose(out[72:], out[:72, :, ::-1])
    # First scale 256 = the image itself: left square, its top-left corner, and the whole square.
    np.testing.assert_allclose(out[0], IMAGE[:224, :224], atol=1e-3)
    whole = tf.image.resize(IMAGE[:, :256], [224, 224], antialias=True).numpy()
    np.testing.assert_allclose(out[5], whole, atol=1e-3)
    # Right square of the first scale.
    np.testing.assert_allclose(out[12], IMAGE[:224, 64:288], atol=1e-3)


def test_dense_views():
    out = views.dense_views(IMAGE, (256, 384))
    assert [tuple(v.shape) for v in out] == [(1, 256, 320, 3)] * 2 + [(1, 384, 480, 3)] * 2
    np.testing.assert_allclose(out[1].numpy(), out[0].numpy()[:, :, ::-1])
    assert np.allclose(aug.resize_short_side(IMAGE, 384).numpy(), out[2].numpy()[0])
