"""Evaluation protocols, ensembles and ``python -m train.evaluate`` on the embedded digits."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

import flaxnets
from flaxnets.convert import save_converted
from input_pipeline.pipeline import make_dataset
from input_pipeline.sources import load_source
from train.evaluate import EvaluationError, Member, evaluate, load_member, main, member_probabilities
from train.protocols import PROTOCOLS, crop_probabilities, get_protocol, mean_probabilities, pixel_views
from train.steps import normalize_images
from train.recipes import DEFAULT_RECIPE, get_recipe
from train.trainer import RunConfig, run

IMAGE = tf.io.encode_jpeg(tf.constant(np.random.default_rng(0).integers(0, 256, (300, 400, 3)), tf.uint8))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    load_source("flaxnets_digits", "train", data_dir=path)
    return path


@pytest.fixture(scope="module")
def digits_test(data_dir):
    return load_source("flaxnets_digits", "test", data_dir=data_dir)


def random_member(name="resnet18", size=16, seed=0, directory="random"):
    model = flaxnets.create_model(name, num_classes=10)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
    return Member(directory, model, variables, size, "flaxnets_digits", "random init")


@pytest.mark.parametrize("name, views", [("center", 1), ("10crop", 10), ("144crop", 144), ("dense", 6)])
def test_view_counts_and_shapes(name, views):
    protocol = get_protocol(name)
    assert protocol.num_views(224) == views
    out = pixel_views(protocol, IMAGE, 224, protocol.scales(224))
    if protocol.dense:
        # Q = S-32, S, S+32 for a 224 px model trained at S = 256; the image is 300x400.
        assert [tuple(v.shape) for v in out] == [(1, q, round(q * 4 / 3), 3) for q in (224, 256, 288) for _ in "ab"]
        assert protocol.scales(224, jittered=True) == (256, 384, 512)
    else:
        assert out.shape == (views, 224, 224, 3)
        assert out.dtype == tf.uint8 and 50 < float(tf.reduce_mean(tf.cast(out, tf.float32))) < 200
    # Smaller models get proportionally smaller scales.
    assert protocol.num_views(32) == views


def test_unknown_protocol_lists_the_valid_ones():
    with pytest.raises(KeyError, match="center, 10crop, 144crop, dense"):
        get_protocol("12crop")


@pytest.mark.parametrize("name", ["vgg11", "alexnet"])
def test_dense_equals_plain_at_the_training_size(name):
    model = flaxnets.create_model(name, num_classes=10)
    size = flaxnets.model_info(name).input_size
    x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    plain = model.apply(variables, x)
    dense = flaxnets.dense_logits(model, variables, x)
    np.testing.assert_allclose(dense, plain, rtol=1e-4, atol=1e-5 * float(jnp.abs(plain).max()))
    # A larger image gives one score vector: the average of the score map.
    assert flaxnets.dense_logits(model, variables, jnp.zeros((1, size + 64, size + 32, 3))).shape == (1, 10)


def test_dense_rejects_images_smaller_than_the_fc_window():
    model, size = flaxnets.create_model("vgg11", num_classes=10), 224
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    with pytest.raises(ValueError, match="7x7 window"):
        jax.eval_shape(lambda v: flaxnets.dense_logits(model, v, jnp.zeros((1, 160, 160, 3))), variables)


class _LogitsByFirstPixel(nn.Module):
    """A stub model: the logits are row ``table[k]`` for an image whose first pixel is k."""

    table: tuple

    def __call__(self, x, train=False):
        return jnp.asarray(self.table)[x[:, 0, 0, 0].astype(jnp.int32)]


def test_views_are_averaged_as_probabilities_not_logits():
    # Averaging logits picks class 0 ((20+0)/2 > (0+5)/2), averaging probabilities picks class 1.
    table = ((20.0, 0.0, 19.0), (0.0, 5.0, 0.0))
    views = jnp.stack([jnp.zeros((4, 4, 3)), jnp.ones((4, 4, 3))])[None]  # one image, two views
    probs = crop_probabilities(_LogitsByFirstPixel(table), {}, views)
    expected = np.mean([np.exp(r) / np.exp(r).sum() for r in np.array(table)], axis=0)
    np.testing.assert_allclose(probs[0], expected, rtol=1e-5)
    assert int(jnp.argmax(probs[0])) == 1 and int(np.argmax(np.mean(table, axis=0))) == 0
    np.testing.assert_allclose(mean_probabilities(jnp.asarray(table), axis=0), expected, rtol=1e-5)


def test_center_protocol_matches_an_independent_forward_pass(digits_test):
    member = random_member()
    probs, labels = member_probabilities(member, get_protocol("center"), digits_test, progress=False)
    batches = list(make_dataset(digits_test, batch_size=120, train=False, image_size=16).as_numpy_iterator())
    logits = np.concatenate([member.model.apply(member.variables, normalize_images(b["image"])) for b in batches])
    np.testing.assert_array_equal(labels, np.concatenate([b["label"] for b in batches]))
    np.testing.assert_allclose(probs, jax.nn.softmax(logits), atol=1e-5)
    result = evaluate([member], "center", digits_test, progress=False)
    assert result["count"] == 360
    assert result["top1"] == pytest.approx(np.mean(np.argmax(logits, -1) == labels))


def test_an_ensemble_averages_its_members_probabilities(digits_test):
    members = [random_member(seed=0, directory="a"), random_member(seed=1, directory="b")]
    one = evaluate(members[:1], "10crop", digits_test, limit=40, progress=False)
    twice = evaluate(members[:1] * 2, "10crop", digits_test, limit=40, progress=False)
    assert (one["top1"], one["top5"]) == (twice["top1"], twice["top5"]) == (
        one["members"][0]["top1"], one["members"][0]["top5"])
    both = evaluate(members, "10crop", digits_test, limit=40, progress=False)
    p = [member_probabilities(m, get_protocol("10crop"), digits_test, limit=40, progress=False) for m in members]
    labels = p[0][1]
    assert both["top1"] == pytest.approx(np.mean(np.argmax(p[0][0] + p[1][0], -1) == labels))
    assert [m["top1"] for m in both["members"]] == pytest.approx([np.mean(np.argmax(q, -1) == labels) for q, _ in p])


def test_missing_or_foreign_directories_are_clear_errors(tmp_path):
    with pytest.raises(EvaluationError, match="neither run.json"):
        load_member(str(tmp_path))
    (tmp_path / "run.json").write_text(json.dumps({"model": "resnet18"}))
    with pytest.raises(EvaluationError, match="no checkpoint in .*checkpoints: train first"):
        load_member(str(tmp_path))
    assert main(["--workdir", str(tmp_path / "nowhere"), "--no-progress"]) == 1


def test_command_line_on_a_trained_run_and_on_converted_weights(tmp_path, data_dir, capsys):
    recipe = dataclasses.replace(get_recipe(DEFAULT_RECIPE), image_size=16, epochs=1)
    run(recipe, RunConfig(workdir=str(tmp_path / "run"), data_dir=data_dir, progress=False))
    trained_top1 = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())["eval_top1"]
    assert main(["--workdir", str(tmp_path / "run"), "--data-dir", data_dir, "--no-progress"]) == 0
    center = json.load(open(tmp_path / "run" / "eval_center.json"))
    assert center["top1"] == pytest.approx(trained_top1)  # the training-time evaluation, reproduced
    assert center["members"][0]["weights"].startswith("best checkpoint, step 22")

    member = random_member()
    save_converted(str(tmp_path / "converted"), "resnet18", member.variables, num_classes=10)
    args = ["--workdir", str(tmp_path / "run"), "--ensemble", str(tmp_path / "converted"), "--protocol", "all",
            "--image-size", "16", "--limit", "6", "--data-dir", data_dir, "--no-progress",
            "--out", str(tmp_path / "all.json")]
    capsys.readouterr()
    assert main(args) == 0
    results = json.load(open(tmp_path / "all.json"))
    assert [(r["protocol"], r["views"], r["count"], len(r["members"])) for r in results] == [
        (name, views, 6, 2) for name, views in zip(PROTOCOLS, (1, 10, 144, 6))]
    assert os.path.getsize(tmp_path / "all.png") > 10_000
    assert "144crop   144 views" in capsys.readouterr().out
